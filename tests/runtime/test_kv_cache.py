"""KV caches: in place vs concatenating, slots, no reallocation, one Generator across threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.kv_cache import CacheError, InPlaceCache
from gpt2_edge.runtime.sampling import GenerationConfig

pytestmark = pytest.mark.filterwarnings("ignore")

PROMPTS = ["First Citizen:", "All:\nSpeak", "We are accounted poor citizens, the patricians good.", "O"]


@pytest.fixture(scope="module")
def bundles(inplace_bundle, concat_bundle):
    return {"inplace": inplace_bundle, "concat": concat_bundle}


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


# chunked prefill: extend ------------------------------------------------------------------------
def last_logits(backend, ids: list[int]) -> np.ndarray:
    """The next-token logits of ``ids`` run whole from an empty cache (the reference)."""
    return backend.logits(np.asarray([ids], np.int64))[0, -1]


def assert_close(got: np.ndarray, seqs: dict[int, list[int]], slots: list[int], backend) -> None:
    assert got.shape[0] == len(slots)
    for row, slot in zip(got, slots, strict=True):
        want = last_logits(backend, seqs[slot])
        diff = float(np.abs(row - want).max())
        assert diff <= 1e-4, f"slot {slot}: max |diff| {diff:.2e}; first got {row[:3]}, want {want[:3]}"


@pytest.mark.parametrize("kv", ["inplace", "concat"])
def test_extend_in_chunks_equals_one_shot_prefill(gens, kv):
    """A 40-token prompt prefilled in chunks of 7 while another slot decodes between the chunks; then
    two slots (not neighbours) extended in one call by chunks of different lengths; then a decode of
    every slot: each step's logits equal the sequence run whole (fp32, 1e-4)."""
    backend = gens[kv].backend
    rng = np.random.default_rng(0)
    vocab = gens[kv].tokenizer.vocab_size
    long = rng.integers(0, vocab, 40).tolist()
    cache = backend.new_cache(4, 64)
    seqs = {2: [5, 6, 7], 0: long[:7]}
    assert_close(cache.prefill([2], [seqs[2]]), seqs, [2], backend)
    assert_close(cache.prefill([0], [seqs[0]]), seqs, [0], backend)
    for start in range(7, len(long), 7):
        chunk = long[start : start + 7]
        seqs[0] += chunk
        assert_close(cache.extend([0], [chunk]), seqs, [0], backend)
        token = int(rng.integers(vocab))
        seqs[2].append(token)
        assert_close(cache.decode([2], [token]), seqs, [2], backend)
    assert cache.length(0) == 40 and cache.length(2) == 8
    seqs[3] = [1, 2]
    assert_close(cache.prefill([3], [seqs[3]]), seqs, [3], backend)
    seqs[3] += [9, 8, 7, 6, 5]
    seqs[0] += [4]
    assert_close(cache.extend([3, 0], [[9, 8, 7, 6, 5], [4]]), seqs, [3, 0], backend)
    tokens = [int(t) for t in rng.integers(0, vocab, 3)]
    for s, t in zip([0, 2, 3], tokens, strict=True):
        seqs[s].append(t)
    assert_close(cache.decode([0, 2, 3], tokens), seqs, [0, 2, 3], backend)


def test_concat_cache_compacts_the_gaps_of_idle_rows(gens):
    """Rows idle during another row's chunks get masked columns; the batch never grows past its
    capacity: when the gaps are in the way it is re-padded without them, logits unchanged."""
    backend = gens["concat"].backend
    cache = backend.new_cache(3, 20)
    seqs = {0: list(range(10, 20)), 1: [3, 4]}
    cache.prefill([0], [seqs[0]])
    cache.prefill([1], [seqs[1]])
    widths = []
    for chunk in ([5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15]):
        seqs[1] += chunk
        assert_close(cache.extend([1], [chunk]), seqs, [1], backend)
        seqs[0].append(chunk[0])
        assert_close(cache.decode([0], [chunk[0]]), seqs, [0], backend)
        widths.append(cache._mask.shape[1])
    assert max(widths) <= 20 and widths[-1] < widths[-2] + 4  # the last chunk needed a re-pad
    assert [cache.length(0), cache.length(1)] == [13, 13]


@pytest.mark.parametrize("kv", ["inplace", "concat"])
def test_extend_misuse_is_refused(gens, kv):
    cache = gens[kv].backend.new_cache(2, 8)
    with pytest.raises(CacheError, match="slot 0 is empty"):
        cache.extend([0], [[1, 2]])
    cache.prefill([0], [[1, 2, 3]])
    with pytest.raises(CacheError, match="is empty"):
        cache.extend([0], [[]])
    with pytest.raises(CacheError, match="does not fit"):
        cache.extend([0], [list(range(6))])
    with pytest.raises(CacheError, match="repeat"):
        cache.extend([0, 0], [[1], [2]])
    cache.extend([0], [list(range(5))])
    assert cache.length(0) == 8
    if kv == "concat":  # a full row in the one batch leaves no room for another row's chunk
        cache.prefill([1], [[4]])
        with pytest.raises(CacheError, match="slot 0 is full"):
            cache.extend([1], [[5, 6]])
