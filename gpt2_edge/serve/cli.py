"""``gpt2-edge serve``: the HTTP server on uvicorn, or N replicas on Ray Serve (``--ray``).

Also runnable as ``python -m gpt2_edge.serve`` (same options): that entry never imports torch.
The options become one ``ServeSettings``, which checks them; Ray Serve gets the same object.
The main CLI imports this module to build its parser: the HTTP stack (fastapi, uvicorn; the
``serve`` extra) and Ray load only when a server starts.

The options, their mapping onto ``ServeSettings`` and a restarted server's command line are all
generated from the settings' one table (``settings.options()``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import Gpt2EdgeError
from .connections import bind
from .model import load_served_model
from .settings import API_KEY_ENV, RAY, ServeSettings, SettingsError, options

__all__ = ["API_KEY_ENV", "add_serve", "main", "resolve_bundle", "run", "run_app"]

CACHE_ENV = "GPT2_EDGE_CACHE"


class ServeError(Gpt2EdgeError):
    """A problem whose message is the whole story for the user."""


def default_bundle_dir() -> Path:
    """Where ``serve`` keeps its export of the shipped default model (``$GPT2_EDGE_CACHE``, else
    ``$XDG_CACHE_HOME/gpt2-edge``, else ``~/.cache/gpt2-edge``)."""
    root = (
        os.environ.get(CACHE_ENV)
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-edge"
    )
    return Path(root) / "default-bundle"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The bundle, one option per setting (``settings.options()``: flag, help, type, default from
    the table), and the options of this command alone (``--log-level``, ``--ray``,
    ``--ray-address``). A setting's option defaults to None (not given): ``settings_from_args``
    takes the settings' own default for it, and a restarted server is handed only what was given."""
    p.add_argument(
        "bundle",
        nargs="?",
        help="bundle directory (gpt2-edge export -o DIR). Default: the shipped default model, exported once "
        "to $GPT2_EDGE_CACHE/default-bundle (~/.cache/gpt2-edge; the export needs the `export` extra)",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, option, kind in options():
        if not option.cli:
            continue
        where: Any = (
            p if option.group is None else groups.setdefault(option.group, p.add_argument_group(option.group))
        )
        default = f.default
        shown = (
            ""
            if default in (None, (), "") or kind is bool
            else f" (default: {default:g})"
            if kind is float
            else f" (default: {default})"
        )
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": option.help + shown}
        metavar = option.metavar or option.flag[2:].upper().replace("-", "_")
        if kind is bool:
            kw["action"] = "store_false" if default is True else "store_true"
        elif kind is tuple:
            kw.update(action="append", metavar=metavar)
        else:
            kw.update(type=kind, metavar=None if option.choices else metavar, choices=option.choices)
        where.add_argument(option.flag, **kw)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    ray = groups.setdefault(RAY, p.add_argument_group(RAY))
    ray.add_argument(
        "--ray", action="store_true", help="run as a Ray Serve deployment with --replicas replicas"
    )
    ray.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")


def add_serve(sub: argparse._SubParsersAction) -> None:
    """Register ``gpt2-edge serve`` on the main CLI."""
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with continuous batching (or Ray Serve replicas)",
        description="Serve a bundle over an OpenAI-style HTTP API: POST /v1/completions (SSE with stream), "
        "GET /v1/models, /health, /metrics, POST /tokenize, /detokenize. Binds 127.0.0.1 unless --host says "
        "otherwise. SIGTERM drains in-flight requests (--drain-timeout) and exits 0.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=run)



def _invoked_as_program() -> bool:
    """Whether this process is the ``gpt2-edge`` program itself, not code that calls ``main()``:
    only the program may be replaced by a fresh one."""
    prog = Path(sys.argv[0])
    return prog.name == "gpt2-edge" or (
        prog.name == "__main__.py" and prog.parent.name in ("gpt2_edge", "serve")
    )


def restart_argv(args: argparse.Namespace) -> list[str]:
    """``python -m gpt2_edge.serve`` with the options given (a setting's from the table, but a
    secret's: the key goes through the environment)."""
    argv = [sys.executable, "-m", "gpt2_edge.serve"]
    if args.bundle:
        argv.append(args.bundle)
    for f, option, kind in options():
        value = getattr(args, f.name, None) if option.cli and not option.secret else None
        if value is None:
            continue
        if kind is bool:
            argv.append(option.flag)  # given: the flag that changes the default
        elif kind is tuple:
            for v in value:
                argv += [option.flag, str(v)]
        else:
            argv += [option.flag, str(value)]
    argv += ["--log-level", args.log_level]
    if args.ray_address:
        argv += ["--ray-address", args.ray_address]
    if args.ray:
        argv.append("--ray")
    return argv


def _start_over_if_needed(args: argparse.Namespace) -> None:
    """Replace this process (same pid) with a clean ``python -m gpt2_edge.serve`` when torch is
    loaded (a server would carry hundreds of MB it never uses) or when ``--api-key`` is on the
    command line (``ps`` shows argv to every user; the new process gets the key through its
    environment)."""
    if "torch" not in sys.modules and not args.api_key:
        return
    argv = restart_argv(args)
    env = dict(os.environ)
    if args.api_key:
        env[API_KEY_ENV] = args.api_key  # through the environment, not the visible command line
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def resolve_bundle(bundle: str | None, log: Any = print, option: str | None = None) -> Path:
    """The bundle to serve: the given one, or the shipped default model's (exported on first use).
    ``option``: the option that named it (``--draft``), for the refusal."""
    if bundle:
        path = Path(bundle)
        if not (path / "bundle.json").is_file():
            raise ServeError(
                f"{option + ' ' if option else ''}{path} is not a bundle (no bundle.json); make one with "
                f"`gpt2-edge export -o {path}`"
            )
        return path
    path = default_bundle_dir()
    if (path / "bundle.json").is_file():
        return path
    log(f"no BUNDLE given: exporting the shipped default model to {path} (once)")
    # In a child process: the export needs torch, the server must not carry it.
    cmd = [sys.executable, "-m", "gpt2_edge", "export", "-o", str(path), "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ServeError(
            f"could not export the default model ({tail[0]}); install the export extra "
            "(pip install 'gpt2-edge[export]') or pass a bundle: gpt2-edge serve BUNDLE"
        )
    return path


def settings_from_args(args: argparse.Namespace, api_key: str | None) -> ServeSettings:
    """The options as settings (an option not given: the setting's default; ``api_key``: the key,
    from the option or the environment); a refusal names the option (``--max-batch``), not the
    field."""
    given: dict[str, Any] = {}
    for f, option, kind in options():
        value = getattr(args, f.name, None) if option.cli else None
        if value is not None:
            given[f.name] = tuple(value) if kind is tuple else value
    given["api_key"] = api_key
    try:
        return ServeSettings(**given)
    except SettingsError as e:
        flags = {f.name: option.flag for f, option, _ in options()}
        raise ServeError(f"{flags.get(e.field, '--' + e.field.replace('_', '-'))} {e.problem}") from None


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT; 0 after a clean drain."""
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    settings = settings_from_args(args, api_key)
    if not args.ray and settings.replicas != 1:
        raise ServeError("--replicas needs --ray (one process serves one model; Ray Serve runs several)")
    if settings.draft is None and args.draft_tokens is not None:
        raise ServeError("--draft-tokens needs --draft (the draft model's bundle)")
    if settings.draft is not None:
        draft = resolve_bundle(settings.draft, option="--draft")  # a look for bundle.json, before binding
        settings = settings.replace(draft=str(draft.resolve()))  # every Ray replica finds it there too
    if args.bundle:
        bundle = resolve_bundle(args.bundle)  # a look for bundle.json
    # The address before anything slow: a port in use (or not ours) is one line now, not a
    # traceback after the model loaded (or the default model was exported).
    sock = bind(settings.host, settings.port)
    if args.ray or _invoked_as_program():
        sock.close()  # Ray's proxy binds it; a process that starts over binds it again
    if not args.bundle:
        bundle = resolve_bundle(None)  # the default model, exported on first use
    if _invoked_as_program():
        _start_over_if_needed(args)
        if not args.ray:
            sock = bind(settings.host, settings.port)
    if args.ray:
        from .ray_app import serve_with_ray  # Ray loads only when asked for

        return serve_with_ray(bundle, settings, address=args.ray_address)
    return serve_uvicorn(bundle, settings, log_level=args.log_level, sock=sock)


def serve_uvicorn(bundle: Path, settings: ServeSettings, log_level: str = "info", sock: Any = None) -> int:
    """Serve ``bundle`` on uvicorn, on ``sock`` (bound before the model loads) or a socket bound here."""
    from .app import create_app  # fastapi (the serve extra): not when the main CLI builds its parser

    sock = sock or bind(settings.host, settings.port)
    try:
        model = load_served_model(bundle, settings)
        app = create_app(model, settings)
    except BaseException:
        sock.close()
        raise
    print(
        f"gpt2-edge serve: {model.name} ({bundle}, {settings.provider}) on http://{settings.host}:{settings.port}"
        f" — max batch {settings.max_batch}, queue {settings.max_queue}, prefill chunk "
        f"{settings.prefill_chunk or 'whole'}, step tokens {settings.step_tokens or 'unlimited'}, KV budget "
        f"{f'{settings.kv_budget} tokens' if settings.kv_budget else 'max batch x context'}, "
        f"prefix cache {'on' if settings.prefix_cache else 'off'}, "
        f"prompt lookup {settings.prompt_lookup or 'off'}, "
        f"draft {f'{settings.draft} (up to {settings.draft_tokens} tokens)' if settings.draft else 'off'}, "
        f"step invariance {'on' if model.step_invariant else 'off'}, "
        f"auth {'on' if settings.api_key else 'off'}"
        + (f", LoRA adapters {', '.join(model.adapters)}" if model.adapters else ""),
        flush=True,
    )
    return run_app(app, settings, log_level, sockets=[sock])


def run_app(app: Any, settings: ServeSettings, log_level: str = "info", sockets: Any = None) -> int:
    """Run ``app`` (from ``create_app``) on uvicorn until SIGTERM / SIGINT, on ``sockets`` (else
    it binds ``settings.host:port``), with the settings' header timeout and connection cap.
    In-flight requests get ``drain_timeout_s`` seconds to finish while new completions are
    refused; then 0."""
    import uvicorn  # the ASGI server: only where one runs here (not in a Ray replica)

    from .connections import guarded_protocol

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # /health says so and new completions get 503 while in-flight ones finish
            app.state.served.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=settings.drain_timeout_s,
        lifespan="on",
        http=guarded_protocol(settings.header_timeout_s, settings.max_connections),
    )
    server = DrainingServer(config)
    # uvicorn re-raises the signal it stopped on once it has drained; the default action of that
    # second SIGTERM would kill us with status -15. A no-op handler lets a drained server exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=sockets)
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m gpt2_edge.serve``: the same options as ``gpt2-edge serve``."""
    p = argparse.ArgumentParser(
        prog="python -m gpt2_edge.serve", description="gpt2-edge serve (torch-free entry)"
    )
    add_serve_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (Gpt2EdgeError, OSError) as e:
        print(f"gpt2-edge serve: error: {e}", file=sys.stderr)
        return 2
