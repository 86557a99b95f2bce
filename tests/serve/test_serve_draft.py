"""A draft model inside the server's continuous batching (``serve --draft``): every sequence gets the
tokens ``Generator`` gives with the same draft (greedy: plain decoding's), a seeded sampled one the
same tokens alone and in any batch; the draft's KV cache follows the server's (its shape as the
cache grows and shrinks, rows rolled back on rejection, released with the slot, prefilled where the
prefix cache copied the target's rows); the metrics; the option, the settings and the refusals.

The draft "same" is the served model itself, told it is cheap (``cost``): its greedy drafts are the
target's own picks, so every one of them is accepted exactly where its cache holds the right rows
(a stale, missing or unrolled row would make it draft something else). "other" is another random
model with the same tokenizer: its drafts are mostly rejected (rollbacks, back-off). fp32 tiny
bundles: a verified chunk and a one-token step agree there to the last bits that matter
(runtime/speculative.py, "Numerics")."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from gpt2_edge.runtime.bundle import sha256_file  # noqa: E402
from gpt2_edge.runtime.generator import Generator  # noqa: E402
from gpt2_edge.runtime.loader import load_model  # noqa: E402
from gpt2_edge.runtime.sampling import GenerationConfig, openai_generation_config  # noqa: E402
from gpt2_edge.runtime.speculative import DraftModel  # noqa: E402
from gpt2_edge.serve.app import ServeSettings, create_app  # noqa: E402
from tests.bundles import ModelSpec, spec  # noqa: E402
from tests.serve.helpers import SCHEDULER_SHAPES, Run, alone_and_beside, cancel_at, first_multi_token_event  # noqa: E402
from tests.serve.test_serve import Server, metric, post, stream  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

OTHER_MODEL = spec(model=ModelSpec(seed=5))  # another random model with the same tokenizer
CHEAP = 0.1  # the draft's pass in target passes: what a draft ~10x smaller than its target costs
LENGTHS = (20, 1, 33, 2, 25, 3, 16, 9)


@pytest.fixture(scope="module")
def drafts(bundle, make_bundle) -> dict[str, DraftModel]:
    same = DraftModel.from_bundle(bundle, max_tokens=5, threads=1)
    other = DraftModel.from_bundle(make_bundle(OTHER_MODEL), max_tokens=3, threads=1)
    for d in (same, other):
        d.cost = CHEAP
    return {"same": same, "other": other}


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Random prompts of 4..22 tokens that repeat their beginning (prompt lookup finds matches)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (5, 12, 3, 17, 8, 1, 10, 6):
        p = rng.integers(0, vocab - 1, n).tolist()
        out.append(p + p[:5])
    return out


def jobs(gen: Generator) -> list[tuple[str, list[int], GenerationConfig]]:
    """Greedy jobs of other lengths (1, 2 and 3 tokens among them); some also ask for prompt lookup,
    two repeat another's prompt (the prefix cache's hits where its block is small)."""
    ps = prompts(gen.tokenizer.vocab_size)
    ps[3] = ps[0] + ps[3]  # begins with job0's prompt
    ps[7] = ps[2] + ps[7]
    out = []
    for i, (p, n) in enumerate(zip(ps, LENGTHS, strict=True)):
        cfg = GenerationConfig(max_new_tokens=n, prompt_lookup=3 * (i % 3), ignore_eos=i != 6)
        out.append((f"job{i}", p, cfg))
    return out


def with_draft(gen: Generator, draft: DraftModel) -> Generator:
    return Generator(replace(gen.model, draft=draft))


def check_draft_rows(run: Run, draft: DraftModel) -> list[tuple[int, int]]:
    """Before each decode step (on the scheduler thread): the draft's cache has the scheduler's shape,
    and every draft row holds the draft model's KV of its sequence's tokens (as a fresh prefill of
    them computes it): what growth, rollbacks, released slots and prefix-cache hits left there.
    The target's shapes seen come back."""
    engine, shapes = run.engine, []
    decode = engine.executor.decode

    def checked(slots, indices: list[int]):
        spec_, cache = engine.executor.spec, engine.kv.cache
        mine = spec_._draft_cache
        shapes.append((cache.n_slots, cache.capacity))
        assert (mine.n_slots, mine.capacity) == (cache.n_slots, min(cache.capacity, draft.backend.n_ctx))
        for slot in engine.scheduler.slots:
            row = slot.seq.state.speculation if slot.seq is not None else None
            n = row.draft_len if row is not None else 0
            assert n == mine.length(slot.index) <= cache.length(slot.index)
            if n:
                fresh = draft.backend.new_cache(1, n)
                fresh.prefill([0], [slot.seq.state.seen[:n]])
                for a, b in zip(mine.read_prefix(slot.index, n), fresh.read_prefix(0, n), strict=True):
                    np.testing.assert_allclose(a, b, atol=1e-4)
        return decode(slots, indices)

    engine.executor.decode = checked
    return shapes


