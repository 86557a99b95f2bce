"""The output processor: what a step's tokens become. For each sequence, in order, it appends the
executor's tokens to the sequence's state (eos, stop strings and ``max_new_tokens`` end it there:
``SequenceState``), computes the log-probabilities asked for (the model's own distribution, before
temperature / top-k / top-p, as OpenAI reports), sends one ``TokenEvent`` per token to the
sequence's sink, and counts the metrics (time to first token, inter-token latency, tokens,
speculation's drafted and accepted tokens, finished sequences). It also turns a prompt scoring
pass's logits into per-token log-probabilities (``echo`` with ``logprobs``).

It runs on the engine's thread; it never touches a slot, the cache or the model: it says whether a
sequence finished, and the engine frees its slot. Torch-free.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..runtime.sampling import log_softmax
from .sequences import SequenceHandle, TokenEvent

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("gpt2_edge.serve")

TopLogprobs = tuple[tuple[int, float], ...]


def top_logprobs(lp: np.ndarray, k: int) -> TopLogprobs | None:
    """The ``k`` most likely ``(token, logprob)`` pairs of one row of log-probabilities, best first."""
    if k <= 0:
        return None
    k = min(k, lp.shape[-1])
    best = np.argpartition(-lp, k - 1)[:k]
    best = best[np.argsort(-lp[best], kind="stable")]
    return tuple((int(t), float(lp[t])) for t in best)


def prompt_logprobs(
    logits: np.ndarray, ids: Sequence[int], k: int
) -> tuple[list[float | None], list[TopLogprobs | None]]:
    """Each prompt token's log-probability given the ones before (None for the first), and the
    ``k`` most likely tokens there; ``logits``: one full-sequence pass, ``(T, V)``."""
    lps: list[float | None] = [None]
    tops: list[TopLogprobs | None] = [None]
    for pos in range(1, len(ids)):  # row by row: a float64 copy of all rows would be T x V
        lp = log_softmax(logits[pos - 1].astype(np.float64))
        lps.append(float(lp[ids[pos]]))
        tops.append(top_logprobs(lp, k))
    return lps, tops


class OutputProcessor:
    """Turns step results into events and metrics (module docstring)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    def emit(
        self, s: SequenceHandle, tokens: Sequence[int], logits: np.ndarray, drafted: int = 0
    ) -> str | None:
        """Record and send ``s``'s new ``tokens`` (``logits``: the model's rows each was chosen
        from), in order, until it finishes. The reason it finished (``eos``, ``stop``, ``length``),
        or None while it goes on (or was cancelled: the rest of the step's tokens go nowhere, and the
        engine frees the slot before the next step)."""
        now = time.perf_counter()
        m = self.metrics
        if m is not None:
            if s.last_token_at is None:
                m.time_to_first_token.observe(now - s.submitted_at)
            else:
                m.inter_token_latency.observe(now - s.last_token_at)
            if drafted:
                m.spec_drafted_tokens.inc(drafted)
                m.spec_accepted_tokens.inc(len(tokens) - 1)
        s.last_token_at = now
        state = s.state
        for token, row in zip(tokens, logits, strict=True):
            logprob, top = None, None
            if s.logprobs is not None:
                lp = log_softmax(np.asarray(row, np.float64))
                logprob = float(lp[token])
                top = top_logprobs(lp, s.logprobs)
            piece = state.append(token)
            if state.finish_reason == "error":  # the constraint's matcher failed: this one ends
                error = state.constraint.error if state.constraint is not None else None
                self.fail(s, f"structured output failed: {error}")
                return "error"
            if m is not None:
                m.generation_tokens.inc()
            self.send(s, TokenEvent(token, piece, logprob, top, state.finish_reason))
            if state.finished:
                return state.finish_reason or "length"
            if s.cancelled:
                return None
        return None

    def fail(self, s: SequenceHandle, message: str) -> None:
        self.send(s, TokenEvent(None, "", error=message))

    def finished(self, reason: str) -> None:
        """Count a sequence that left (``eos``, ``stop``, ``length``, ``cancelled``, ``error``)."""
        if self.metrics is not None:
            self.metrics.sequences_finished.labels(reason=reason).inc()

    def step(self, slots: int) -> None:
        """Count a decode step over ``slots`` rows."""
        if self.metrics is not None:
            self.metrics.batch_occupancy.observe(slots)

    @staticmethod
    def send(s: SequenceHandle, event: TokenEvent) -> None:
        try:
            s.sink(event)
        except Exception:  # the receiving side is gone (its event loop closed): stop generating
            s.cancel()
