"""serve/admission.py, the KV memory: admission keeps rows x tokens within ``kv_budget`` (a
sequence that does not fit waits, and the ones behind it), the in-place cache grows (``reserve``)
to what the running sequences need and an idle server shrinks back; outputs stay those of
Generator alone. (The prefix cache: test_prefix_cache.py.)"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")

from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.kv_cache import CacheError, InPlaceCache
from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.runtime.types import is_resizable
from gpt2_edge.serve.engine import Engine
from gpt2_edge.serve.settings import ServeSettings, SettingsError
from tests.serve.helpers import Run

pytestmark = pytest.mark.filterwarnings("ignore")

TEXT = "We are accounted poor citizens, the patricians good. What authority surfeits on would relieve us. "


@pytest.fixture(scope="module")
def concat_gen(concat_bundle) -> Generator:
    return Generator.from_bundle(str(concat_bundle), threads=1)


def greedy(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n)  # eos cannot end it early


# the cache -----------------------------------------------------------------------------------
def test_reserve_grows_and_shrinks_keeping_what_slots_hold(gen):
    """Slots prefilled in a small cache, the cache grown (more rows, more tokens) and shrunk again:
    every step's logits equal those of a cache of the full size all along (bitwise)."""
    ids = gen.tokenizer.encode(TEXT)
    full = gen.backend.new_cache(4, 64)
    small = gen.backend.new_cache(4, 64)
    assert isinstance(small, InPlaceCache) and is_resizable(small)
    small.reserve(16, 2)
    assert (small.n_slots, small.capacity) == (2, 16)
    a, b = ids[:9], ids[3:8]
    np.testing.assert_array_equal(small.prefill([0, 1], [a, b]), full.prefill([0, 1], [a, b]))
    with pytest.raises(CacheError):
        small.prefill([2], [a])  # no row 2 yet
    small.reserve(40, 4)  # grown: rows 0 and 1 copied, once
    assert small.buffers[0].shape[0] == 4 and small.buffers[0].shape[2] == 40
    np.testing.assert_array_equal(small.prefill([3], [ids[:20]]), full.prefill([3], [ids[:20]]))
    for t in range(6):
        tok = [ids[20 + t], ids[30 + t], ids[40 + t]]
        np.testing.assert_array_equal(small.decode([0, 1, 3], tok), full.decode([0, 1, 3], tok))
    small.release(3)
    full.release(3)
    with pytest.raises(CacheError):
        small.reserve(40, 1)  # slot 1 is held
    with pytest.raises(CacheError):
        small.reserve(8, 2)  # slot 0 holds 15 tokens
    small.reserve(32, 2)
    np.testing.assert_array_equal(small.decode([0, 1], [5, 6]), full.decode([0, 1], [5, 6]))
    assert small.bytes_per_token == sum(b.shape[1] * b.shape[3] * b.itemsize for b in small.buffers)


# the scheduler ------------------------------------------------------------------------------------
def test_the_cache_grows_with_the_work_and_shrinks_when_idle(gen):
    """Starts at one slot of 8 tokens; four sequences of 10 + 12 tokens grow it once to 4 slots of
    32; idle, it goes back to 1 x 8 (no prefix cache to keep); outputs equal Generator alone."""
    run = Run(gen, max_batch=8, max_queue=8, initial_capacity=8, idle_shrink_s=0.0, prefix_cache=False)
    ids = gen.tokenizer.encode(TEXT)
    jobs = [(f"s{i}", ids[i : i + 10], greedy(12)) for i in range(4)]
    run.engine.start()
    try:
        assert run.engine.kv_tokens_allocated == 8
        run.engine.submit([run.sequence(n, p, c) for n, p, c in jobs])
        run.wait()
        assert run.peak_kv == 4 * 32
        deadline = time.monotonic() + 10
        while run.engine.kv_tokens_allocated != 8:
            assert time.monotonic() < deadline, run.engine.kv_tokens_allocated
            time.sleep(0.01)
    finally:
        run.engine.close()
    for name, prompt, cfg in jobs:
        assert run.tokens[name] == gen.generate(prompt, cfg)[0].token_ids, name


@pytest.mark.parametrize("kv", ["inplace", "concat"])
def test_a_sequence_that_does_not_fit_the_budget_waits_and_never_fails(gen, concat_gen, kv):
    """A budget of two whole contexts, four slots and six sequences of 30 + 30 tokens (64 each, as
    rounded up): at most two run at once, none fails, every output equals Generator alone; a short
    one queued behind them waits its turn (oldest first)."""
    g = gen if kv == "inplace" else concat_gen
    n_ctx = g.backend.n_ctx
    run = Run(g, max_batch=4, max_queue=8, kv_budget=2 * n_ctx, initial_capacity=8, prefix_cache=False)
    ids = g.tokenizer.encode(TEXT * 2)
    jobs = [(f"long{i}", ids[i : i + 30], greedy(30)) for i in range(6)]
    jobs.append(("short", ids[:3], greedy(3)))
    run.engine.start()
    try:
        run.engine.submit([run.sequence(n, p, c) for n, p, c in jobs])
        run.wait()
    finally:
        run.engine.close()
    assert run.peak_active <= 2
    assert run.peak_kv <= 2 * n_ctx
    for name, prompt, cfg in jobs:
        assert run.tokens[name] == g.generate(prompt, cfg)[0].token_ids, name


