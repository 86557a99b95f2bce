"""serve/output.py without a model: a step's tokens become events (text pieces, the model's own
log-probabilities, the finish where the sequence ends, nothing after it), metrics are counted, and
a prompt scoring pass becomes per-token log-probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_edge.runtime.sampling import GenerationConfig, log_softmax
from gpt2_edge.serve.metrics import Metrics
from gpt2_edge.serve.output import OutputProcessor, prompt_logprobs, top_logprobs
from gpt2_edge.serve.sequences import SequenceHandle, TokenEvent

V = 6
EOS = 5


def handle(
    events: list[TokenEvent], max_new: int = 8, logprobs: int | None = None, **config
) -> SequenceHandle:
    return SequenceHandle(
        [1, 2],
        GenerationConfig(max_new_tokens=max_new, **config),
        events.append,
        eos_token_id=EOS,
        detokenize=lambda ids: "".join(chr(ord("a") + i) for i in ids),
        logprobs=logprobs,
    )


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, V)).astype(np.float32)


def metric(metrics: Metrics, name: str, **labels) -> float:
    m = getattr(metrics, name)
    return (m.labels(**labels) if labels else m)._value.get()


def test_each_token_is_one_event_with_the_models_own_logprobs():
    events: list[TokenEvent] = []
    metrics = Metrics(1, lambda: 0, lambda: 0)
    out = OutputProcessor(metrics)
    s = handle(events, logprobs=2)
    logits = rows(3)
    assert out.emit(s, [0, 3, 1], logits, drafted=2) is None
    assert [(e.token, e.text) for e in events] == [(0, "a"), (3, "d"), (1, "b")]
    for e, row in zip(events, logits, strict=True):
        lp = log_softmax(row.astype(np.float64))
        assert e.logprob == pytest.approx(float(lp[e.token]))
        assert e.top_logprobs == top_logprobs(lp, 2) and len(e.top_logprobs) == 2
        assert e.finish_reason is None
    assert metric(metrics, "generation_tokens") == 3
    assert (metric(metrics, "spec_drafted_tokens"), metric(metrics, "spec_accepted_tokens")) == (2, 2)
    assert s.last_token_at is not None


def test_a_sequence_ends_where_it_finishes_inside_a_step():
    events: list[TokenEvent] = []
    out = OutputProcessor()
    s = handle(events)
    assert out.emit(s, [0, EOS, 1], rows(3)) == "eos"  # the token after eos goes nowhere
    assert [e.token for e in events] == [0, EOS] and events[-1].finish_reason == "eos"
    events.clear()
    s = handle(events, max_new=2)
    assert out.emit(s, [0, 1, 2], rows(3)) == "length"
    assert [e.token for e in events] == [0, 1] and events[-1].finish_reason == "length"
    assert all(e.logprob is None and e.top_logprobs is None for e in events)  # not asked for


def test_a_cancelled_sequence_gets_no_more_of_the_step_and_a_failing_sink_cancels():
    events: list[TokenEvent] = []
    out = OutputProcessor()
    s = handle(events)
    s.cancel()
    assert out.emit(s, [0, 1, 2], rows(3)) is None and len(events) == 1

    def gone(_event: TokenEvent) -> None:
        raise RuntimeError("the event loop closed")

    s = handle(events)
    s.sink = gone
    out.emit(s, [0], rows(1))
    assert s.cancelled


def test_a_failure_is_an_error_event_and_finishes_are_counted():
    events: list[TokenEvent] = []
    metrics = Metrics(1, lambda: 0, lambda: 0)
    out = OutputProcessor(metrics)
    out.fail(handle(events), "generation failed: X")
    assert events == [TokenEvent(None, "", error="generation failed: X")]
    out.finished("cancelled")
    out.step(3)
    assert metric(metrics, "sequences_finished", reason="cancelled") == 1
    assert metrics.batch_occupancy._sum.get() == 3


def test_prompt_logprobs_score_each_token_given_the_ones_before():
    ids = [1, 4, 2, 0]
    logits = rows(len(ids), seed=3)
    lps, tops = prompt_logprobs(logits, ids, 3)
    assert lps[0] is None and tops[0] is None
    for pos in range(1, len(ids)):
        lp = log_softmax(logits[pos - 1].astype(np.float64))
        assert lps[pos] == pytest.approx(float(lp[ids[pos]]))
        assert [t for t, _ in tops[pos]] == list(np.argsort(-lp, kind="stable")[:3])
    assert prompt_logprobs(logits, ids, 0)[1] == [None] * len(ids)