@pytest.mark.parametrize("name", ["same", "other"])
@SCHEDULER_SHAPES
def test_served_greedy_with_a_draft_equals_the_generator_with_it(gen, drafts, name, scheduler):
    """Eight sequences through three slots, joining and leaving, drafted by the model (and by prompt
    lookup where they ask): the tokens, text and finish of ``Generator`` with the same draft, which
    are plain decoding's; never more than max_tokens; the draft's cache follows the scheduler's
    (``check_draft_rows``)."""
    draft = drafts[name]
    run = Run(gen, max_batch=3, max_queue=8, draft=draft, **scheduler)
    shapes = check_draft_rows(run, draft)
    todo = jobs(gen)
    run.engine.start()
    # two waves: job3, the second's first, finds job0's released rows (the prefix cache)
    run.engine.submit([run.sequence(n, p, c) for n, p, c in todo[:3]])
    run.wait()
    run.engine.submit([run.sequence(n, p, c) for n, p, c in todo[3:]])
    run.wait()
    spec_ = run.engine.executor.spec
    run.engine.close()
    reference = with_draft(gen, draft)
    for job, prompt, cfg in todo:
        want = reference.generate(prompt, cfg)[0]
        assert want.token_ids == gen.generate(prompt, dataclasses.replace(cfg, prompt_lookup=0))[0].token_ids
        assert run.tokens[job] == want.token_ids, job
        assert run.text(job) == want.text, job
        assert run.events[job][-1].finish_reason == want.finish_reason, job
        assert len(run.tokens[job]) <= cfg.max_new_tokens
    m = run.metrics
    drafted, accepted = m.spec_drafted_tokens._value.get(), m.spec_accepted_tokens._value.get()
    assert drafted > 0
    if name == "same":  # right rows everywhere: every draft is the target's own pick
        assert accepted == drafted
    assert not spec_._draft_cache._len.any()  # every draft row released
    if "kv_budget" in scheduler:
        assert run.peak_kv <= scheduler["kv_budget"]
        assert max(shapes) > (1, scheduler["initial_capacity"])  # it grew, and the draft's with it
        assert run.hits() > 0


def test_the_draft_cache_shrinks_with_the_idle_server(gen, drafts):
    run = Run(gen, max_batch=3, draft=drafts["same"], initial_capacity=8, idle_shrink_s=0.05)
    run.engine.start()
    todo = jobs(gen)[:3]
    run.engine.submit([run.sequence(n, p, c) for n, p, c in todo])
    run.wait()
    deadline = time.monotonic() + 10
    while run.engine.draft_kv_tokens_allocated != 8:  # one slot of the initial capacity
        assert time.monotonic() < deadline, run.engine.draft_kv_tokens_allocated
        time.sleep(0.02)
    assert run.engine.kv_tokens_allocated == 8
    run.engine.close()