def test_the_budget_must_hold_one_context(gen):
    with pytest.raises(Exception, match="kv_budget"):
        Engine(gen.backend, n_ctx=gen.backend.n_ctx, kv_budget=gen.backend.n_ctx - 1)


# settings, CLI, metrics --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kv_budget": 0}, "kv_budget"),
        ({"kv_budget": 1.5}, "kv_budget"),
        ({"prefix_cache_blocks": -1}, "prefix_cache_blocks"),
        ({"prefix_cache": "yes"}, "prefix_cache"),
    ],
)
def test_settings_refuse_bad_kv_values(changes, field):
    with pytest.raises(SettingsError) as e:
        ServeSettings(**changes)
    assert e.value.field == field


def test_cli_flags_reach_the_settings():
    from gpt2_edge.serve.cli import add_serve_arguments, settings_from_args

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    s = settings_from_args(p.parse_args(["b"]), None)
    assert (s.kv_budget, s.prefix_cache, s.prefix_cache_blocks) == (None, True, 32)
    args = p.parse_args(["b", "--kv-budget", "4096", "--no-prefix-cache", "--prefix-cache-blocks", "4"])
    s = settings_from_args(args, None)
    assert (s.kv_budget, s.prefix_cache, s.prefix_cache_blocks) == (4096, False, 4)
    assert ServeSettings(**s.as_dict()) == s


def test_ray_build_args_take_the_kv_settings():
    pytest.importorskip("ray")
    from gpt2_edge.serve.ray_app import BuildArgs

    values = BuildArgs.model_validate(
        {"bundle": "b", "kv_budget": "2048", "prefix_cache": "false", "prefix_cache_blocks": "3"}
    ).model_dump()
    assert (values["kv_budget"], values["prefix_cache"], values["prefix_cache_blocks"]) == (2048, False, 3)


def test_metrics_and_health_show_kv_tokens(inplace_bundle):
    from fastapi.testclient import TestClient

    from gpt2_edge.runtime.loader import load_model
    from gpt2_edge.serve.app import create_app

    model = load_model(inplace_bundle, threads=1, name="tiny")
    app = create_app(model, ServeSettings(allowed_hosts=("testserver",), kv_budget=4 * model.n_ctx))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "O", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        text = client.get("/metrics").text
        health = client.get("/health").json()
    assert "gpt2_edge_kv_tokens_allocated " in text
    assert f"gpt2_edge_kv_budget_tokens {float(4 * model.n_ctx)}" in text
    assert 'gpt2_edge_prefix_cache_lookups_total{result="miss"} 1.0' in text
    assert health["kv_budget"] == 4 * model.n_ctx and 0 < health["kv_tokens_allocated"] <= 4 * model.n_ctx


# KVMemory.plan without a model -----------------------------------------------------------------
class FakeConcatCache:
    """A concatenating cache's shape alone: each slot's length."""

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self.lengths = [0] * n_slots

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0


class FakeBackend:
    n_ctx = 64

    def new_cache(self, n_slots: int, capacity: int) -> FakeConcatCache:
        return FakeConcatCache(n_slots)


def test_admission_keeps_rows_times_the_longest_sequence_within_the_budget():
    from collections import deque

    from gpt2_edge.serve.admission import KVMemory
    from gpt2_edge.serve.scheduler import Scheduler
    from gpt2_edge.serve.sequences import SequenceHandle

    def seq(prompt_len: int, new: int) -> SequenceHandle:
        return SequenceHandle(list(range(1, prompt_len + 1)), GenerationConfig(max_new_tokens=new),
                              lambda _e: None, eos_token_id=None, detokenize=lambda ids: "")  # fmt: skip

    memory = KVMemory(FakeBackend(), n_ctx=64, max_batch=4, kv_budget=96)
    memory.new_cache()
    scheduler = Scheduler(memory, n_ctx=64, max_batch=4)
    a, b, c, d = seq(10, 10), seq(20, 12), seq(40, 24), seq(4, 4)  # needs 20, 32, 64, 8
    waiting = deque([a, b, c, d])
    plan = scheduler.schedule(waiting)
    # 2 rows x 32 fit; c beside them would be 3 rows x 64 > 96: it waits, and d behind it
    assert [s for s, _, _ in plan.admit] == [a, b] and list(waiting) == [c, d]
    scheduler.leave(0)
    scheduler.leave(1)
    plan = scheduler.schedule(waiting)
    assert [s for s, _, _ in plan.admit] == [c] and list(waiting) == [d]  # 2 x 64 > 96: d waits
