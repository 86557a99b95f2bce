"""serve/settings.py: ``ServeSettings`` checks itself and names the field; its one table of options
generates ``gpt2-edge serve``'s options, their mapping onto the settings, a restarted server's
command line and Ray's ``serve run`` arguments."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

import pytest

from gpt2_edge.serve.cli import ServeError, add_serve_arguments, restart_argv, settings_from_args
from gpt2_edge.serve.settings import ServeSettings, SettingsError, options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return p


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_queue": -1}, "max_queue"),
        ({"prefill_chunk": -1}, "prefill_chunk"),
        ({"step_tokens": -1}, "step_tokens"),
        ({"max_batch": 2.5}, "max_batch"),
        ({"max_batch": True}, "max_batch"),
        ({"threads": 0}, "threads"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"drain_timeout_s": -1}, "drain_timeout_s"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"port": 70000}, "port"),
        ({"replicas": 0}, "replicas"),
        ({"replica_cpus": 0}, "replica_cpus"),
        ({"provider": "tpu"}, "provider"),
        ({"api_key": ""}, "api_key"),
        ({"host": ""}, "host"),
        ({"cors_origins": "http://a.test"}, "cors_origins"),
        ({"prompt_lookup": -1}, "prompt_lookup"),
        ({"prompt_lookup": 33}, "prompt_lookup"),
    ],
)
def test_settings_refuse_bad_values_naming_the_field(changes, field):
    with pytest.raises(SettingsError) as e:
        ServeSettings(**changes)
    assert e.value.field == field and str(e.value).startswith(field)
    with pytest.raises(SettingsError):
        ServeSettings().replace(**changes)


def test_settings_take_every_provider_and_normalise():
    from gpt2_edge.runtime.backends import PROVIDERS

    for provider in PROVIDERS:
        assert ServeSettings(provider=provider).provider == provider
    s = ServeSettings(cors_origins=["http://a.test"], timeout_s=5, prefill_chunk=0)
    assert s.cors_origins == ("http://a.test",) and s.timeout_s == 5.0 and isinstance(s.timeout_s, float)
    assert ServeSettings(**s.as_dict()) == s


# one value per setting the CLI takes, none of them the default
GIVEN = {
    "provider": "cuda",
    "threads": 2,
    "model_name": "m",
    "lora": ("a1=/adapters/a1", "a2=/adapters/a2"),
    "max_batch": 3,
    "max_queue": 5,
    "prefill_chunk": 7,
    "step_tokens": 512,
    "kv_budget": 4096,
    "prefix_cache": False,
    "prefix_cache_blocks": 4,
    "prompt_lookup": 6,
    "draft": "/d",
    "draft_tokens": 5,
    "step_invariant": "on",
    "timeout_s": 12.5,
    "max_body_bytes": 1000,
    "api_key": "k",
    "cors_origins": ("http://a.test", "http://b.test"),
    "allowed_hosts": ("h.test",),
    "header_timeout_s": 3.0,
    "body_timeout_s": 4.0,
    "max_connections": 9,
    "host": "0.0.0.0",
    "port": 8123,
    "drain_timeout_s": 0.0,
    "replicas": 2,
    "replica_cpus": 0.5,
}


def test_the_table_names_every_setting_the_cli_takes():
    cli = {f.name for f, option, _ in options() if option.cli}
    assert cli == set(GIVEN)
    defaults = ServeSettings()
    assert all(getattr(defaults, name) != value for name, value in GIVEN.items())


def command_line(values: dict) -> list[str]:
    argv = ["b"]
    for f, option, kind in options():
        if f.name not in values:
            continue
        value = values[f.name]
        if kind is bool:
            argv.append(option.flag)
        elif kind is tuple:
            for v in value:
                argv += [option.flag, v]
        else:
            argv += [option.flag, str(value)]
    return argv


def test_every_option_reaches_its_setting_and_survives_a_restart():
    p = parser()
    assert settings_from_args(p.parse_args(["b"]), None) == ServeSettings()
    args = p.parse_args([*command_line(GIVEN), "--ray", "--ray-address", "ray://x", "--log-level", "debug"])
    settings = settings_from_args(args, args.api_key)
    assert settings == ServeSettings(**GIVEN)
    argv = restart_argv(args)
    assert "--api-key" not in argv and "k" not in argv  # the key goes through the environment
    again = p.parse_args(argv[3:])  # after `python -m gpt2_edge.serve`
    assert settings_from_args(again, "k") == settings
    assert (again.ray, again.ray_address, again.log_level, again.bundle) == (True, "ray://x", "debug", "b")
    # options not given stay off the restarted command line: the settings' defaults hold there too
    assert restart_argv(p.parse_args(["b"]))[3:] == ["b", "--log-level", "info"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--timeout", "0"], "--timeout must be > 0"),
        (["--allowed-host", ""], "--allowed-host"),
        (["--drain-timeout", "-1"], "--drain-timeout must be >= 0"),
    ],
)
def test_a_refusal_names_the_option(argv, says):
    with pytest.raises(ServeError, match=says):
        settings_from_args(parser().parse_args(["b", *argv]), None)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the ray extra")
def test_serve_run_takes_the_settings_the_table_gives_it():
    from gpt2_edge.serve.ray_app import BuildArgs

    run = {f.name for f, option, _ in options() if option.run}
    assert set(BuildArgs.model_fields) == {"bundle", *run}
    assert not {"host", "port", "api_key", "replica"} & run
    values = BuildArgs.model_validate({"bundle": "b", "max_batch": "3", "prefix_cache": "false"}).model_dump()
    assert (values["max_batch"], values["prefix_cache"]) == (3, False)
    defaults = dataclasses.asdict(ServeSettings())
    assert all(values[k] == defaults[k] for k in run if k not in ("max_batch", "prefix_cache"))
