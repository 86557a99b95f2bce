"""What a request hands the scheduler and gets back: a ``SequenceHandle`` (one sequence to
generate, with the sink its ``TokenEvent``s go to), the ``Reservation`` that holds room for a
request's sequences before they exist, and the scheduler's two refusals. Torch-free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..runtime.sampling import GenerationConfig
from ..runtime.sequence import SequenceState


class QueueFullError(Exception):
    """No room for more sequences: the caller answers 429 and the client retries later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SchedulerClosedError(Exception):
    """The scheduler is shutting down and takes no new sequences."""


class Reservation:
    """Room for ``n`` sequences held in the scheduler's bound before they exist: a request takes
    it before any work of its own (prompt scoring), then ``submit`` turns it into its sequences or
    ``release`` gives it back. Either happens once."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.done = False


@dataclass(frozen=True)
class TokenEvent:
    """One step of one sequence, as its sink receives it.

    ``text`` is what can be shown now (``""`` while a character or a possible stop string is
    incomplete); the texts of a sequence's events join to its final text. A sequence's last event
    has ``finish_reason`` (``eos``, ``stop`` or ``length``), or ``error`` with no token.
    """

    token: int | None
    text: str
    logprob: float | None = None  # log-probability of ``token`` under the model (when asked for)
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # the k most likely tokens
    finish_reason: str | None = None
    error: str | None = None


class SequenceHandle:
    """A sequence submitted to the scheduler; the submitter may ``cancel`` it at any time."""

    def __init__(
        self,
        prompt: Sequence[int],
        config: GenerationConfig,
        sink: Callable[[TokenEvent], None],
        *,
        eos_token_id: int | None,
        detokenize: Callable[[Sequence[int]], str],
        logprobs: int | None = None,
    ) -> None:
        """``logprobs``: None for none, k >= 0 for the chosen token's log-probability and the k
        most likely alternatives at each step."""
        self.state = SequenceState(prompt, config, eos_token_id, detokenize)
        self.sink = sink
        self.logprobs = logprobs
        self.submitted_at = time.perf_counter()
        self.last_token_at: float | None = None
        self._cancelled = threading.Event()
        self._wake: Callable[[], None] = lambda: None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating; the scheduler frees the slot before its next step. Idempotent."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._wake()


def top_logprobs(lp: np.ndarray, k: int) -> tuple[tuple[int, float], ...] | None:
    """The ``k`` most likely ``(token, logprob)`` pairs of one row of log-probabilities, best first."""
    if k <= 0:
        return None
    k = min(k, lp.shape[-1])
    best = np.argpartition(-lp, k - 1)[:k]
    best = best[np.argsort(-lp[best], kind="stable")]
    return tuple((int(t), float(lp[t])) for t in best)