def test_a_seeded_sampled_sequence_is_the_same_alone_and_in_any_batch(gen, drafts):
    """Drafted by the model (some drafts rejected: sampling), alone and among others (greedy and
    sampled, with prompt lookup or not): the same tokens, as ``Generator`` gives it with the draft."""
    vocab = gen.tokenizer.vocab_size
    p = prompts(vocab, seed=3)[1]
    cfg = openai_generation_config(max_tokens=30, temperature=0.8, seed=11, ignore_eos=True)
    alone, beside = alone_and_beside(gen, p, cfg, prompts(vocab, seed=4)[:5], draft=drafts["same"])
    assert alone.tokens["s"] == beside.tokens["s"]
    m = beside.metrics
    assert 0 < m.spec_accepted_tokens._value.get() < m.spec_drafted_tokens._value.get()
    again = Run(gen, max_batch=2, draft=drafts["same"])
    again.engine.start()
    again.engine.submit([again.sequence("s", p, cfg)])
    again.wait(close=True)
    assert again.tokens["s"] == alone.tokens["s"]


def test_a_sequence_cancelled_mid_step_frees_its_slot_and_draft_rows(gen, drafts):
    """Cancelled at the first of several tokens one step gave it: no more events, its slot is free,
    and the sequence that takes the slot next gets its tokens with every draft accepted (its draft
    rows are its own, not the cancelled one's)."""
    draft = drafts["same"]
    _, prompt, cfg = jobs(gen)[0]
    dry, first = first_multi_token_event(gen, prompt, cfg, draft=draft)
    run = Run(gen, max_batch=1, max_queue=4, draft=draft)
    cancelled = run.sequence("cancelled", prompt, cfg)
    cancel_at(run, cancelled, "cancelled", first + 1)
    _, nxt, nxt_cfg = jobs(gen)[2]
    run.engine.start()
    run.engine.submit([cancelled, run.sequence("next", nxt, nxt_cfg)])
    run.wait()
    drafted_before = dry.metrics.spec_drafted_tokens._value.get()
    spec_ = run.engine.executor.spec
    run.engine.close()
    assert len(run.events["cancelled"]) == first + 1
    assert run.tokens["next"] == with_draft(gen, draft).generate(nxt, nxt_cfg)[0].token_ids
    assert run.metrics.sequences_finished.labels(reason="cancelled")._value.get() == 1
    m = run.metrics
    assert drafted_before > 0 and m.spec_accepted_tokens._value.get() == m.spec_drafted_tokens._value.get()
    assert run.engine.active == 0 and not spec_._draft_cache._len.any()


# HTTP: the served model with a draft, its metrics, /health ----------------------------------------
PROMPT = "All: Speak, speak. All: Speak, speak. All: Speak,"


@pytest.fixture(scope="module")
def server(bundle):
    model = load_model(bundle, threads=1, name="tiny", draft=bundle, draft_tokens=4)
    assert model.draft is not None and model.draft.cost == 1.0  # as large as the target: attached
    model.draft.cost = CHEAP
    with Server(create_app(model, ServeSettings(max_batch=4, max_queue=8))) as s:
        yield s


def test_served_text_is_the_generators_and_the_metrics_count_the_draft(server, gen, drafts):
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    want = with_draft(gen, drafts["same"]).generate(
        PROMPT, GenerationConfig(max_new_tokens=30, ignore_eos=True)
    )
    assert want[0].timings["spec_drafted"] > 0
    before = metric(server, "gpt2_edge_spec_decode_draft_tokens_total")
    one = post(server, body).json()
    assert one["choices"][0]["text"] == want[0].text
    assert one["usage"]["completion_tokens"] == 30
    events = stream(server, {**body, "prompt_lookup": 4})
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == want[0].text
    drafted = metric(server, "gpt2_edge_spec_decode_draft_tokens_total")
    assert drafted > before and metric(server, "gpt2_edge_spec_decode_accepted_tokens_total") == drafted
    assert metric(server, "gpt2_edge_draft_kv_tokens_allocated") > 0
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["draft_kv_tokens_allocated"] > 0


