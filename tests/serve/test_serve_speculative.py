"""Speculative decoding (prompt lookup) inside the server's continuous batching: rows verify
different numbers of drafted tokens in one pass, join and leave the batch, and every sequence gets
plain decoding's tokens, text, finish and log-probabilities; a seeded sampled sequence gets the same
tokens whatever runs beside it; the request field and the server default; the metrics.

fp32 tiny bundles: a verified chunk and a one-token step agree there to the last bits that matter
(runtime/speculative.py, "Numerics")."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from gpt2_edge.runtime.generator import Generator  # noqa: E402
from gpt2_edge.runtime.sampling import GenerationConfig, log_softmax, openai_generation_config  # noqa: E402
from tests.serve.helpers import SCHEDULER_SHAPES, Run, alone_and_beside, cancel_at, first_multi_token_event  # noqa: E402
from tests.serve.test_serve import joined, metric, post, serving, stream  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

LENGTHS = (20, 7, 33, 12, 25, 16, 9)


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Random prompts of 4..22 tokens that repeat their beginning (prompt lookup finds matches)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (5, 12, 3, 17, 8, 1, 10):
        p = rng.integers(0, vocab - 1, n).tolist()
        out.append(p + p[:5])
    return out


def jobs(gen: Generator) -> list[tuple[str, list[int], GenerationConfig]]:
    """Greedy jobs of other lengths and draft sizes; one ends at a stop string that plain decoding
    meets inside its text, one may end at eos."""
    out = []
    for i, (p, n) in enumerate(zip(prompts(gen.tokenizer.vocab_size), LENGTHS, strict=True)):
        cfg = GenerationConfig(max_new_tokens=n, prompt_lookup=2 + i, ignore_eos=i != 3)
        out.append((f"job{i}", p, cfg))
    name, p, cfg = out[2]
    text = gen.generate(p, dataclasses.replace(cfg, prompt_lookup=0))[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out[2] = (name, p, dataclasses.replace(cfg, stop=(stop,)))
    return out


def plain(gen: Generator, prompt: list[int], cfg: GenerationConfig):
    return gen.generate(prompt, dataclasses.replace(cfg, prompt_lookup=0))[0]


@SCHEDULER_SHAPES
def test_served_greedy_with_prompt_lookup_equals_plain_generator(gen, scheduler):
    """Seven sequences through three slots, joining and leaving, each drafting up to its own k: the
    tokens, the joined pieces, the finish and the log-probabilities are plain decoding's."""
    run = Run(gen, max_batch=3, max_queue=8, **scheduler)
    todo = jobs(gen)
    run.engine.start()
    run.engine.submit([run.sequence(n, p, c, logprobs=2) for n, p, c in todo])
    run.wait(close=True)
    for name, prompt, cfg in todo:
        want = plain(gen, prompt, cfg)
        assert run.tokens[name] == want.token_ids, name
        assert run.text(name) == want.text, name
        assert run.events[name][-1].finish_reason == want.finish_reason, name
        for e in run.events[name]:  # greedy: the chosen token is the most likely one
            assert e.top_logprobs is not None and e.top_logprobs[0] == (e.token, e.logprob)
    assert run.events["job2"][-1].finish_reason == "stop"
    m = run.metrics
    drafted, accepted = m.spec_drafted_tokens._value.get(), m.spec_accepted_tokens._value.get()
    assert 0 < accepted <= drafted
    assert m.generation_tokens._value.get() == sum(len(t) for t in run.tokens.values())
    if "kv_budget" in scheduler:
        assert run.peak_kv <= scheduler["kv_budget"]


def test_a_concatenating_cache_decodes_plainly(concat_bundle):
    """Its cache cannot roll back: the same tokens, nothing drafted."""
    g = Generator.from_bundle(str(concat_bundle), threads=1)
    run = Run(g, max_batch=3, prefill_chunk=5)
    todo = jobs(g)[:4]
    run.engine.start()
    run.engine.submit([run.sequence(n, p, c) for n, p, c in todo])
    run.wait(close=True)
    for name, prompt, cfg in todo:
        assert run.tokens[name] == plain(g, prompt, cfg).token_ids, name
    assert run.metrics.spec_drafted_tokens._value.get() == 0


