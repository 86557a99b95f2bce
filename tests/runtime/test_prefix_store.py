"""A ``Generator``'s opt-in prefix cache (runtime/prefix_cache.py ``KVStore``): prompts that begin
like an earlier call's sequence start from its stored KV rows; the output is the same as without
it, bitwise in the logits' choices, for every batch-invariant precision; the store stays within
its token bound, evicting the least recently used entry first."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.prefix_cache import KVStore
from gpt2_edge.runtime.sampling import GenerationConfig
from tests.bundles import spec

pytestmark = pytest.mark.filterwarnings("ignore")
PRECISIONS = ("fp32", "int8-dynamic", "int8-weight", "int4")


def ids(n: int, seed: int, vocab: int = 290) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_reused_prefixes_give_the_same_output(make_bundle, precision):
    path = str(make_bundle(spec(precision=precision)))
    plain = Generator.from_bundle(path, threads=1)
    cached = Generator(replace(plain.model, prefix_store=KVStore(4096)))
    doc = ids(36, 1)  # the tiny model's context is 64 tokens; the store reuses 32+
    prompts = [doc + ids(5, 2), doc + ids(9, 3), doc[:33] + ids(8, 4), ids(30, 5)]
    for cfg in (
        GenerationConfig(max_new_tokens=10, ignore_eos=True),
        GenerationConfig(max_new_tokens=10, do_sample=True, seed=7, top_k=20, ignore_eos=True),
    ):
        for p in prompts:  # one at a time: each later prompt can start from an earlier one
            want = plain.generate(p, cfg)[0]
            got = cached.generate(p, cfg)[0]
            assert got.token_ids == want.token_ids and got.text == want.text
        batch = cached.generate(prompts, cfg)  # a batch mixing reused and fresh prompts
        assert [r.token_ids for r in batch] == [r.token_ids for r in plain.generate(prompts, cfg)]
    store = cached.prefix_cache
    assert store is not None and store.hits >= 4 and store.reused_tokens >= 4 * 32
    assert batch[0].timings["prefix_reused_tokens"] > 0
    # the prompt itself again: everything but its last token comes from the store
    again = cached.generate(prompts[0], GenerationConfig(max_new_tokens=3))[0]
    assert again.timings["prefix_reused_tokens"] == len(prompts[0]) - 1


def test_streaming_and_speculation_use_the_store(inplace_bundle):
    plain = Generator.from_bundle(str(inplace_bundle), threads=1)
    cached = Generator(replace(plain.model, prefix_store=KVStore(2048)))
    doc = ids(36, 8)
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True, prompt_lookup=3)
    cached.generate(doc + ids(3, 9), cfg)
    p = doc + ids(4, 10)
    assert (
        "".join(cached.stream(p, cfg))
        == plain.generate(p, GenerationConfig(max_new_tokens=10, ignore_eos=True))[0].text
    )
    assert cached.prefix_cache.hits == 1


def test_the_store_is_bounded_and_evicts_the_least_recently_used():
    def rows(n: int):
        return lambda: [np.full((2, n, 4), n, np.float32)]

    store = KVStore(max_tokens=200, min_match=8)
    a, b, c = ids(80, 11), ids(80, 12), ids(80, 13)
    assert store.store(a, rows(80)) and store.store(b, rows(80))
    assert store.lookup([*a, 1]) is not None  # a is now the most recently used
    assert store.store(c, rows(80))  # 240 > 200: b goes
    assert store.total_tokens == 160 and store.lookup([*b, 1]) is None
    n, arrays = store.lookup([*c, 5, 6])
    assert n == 80 and arrays[0].shape == (2, 80, 4)
    assert not store.store(c[:40], rows(40))  # covered by c already
    assert store.store(c + ids(10, 14), rows(90))  # extends c: replaces it
    assert len(store) == 2 and store.total_tokens == 170
    assert not store.store(ids(300, 15), rows(300))  # larger than the whole store
    assert not store.store(ids(5, 16), rows(5))  # under min_match
    assert store.hits == 2 and store.misses == 1


def test_a_concatenating_cache_ignores_the_store(concat_bundle):
    gen = Generator.from_bundle(str(concat_bundle), threads=1, prefix_cache=1024)
    p = ids(40, 17)
    first = gen.generate(p, GenerationConfig(max_new_tokens=5))[0]
    assert gen.generate(p, GenerationConfig(max_new_tokens=5))[0].token_ids == first.token_ids
    assert gen.prefix_cache.hits == 0 and len(gen.prefix_cache) == 0


@pytest.mark.parametrize("precision", ("fp32", "int8-dynamic"))
def test_a_reused_prefill_gives_bitwise_the_same_logits(make_bundle, precision):
    from gpt2_edge.runtime.generator import _prefill_reusing

    backend = Generator.from_bundle(str(make_bundle(spec(precision=precision))), threads=1).backend
    doc = ids(40, 18)
    prompts = [doc + ids(6, 19), ids(20, 20), doc[:35] + ids(9, 21)]
    want = backend.new_cache(3, 64).prefill([0, 1, 2], prompts)
    store = KVStore(1000)
    seed = backend.new_cache(1, 64)
    seed.prefill([0], [doc])
    store.store(doc, lambda: seed.read_prefix(0, len(doc)))
    got, reused = _prefill_reusing(backend.new_cache(3, 64), prompts, store)
    assert reused == 40 + 35 and np.array_equal(got, want)


def test_a_bad_size_is_refused_in_one_line(inplace_bundle):
    from gpt2_edge.errors import Gpt2EdgeError

    for bad in (-1, 2.5, True, "64"):
        with pytest.raises(Gpt2EdgeError, match="prefix_cache must be a number of tokens"):
            Generator.from_bundle(str(inplace_bundle), threads=1, prefix_cache=bad)
    assert Generator.from_bundle(str(inplace_bundle), threads=1, prefix_cache=0).prefix_cache is None
