"""Prefix caching: a prompt that begins with tokens another sequence prefilled starts from a copy
of their KV and prefills only the rest. The output is the same with it, without it, and from
Generator alone (in-place bundles are batch-invariant and causal: checked bitwise here)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")

from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.prefix_cache import PrefixCache, PrefixMatch, common_prefix
from gpt2_edge.runtime.sampling import GenerationConfig, openai_generation_config
from tests.serve.helpers import Run

pytestmark = pytest.mark.filterwarnings("ignore")

SYSTEM = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
PRECISIONS = ["fp32", "int8-dynamic"]


@pytest.fixture(scope="module", params=PRECISIONS)
def gen(request, make_bundle) -> Generator:
    return Generator.from_bundle(str(make_bundle(precision=request.param)), threads=1)


# the bookkeeping --------------------------------------------------------------------------------
def test_prefix_cache_matches_the_longest_prefix_and_evicts_lru():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0
    pc = PrefixCache(min_match=3)
    pc.put(0, [1, 2, 3, 4, 5, 6])
    pc.put(1, [1, 2, 3, 9])
    pc.put(2, [7, 7])  # under min_match: not kept
    assert 2 not in pc and len(pc) == 2 and pc.lru() == [0, 1]
    assert pc.match([1, 2, 3, 4, 5, 0]) == PrefixMatch(0, 5)
    assert pc.match([1, 2, 3, 4, 5, 6]) == PrefixMatch(0, 5)  # the last token is left to prefill
    assert pc.match([1, 2, 3, 9, 9]) == PrefixMatch(1, 4)
    assert pc.match([1, 2, 8]) is None  # 2 < min_match
    assert pc.match([1, 2, 3, 4, 5, 0], skip={0}) == PrefixMatch(1, 3)
    assert pc.match([5, 5, 5, 5, 1], extra=[(7, [5, 5, 5, 5])]) == PrefixMatch(7, 4)  # a running slot
    assert pc.hits == pc.misses == 0  # match counts nothing
    pc.record(PrefixMatch(0, 5))
    pc.record(None)
    assert (pc.hits, pc.misses, pc.reused_tokens) == (1, 1, 5) and pc.lru() == [1, 0]
    pc.truncate(0, 4)
    assert list(pc.tokens(0)) == [1, 2, 3, 4]
    pc.truncate(0, 2)
    assert 0 not in pc
    pc.drop(1)
    assert len(pc) == 0


# the server's scheduler ---------------------------------------------------------------------------
def jobs_sharing_a_prefix(gen: Generator) -> list[tuple[str, list[int], GenerationConfig]]:
    system = gen.tokenizer.encode(SYSTEM)[:24]
    asks = ["Citizen: What?", "All: We know't.", "O", "Second Citizen: One word."]
    jobs = []
    for i, ask in enumerate(asks):
        cfg = openai_generation_config(max_tokens=8 + i, temperature=0.8 if i == 2 else 0, seed=i)
        jobs.append((f"job{i}", system + gen.tokenizer.encode(ask), cfg))
    jobs.append(("again", jobs[0][1], jobs[0][2]))  # the same prompt once more
    jobs.append(("prefix-only", system[:20], GenerationConfig(max_new_tokens=5)))  # inside an entry
    return jobs


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("chunk", [0, 5])
def test_outputs_with_prefix_cache_equal_without_and_generator(gen, prefix_cache, chunk):
    """Sequences sharing a 24-token prefix, one after the other (each starts from a released slot's
    rows) and then all at once (from the rows of the ones running): the same tokens as Generator
    alone, with and without the prefix cache; with it, the later ones hit."""
    jobs = jobs_sharing_a_prefix(gen)
    alone = {name: gen.generate(prompt, cfg)[0].token_ids for name, prompt, cfg in jobs}
    run = Run(gen, max_batch=4, max_queue=16, prefill_chunk=chunk, prefix_cache=prefix_cache, prefix_block=8)
    run.engine.start()
    try:
        for name, prompt, cfg in jobs:  # one after the other
            run.engine.submit([run.sequence(name, prompt, cfg)])
            run.wait()
            assert run.tokens[name] == alone[name], name
        sequential_hits = run.hits()
        names = [f"{name}-together" for name, _, _ in jobs]
        run.engine.submit([run.sequence(n, p, c) for n, (_, p, c) in zip(names, jobs, strict=True)])
        run.wait()
    finally:
        run.engine.close()
    for n, (name, _, _) in zip(names, jobs, strict=True):
        assert run.tokens[n] == alone[name], n
    if prefix_cache:
        assert sequential_hits == len(jobs) - 1  # every one after the first
        assert run.hits() > sequential_hits
    else:
        assert run.hits() == 0


def test_prefill_then_extend_from_a_copied_prefix_equals_one_shot_prefill(gen):
    """What the scheduler does, on the cache itself: slot 0 holds a sequence and is released; slot 2
    takes its first n positions (``copy_prefix``) and extends the rest. Logits: bitwise equal to
    one prefill of the whole prompt, and so are the next decode steps."""
    ids = gen.tokenizer.encode(SYSTEM)[:30]
    ref = gen.backend.new_cache(3, 64)
    want = ref.prefill([0], [ids])
    cache = gen.backend.new_cache(3, 64)
    cache.prefill([0], [[*ids[:20], 5, 6, 7]])
    cache.release(0)
    cache.copy_prefix(0, 2, 20)
    got = cache.extend([2], [ids[20:]])
    np.testing.assert_array_equal(got, want)
    for t in (11, 12, 13):
        np.testing.assert_array_equal(cache.decode([2], [t]), ref.decode([0], [t]))