# the option, the settings, the refusals --------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def other_tokenizer(bundle: Path, to: Path) -> Path:
    """A copy of ``bundle`` whose tokenizer has another added token (its manifest updated): a
    consistent bundle, but not the same vocabulary."""
    shutil.copytree(bundle, to)
    tok = json.loads((to / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"][0]["content"] = "<|something else|>"
    (to / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    manifest = json.loads((to / "bundle.json").read_text(encoding="utf-8"))
    meta = manifest["files"]["tokenizer.json"]
    meta["bytes"], meta["sha256"] = (to / "tokenizer.json").stat().st_size, sha256_file(to / "tokenizer.json")
    (to / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    return to


def corrupt(bundle: Path, to: Path) -> Path:
    shutil.copytree(bundle, to)
    model = to / json.loads((to / "bundle.json").read_text(encoding="utf-8"))["model_file"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    return to


def test_bad_drafts_are_one_line_errors(bundle, concat_bundle, tmp_path, capsys, monkeypatch):
    import gpt2_edge.serve.cli as cli

    def never(*args, **kwargs):  # a refusal missed would serve forever: fail instead
        raise AssertionError("the server started")

    monkeypatch.setattr(cli, "run_app", never)
    cases = [
        ([str(bundle), "--draft", str(tmp_path / "nowhere")], "--draft", "is not a bundle (no bundle.json)"),
        (
            [str(bundle), "--draft", str(corrupt(bundle, tmp_path / "bad"))],
            "bad",
            "does not match its sha256",
        ),
        (
            [str(bundle), "--draft", str(other_tokenizer(bundle, tmp_path / "tok"))],
            "tok",
            "another tokenizer",
        ),
        ([str(bundle), "--draft", str(concat_bundle)], "draft bundle", "concatenating KV cache"),
        ([str(concat_bundle), "--draft", str(bundle)], "--draft", "needs a target whose KV cache rolls back"),
        (
            [str(bundle), "--draft", str(bundle), "--draft-tokens", "0"],
            "--draft-tokens",
            "must be >= 1, got 0",
        ),
        ([str(bundle), "--draft", str(bundle), "--draft-tokens", "33"], "--draft-tokens", "must be <= 32"),
        ([str(bundle), "--draft-tokens", "4"], "--draft-tokens", "needs --draft"),
    ]
    for argv, *says in cases:
        assert cli.main([*argv, "--port", str(free_port()), "--log-level", "error"]) == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("gpt2-edge serve: error: "), err
        assert all(s in lines[0] for s in says), (argv, err)


def test_the_options_reach_the_settings_and_ray(bundle):
    import argparse

    from gpt2_edge.serve.cli import add_serve_arguments, settings_from_args
    from gpt2_edge.serve.settings import SettingsError

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    s = settings_from_args(p.parse_args(["b"]), None)
    assert s.draft is None and s.draft_tokens == 4
    s = settings_from_args(p.parse_args(["b", "--draft", str(bundle), "--draft-tokens", "6"]), None)
    assert (s.draft, s.draft_tokens) == (str(bundle), 6) and ServeSettings(**s.as_dict()) == s
    for bad in ({"draft_tokens": 0}, {"draft_tokens": 2.5}, {"draft": ""}):
        with pytest.raises(SettingsError):
            ServeSettings(**bad)
    if importlib.util.find_spec("ray") is not None:
        from gpt2_edge.serve.ray_app import BuildArgs

        values = BuildArgs.model_validate({"bundle": "b", "draft": "d", "draft_tokens": "3"}).model_dump()
        assert (values["draft"], values["draft_tokens"]) == ("d", 3)