def test_a_step_gives_several_tokens_each_with_its_own_logprob(gen):
    """A prompt that repeats: the sequence gets more tokens than decode steps, and each token's
    log-probability is the model's at that position (Generator's logits, step by step)."""
    p = prompts(gen.tokenizer.vocab_size)[3]
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True, prompt_lookup=6)
    run = Run(gen, max_batch=2)
    run.engine.start()
    run.engine.submit([run.sequence("a", p, cfg, logprobs=0)])
    run.wait(close=True)
    steps = run.metrics.batch_occupancy._sum.get()  # one sequence: decode steps
    assert steps < len(run.tokens["a"]) - 1  # several tokens in some step
    full = gen.backend.logits(np.asarray([p + run.tokens["a"]], np.int64))[0]
    for i, e in enumerate(run.events["a"]):
        lp = log_softmax(full[len(p) - 1 + i].astype(np.float64))
        assert e.logprob == pytest.approx(float(lp[e.token]), abs=1e-4)


def test_a_seeded_sampled_sequence_is_the_same_alone_and_in_any_batch(gen):
    """The same seeded request alone and among others (greedy and sampled, drafting or not): the
    same tokens, since a sampled sequence drafts what its own rate says, not what the batch's does."""
    vocab = gen.tokenizer.vocab_size
    p = prompts(vocab, seed=3)[1]
    cfg = dataclasses.replace(
        openai_generation_config(max_tokens=30, temperature=0.7, seed=11, ignore_eos=True), prompt_lookup=5
    )
    alone, beside = alone_and_beside(gen, p, cfg, prompts(vocab, seed=4)[:4])
    assert alone.tokens["s"] == beside.tokens["s"]
    assert beside.metrics.spec_drafted_tokens._value.get() > 0


# HTTP: the request field, the server default, streaming, usage, metrics ---------------------------
@pytest.fixture(scope="module")
def server(inplace_bundle):
    with serving(inplace_bundle, max_batch=4, max_queue=8) as s:
        yield s


PROMPT = "All: Speak, speak. All: Speak, speak. All: Speak,"


@pytest.mark.parametrize("value", [-1, 33, "4", 2.5, True])
@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_the_request_field_is_checked(server, value, route):
    body = {"max_tokens": 4, "prompt_lookup": value}
    body.update(
        {"prompt": "O"} if route == "completions" else {"messages": [{"role": "user", "content": "O"}]}
    )
    r = httpx.post(f"{server.url}/v1/{route}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert "prompt_lookup" in r.json()["error"]["message"]


def test_streamed_pieces_join_to_plain_text_with_usage_and_metrics(server, gen):
    drafted = metric(server, "gpt2_edge_spec_decode_draft_tokens_total")
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    want = gen.generate(PROMPT, GenerationConfig(max_new_tokens=30, ignore_eos=True))[0]
    one = post(server, {**body, "prompt_lookup": 6, "logprobs": 1}).json()
    assert one["choices"][0]["text"] == want.text
    assert one["usage"]["completion_tokens"] == 30 == len(one["choices"][0]["logprobs"]["tokens"])
    events = stream(server, {**body, "prompt_lookup": 6, "stream_options": {"include_usage": True}})
    assert events[-2]["usage"]["completion_tokens"] == 30
    assert joined([*events[:-2], "[DONE]"]) == (want.text, "length")
    assert metric(server, "gpt2_edge_spec_decode_draft_tokens_total") > drafted
    assert metric(server, "gpt2_edge_spec_decode_accepted_tokens_total") > 0
    chat = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12, "temperature": 0},
        timeout=30,
    ).json()
    chat_lookup = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 12,
            "temperature": 0,
            "prompt_lookup": 4,
        },
        timeout=30,
    ).json()
    assert chat_lookup["choices"][0]["message"] == chat["choices"][0]["message"]


def test_the_server_default_and_a_request_that_turns_it_off(inplace_bundle, gen):
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    want = gen.generate(PROMPT, GenerationConfig(max_new_tokens=16, ignore_eos=True))[0].text
    with serving(inplace_bundle, max_batch=2, prompt_lookup=6) as s:
        assert post(s, {**body, "prompt_lookup": 0}).json()["choices"][0]["text"] == want
        assert metric(s, "gpt2_edge_spec_decode_draft_tokens_total") == 0
        assert post(s, body).json()["choices"][0]["text"] == want
        assert metric(s, "gpt2_edge_spec_decode_draft_tokens_total") > 0


