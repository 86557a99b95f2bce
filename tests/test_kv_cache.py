"""KV caches: in place vs concatenating, slots, no reallocation, one Generator across threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gpt2_edge.export.bundle import export_bundle
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.kv_cache import CacheError, InPlaceCache
from gpt2_edge.runtime.sampling import GenerationConfig

pytestmark = pytest.mark.filterwarnings("ignore")

PROMPTS = ["First Citizen:", "All:\nSpeak", "We are accounted poor citizens, the patricians good.", "O"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_checkpoint):
    d = tmp_path_factory.mktemp("kv")
    return {
        kv: export_bundle(tiny_checkpoint, d / kv, kv_cache=kv, log=lambda _: None)
        for kv in ("inplace", "concat")
    }


@pytest.fixture(scope="module")
def gens(bundles):
    return {kv: Generator.from_bundle(str(b), threads=1) for kv, b in bundles.items()}


def test_inplace_and_concat_give_the_same_greedy_tokens(gens):
    cfg = GenerationConfig(max_new_tokens=20)
    a = gens["inplace"].generate(PROMPTS, cfg)
    b = gens["concat"].generate(PROMPTS, cfg)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    # and each row of a batch equals the prompt run alone
    alone = [gens["inplace"].generate(p, cfg)[0].token_ids for p in PROMPTS]
    assert alone == [r.token_ids for r in a]


def test_beam_search_same_in_both_forms(gens):
    cfg = GenerationConfig(max_new_tokens=10, num_beams=3)
    assert gens["inplace"].generate(PROMPTS[0], cfg)[0].token_ids == (
        gens["concat"].generate(PROMPTS[0], cfg)[0].token_ids
    )


def test_inplace_cache_is_allocated_once_and_written_in_place(gens):
    backend = gens["inplace"].backend
    made: list[InPlaceCache] = []
    real = backend.new_cache

    def spy(n_slots, capacity):
        cache = real(n_slots, capacity)
        made.append(cache)
        return cache

    backend.new_cache = spy
    try:
        gens["inplace"].generate(PROMPTS[:2], GenerationConfig(max_new_tokens=12))
    finally:
        del backend.new_cache
    (cache,) = made
    ptrs = [b.ctypes.data for b in cache.buffers]
    lengths = [cache.length(0), cache.length(1)]
    assert lengths == [len(gens["inplace"].tokenizer.encode(p)) + 11 for p in PROMPTS[:2]]
    # the presents were written into the caller's buffers: they are non-zero up to each length
    for b in cache.buffers:
        assert np.abs(b[0, :, : lengths[0]]).sum() > 0 and not b[0, :, lengths[0] :].any()
    # one more decode step writes the same memory
    cache.decode([0], [1])
    assert [b.ctypes.data for b in cache.buffers] == ptrs and cache.length(0) == lengths[0] + 1


def test_slot_misuse_is_refused(gens):
    cache = gens["inplace"].backend.new_cache(2, 8)
    with pytest.raises(CacheError, match="slot 0 is empty"):
        cache.decode([0], [1])
    cache.prefill([0], [[1, 2, 3]])
    with pytest.raises(CacheError, match="busy"):
        cache.prefill([0], [[1]])
    with pytest.raises(CacheError, match="does not fit"):
        cache.prefill([1], [list(range(9))])
    for _ in range(5):
        cache.decode([0], [4])
    with pytest.raises(CacheError, match="full"):
        cache.decode([0], [4])
    cache.release(0)
    cache.prefill([0], [[5]])  # a released slot takes a new sequence


@pytest.mark.parametrize("kv", ["inplace", "concat"])
def test_one_generator_serves_many_threads(gens, kv):
    """8 threads x mixed greedy / sampled / streamed calls give exactly the serial results."""
    gen = gens[kv]
    jobs = []
    for i in range(8):
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 3 == 0:
            jobs.append(("generate", prompt, GenerationConfig(max_new_tokens=16)))
        elif i % 3 == 1:
            jobs.append(("generate", prompt, GenerationConfig(max_new_tokens=16, do_sample=True, seed=i)))
        else:
            jobs.append(("stream", prompt, GenerationConfig(max_new_tokens=16, do_sample=True, seed=i)))

    def run(job):
        kind, prompt, cfg = job
        if kind == "generate":
            return gen.generate(prompt, cfg)[0].text
        return "".join(gen.stream(prompt, cfg))

    serial = [run(j) for j in jobs]
    results: list[str | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def worker(i):
        try:
            start.wait()
            for _ in range(3):
                results[i] = run(jobs[i])
                assert results[i] == serial[i]
        except BaseException as e:  # surfaced below with the thread's index
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == serial


def test_two_interleaved_streams_give_their_serial_texts(gens):
    gen = gens["inplace"]
    cfg_a = GenerationConfig(max_new_tokens=20)
    cfg_b = GenerationConfig(max_new_tokens=20, do_sample=True, seed=4)
    want_a = gen.generate(PROMPTS[0], cfg_a)[0].text
    want_b = gen.generate(PROMPTS[1], cfg_b)[0].text
    a, b = gen.stream(PROMPTS[0], cfg_a), gen.stream(PROMPTS[1], cfg_b)
    got_a: list[str] = []
    got_b: list[str] = []
    live = [(a, got_a), (b, got_b)]
    while live:  # strictly alternating while both run
        for it, out in list(live):
            piece = next(it, None)
            if piece is None:
                live.remove((it, out))
            else:
                out.append(piece)
    assert "".join(got_a) == want_a and "".join(got_b) == want_b


def test_generate_takes_token_ids(gens):
    gen = gens["inplace"]
    ids = gen.tokenizer.encode(PROMPTS[0])
    cfg = GenerationConfig(max_new_tokens=8)
    assert gen.generate(ids, cfg)[0].token_ids == gen.generate(PROMPTS[0], cfg)[0].token_ids
    assert len(gen.generate([ids, [1, 2]], cfg)) == 2
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate([10**6], cfg)
    with pytest.raises(TypeError, match="token ids"):
        gen.generate([[1, "a"]], cfg)
