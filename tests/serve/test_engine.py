"""serve/engine.py: prompt scoring runs on the engine's thread between steps, one prompt per step
(a request of many prompts stalls the running streams by one pass at a time), can be cancelled
before it runs, and is refused once the engine is closed."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.serve.engine import Engine
from gpt2_edge.serve.output import prompt_logprobs
from gpt2_edge.serve.sequences import SchedulerClosedError, SequenceHandle

PROMPTS = [[5, 9, 3, 17], [4, 8, 2, 11, 6, 1], [7, 7, 7]]


class LoggingBackend:
    """The model's backend; its full passes and decode steps logged with the thread that ran them."""

    def __init__(self, backend, log: list) -> None:
        self._backend, self.log = backend, log

    def logits(self, ids):
        self.log.append(("score", threading.current_thread().name))
        return self._backend.logits(ids)

    def new_cache(self, n_slots, capacity):
        cache, log = self._backend.new_cache(n_slots, capacity), self.log

        class Cache:
            def decode(self, slots, tokens):
                log.append(("decode", threading.current_thread().name))
                return cache.decode(slots, tokens)

            def __getattr__(self, name):
                return getattr(cache, name)

        return Cache()

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_scoring_runs_on_the_engine_thread_one_prompt_per_step(gen: Generator):
    log: list = []
    engine = Engine(LoggingBackend(gen.backend, log), n_ctx=gen.backend.n_ctx, max_batch=1)
    engine.start()
    try:
        done = threading.Event()
        running = SequenceHandle(
            [1, 2], GenerationConfig(max_new_tokens=40), lambda e: e.finish_reason and done.set(),
            eos_token_id=None, detokenize=gen.tokenizer.decode,
        )  # fmt: skip
        engine.submit([running])
        scores = engine.score(PROMPTS, 2).result(60)
        assert done.wait(60)
    finally:
        engine.close()
    for ids, (lps, tops) in zip(PROMPTS, scores, strict=True):
        want = prompt_logprobs(gen.backend.logits(np.asarray([ids], np.int64))[0], ids, 2)
        assert lps[0] is None and lps[1:] == pytest.approx(want[0][1:])
        assert [t for t, _ in tops[1][:2]] == [t for t, _ in want[1][1][:2]]
    scored = [i for i, (what, _) in enumerate(log) if what == "score"]
    assert len(scored) == 3 and {thread for _, thread in log} == {"gpt2-edge-engine"}
    # a decode step of the running sequence between each two passes
    assert all(any(log[j][0] == "decode" for j in range(a, b)) for a, b in itertools.pairwise(scored))


def test_scoring_cancelled_before_it_runs_is_never_run_and_a_closed_engine_refuses_it(gen: Generator):
    log: list = []
    engine = Engine(LoggingBackend(gen.backend, log), n_ctx=gen.backend.n_ctx, max_batch=1)
    engine.start()
    with engine._cond:  # the engine thread waits for the lock: the job is still queued when cancelled
        future = engine.score(PROMPTS, 1)
        assert future.cancel()
    assert engine.score(PROMPTS[:1], 1).result(60)  # the next one runs
    engine.close()
    assert [what for what, _ in log] == ["score"]
    with pytest.raises(SchedulerClosedError):
        engine.score(PROMPTS, 1)


def test_a_failed_step_fails_the_scoring_it_planned_and_the_engine_goes_on(gen: Generator):
    class FailingDecode(LoggingBackend):
        def new_cache(self, n_slots, capacity):
            cache = super().new_cache(n_slots, capacity)

            def decode(slots, tokens):
                raise RuntimeError("injected")

            cache.decode = decode
            return cache

    events: list = []
    engine = Engine(FailingDecode(gen.backend, []), n_ctx=gen.backend.n_ctx, max_batch=1)
    engine.start()
    try:
        seq = SequenceHandle([1, 2], GenerationConfig(max_new_tokens=4), events.append, eos_token_id=None,
                             detokenize=gen.tokenizer.decode)  # fmt: skip
        with engine._cond:  # one plan: the sequence's prefill and decode, and the scoring
            engine.submit([seq])
            future = engine.score(PROMPTS[:1], 1)
        with pytest.raises(RuntimeError, match="injected"):
            future.result(60)
        assert events[-1].error == "generation failed: RuntimeError"
        assert engine.running  # a new cache, and on
    finally:
        engine.close()