def test_the_option_reaches_the_settings_and_ray(inplace_bundle, capsys):
    import argparse

    from gpt2_edge.serve.cli import add_serve_arguments, main, settings_from_args
    from gpt2_edge.serve.settings import ServeSettings

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert settings_from_args(p.parse_args(["b"]), None).prompt_lookup == 0
    s = settings_from_args(p.parse_args(["b", "--prompt-lookup", "8"]), None)
    assert s.prompt_lookup == 8 and ServeSettings(**s.as_dict()) == s
    assert main([str(inplace_bundle), "--prompt-lookup", "33"]) == 2
    assert "--prompt-lookup must be <= 32" in capsys.readouterr().err
    if importlib.util.find_spec("ray") is not None:
        from gpt2_edge.serve.ray_app import BuildArgs

        assert (
            BuildArgs.model_validate({"bundle": "b", "prompt_lookup": "6"}).model_dump()["prompt_lookup"] == 6
        )


def test_a_sequence_cancelled_mid_step_frees_its_slot_for_the_next(gen):
    """Cancelled at the first of several tokens one step gave it: no more events, its slot is free,
    and the sequence that takes the slot next gets plain decoding's tokens."""
    _, prompt, cfg = jobs(gen)[3]
    _, first = first_multi_token_event(gen, prompt, cfg)
    run = Run(gen, max_batch=1, max_queue=4)
    cancelled = run.sequence("cancelled", prompt, cfg)
    cancel_at(run, cancelled, "cancelled", first + 1)
    nxt = jobs(gen)[4]
    run.engine.start()
    run.engine.submit([cancelled, run.sequence("next", nxt[1], nxt[2])])
    run.wait(close=True)
    assert len(run.events["cancelled"]) == first + 1
    assert run.tokens["next"] == plain(gen, nxt[1], nxt[2]).token_ids
    assert run.metrics.sequences_finished.labels(reason="cancelled")._value.get() == 1
    assert run.engine.active == 0


def test_a_batch_drafts_less_where_verifying_costs_more(gen):
    """The batch's pass cost per padded drafted position is measured: slow verifying passes (here
    told, not timed) make a batch of four with good drafts stop drafting; the prior returns while
    plain steps run."""
    from gpt2_edge.runtime.draft_policy import TOKEN_COST, Plan, Source
    from gpt2_edge.runtime.speculative import Speculator

    spec_ = Speculator(gen.backend.new_cache(4, 16))
    plans = [Plan(i, 3, Source.new(0.9), 8, 0) for i in range(4)]
    assert spec_._width(plans, 4) > 0
    spec_._measure(4, 0, 0.010)  # a plain step of four rows: 10 ms
    for _ in range(20):
        spec_._measure(4, 2, 0.040)  # drafting two: four times a plain step
    assert spec_.token_cost > 0.3 and spec_._width(plans, 4) == 0
    for _ in range(300):
        spec_._measure(4, 0, 0.010)
    assert abs(spec_.token_cost - TOKEN_COST) < 0.01 and spec_._width(plans, 4) > 0


def test_eos_during_speculation_ends_where_plain_decoding_ends(inplace_bundle):
    """A token a penalised continuation emits late made the end-of-text token: with prompt lookup
    (drafts verified under the repetition penalty) the sequence ends at its first occurrence with
    plain decoding's tokens, text and finish. (Stop strings inside accepted drafts: above.)"""
    g = Generator.from_bundle(str(inplace_bundle), threads=1)
    for p in prompts(g.tokenizer.vocab_size, seed=2)[:3]:
        cfg = GenerationConfig(max_new_tokens=40, repetition_penalty=2.0, prompt_lookup=6)
        out = plain(g, p, dataclasses.replace(cfg, ignore_eos=True)).token_ids
        g.model.eos_token_id = next(t for i, t in enumerate(out) if i >= 8 and t not in out[:i])
        want = plain(g, p, cfg)
        run = Run(g, max_batch=2)
        run.engine.start()
        run.engine.submit([run.sequence("a", p, cfg), run.sequence("b", p[::-1], cfg)])
        run.wait(close=True)
        assert run.tokens["a"] == want.token_ids and run.text("a") == want.text
        assert run.events["a"][-1].finish_reason == want.finish_reason == "eos"
        assert run.tokens["b"] == plain(g, p[::-1], cfg).token_ids
