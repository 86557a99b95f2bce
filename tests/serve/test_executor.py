"""serve/executor.py on the tiny model, without the engine's thread: prompt chunks (prefill, then
extend) give the first token plain prefill gives, decode continues as ``Generator`` does, a
sequence that asks for prompt lookup runs a speculative step, prompt scoring is one full pass,
and a leaving sequence's rows go to the prefix cache (not a failed one's)."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_edge.errors import Gpt2EdgeError
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.serve.admission import KVMemory
from gpt2_edge.serve.executor import Executor, passes
from gpt2_edge.serve.scheduler import Chunk
from gpt2_edge.serve.sequences import SequenceHandle, Slot

PROMPT = [5, 9, 3, 17, 4, 8, 2, 11, 6]


def executor(gen: Generator, max_batch: int = 2, **kv) -> tuple[Executor, list[Slot]]:
    memory = KVMemory(gen.backend, n_ctx=gen.backend.n_ctx, max_batch=max_batch, prefix_block=4, **kv)
    ex = Executor(gen.backend, memory)
    ex.new_cache()
    return ex, [Slot(i) for i in range(max_batch)]


def admit(ex: Executor, slots: list[Slot], index: int, prompt: list[int], config: GenerationConfig) -> Slot:
    seq = SequenceHandle(prompt, config, lambda _e: None, eos_token_id=None, detokenize=lambda ids: "")
    slot = slots[index]
    slot.take(seq, 0, len(prompt) + config.max_new_tokens, index + 1)
    ex.admit([(seq, index, None)], [s for s in slots if s.seq is not None])
    return slot


def run(ex: Executor, slots: list[Slot], index: int, chunk: int, new: int) -> list[int]:
    """Prefill slot ``index``'s prompt ``chunk`` tokens at a time, then decode: its tokens."""
    state = slots[index].seq.state
    prompt, done, tokens = state.prompt, 0, []
    while done < len(prompt):
        c = Chunk(index, prompt[done : done + chunk], done + chunk >= len(prompt))
        first = ex.prefill(slots, [c] if done == 0 else [], [] if done == 0 else [c])
        done += len(c.tokens)
        if c.last:
            tokens += first[index][0]
            state.append(first[index][0][0])
    while len(tokens) < new:
        (r,) = ex.decode(slots, [index])
        for t in r[0]:
            tokens.append(t)
            state.append(t)
    return tokens[:new]


@pytest.mark.parametrize("chunk", [len(PROMPT), 4, 1])
def test_chunks_then_decode_give_the_generators_tokens(gen, chunk):
    config = GenerationConfig(max_new_tokens=6)
    ex, slots = executor(gen)
    admit(ex, slots, 1, PROMPT, config)
    assert run(ex, slots, 1, chunk, 6) == gen.generate(PROMPT, config)[0].token_ids


def test_prompt_lookup_runs_a_speculative_step_with_the_same_tokens(gen):
    plain = GenerationConfig(max_new_tokens=8)
    ex, slots = executor(gen)
    assert ex.spec is not None
    admit(ex, slots, 0, PROMPT * 2, GenerationConfig(max_new_tokens=8, prompt_lookup=4))
    tokens = run(ex, slots, 0, 64, 8)
    assert ex.spec.stats.passes > 0  # the speculator ran the decode steps
    assert tokens == gen.generate(PROMPT * 2, plain)[0].token_ids


def test_scoring_is_one_full_pass(gen):
    ex, _ = executor(gen)
    np.testing.assert_array_equal(ex.score(PROMPT), gen.backend.logits(np.asarray([PROMPT], np.int64))[0])


def test_a_leaving_sequence_keeps_its_rows_in_the_prefix_cache_unless_it_failed(gen):
    ex, slots = executor(gen)
    config = GenerationConfig(max_new_tokens=2)
    for index, keep in ((0, True), (1, False)):
        slot = admit(ex, slots, index, PROMPT, config)
        run(ex, slots, index, 64, 2)
        ex.release(slot, keep=keep)
        slot.clear()
    prefix = ex.kv.prefix
    assert prefix is not None and 0 in prefix and 1 not in prefix
    assert list(prefix.tokens(0)[: len(PROMPT)]) == PROMPT
    assert ex.kv.cache.length(0) == ex.kv.cache.length(1) == 0


def test_a_concatenating_cache_decodes_plainly_and_refuses_a_draft(concat_bundle, gen):
    concat = Generator.from_bundle(str(concat_bundle), threads=1)
    ex, slots = executor(concat)
    assert ex.spec is None
    admit(ex, slots, 0, PROMPT, GenerationConfig(max_new_tokens=4, prompt_lookup=4))
    assert run(ex, slots, 0, 64, 4) == gen.generate(PROMPT, GenerationConfig(max_new_tokens=4))[0].token_ids
    with pytest.raises(Gpt2EdgeError, match="rolls back"):
        Executor(
            concat.backend, KVMemory(concat.backend, n_ctx=concat.backend.n_ctx, max_batch=1), draft=object()
        ).new_cache()  # type: ignore[arg-type]


def test_a_bursts_chunks_run_in_passes_of_neighbouring_slots_within_the_pass_size():
    def chunk(slot: int, n: int) -> Chunk:
        return Chunk(slot, [1] * n, True)

    groups = passes([chunk(3, 100), chunk(0, 128), chunk(1, 128), chunk(2, 100), chunk(5, 10), chunk(6, 300)])
    assert [[c.slot for c in g] for g in groups] == [[0, 1], [2, 3], [5], [6]]
    # padded to the longest: 3 rows of 90 are 270 tokens, over 256
    assert [[c.slot for c in g] for g in passes([chunk(i, 90) for i in range(4)])] == [[0, 1], [2, 3]]
    assert len(passes([chunk(i, 16) for i in range(16)])) == 1


def test_chunks_in_several_passes_give_the_tokens_of_one(gen):
    config = GenerationConfig(max_new_tokens=1)
    prompts = [[5 + i, 9, 3, 17, 4, 8, 2, 11][: 5 + i] for i in range(4)]
    firsts = []
    for limit in (1, 10_000):
        ex, slots = executor(gen, max_batch=4)
        ex.pass_tokens = limit
        for i, p in enumerate(prompts):
            admit(ex, slots, i, p, config)
        out = ex.prefill(slots, [Chunk(i, p, True) for i, p in enumerate(prompts)], [])
        firsts.append({i: out[i][0] for i in out})
    assert firsts[0] == firsts[1] and len(firsts[0]) == 4
