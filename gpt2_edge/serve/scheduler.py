"""Continuous batching: one thread owns the model's KV cache and moves every active sequence.

The cache has ``max_batch`` slots of the model's full context. Each iteration of the scheduler
thread:

1. drops sequences whose client went away or gave up (their slots are free again at once),
2. admits waiting sequences into free slots and prefills them (the prefill's logits give each its
   first token),
3. runs one ``decode`` over every active slot and picks each slot's next token with that
   sequence's own chooser (its own seed), and
4. hands each new token to the sequence's sink and releases the slots of finished sequences.

So a request joins the running batch at the next step and leaves it the step it finishes. The
scheduler knows nothing of HTTP or asyncio: a sequence's ``sink`` is called from the scheduler
thread with each ``TokenEvent`` (the app forwards it to its event loop). Torch-free.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import Gpt2EdgeError
from ..runtime.sampling import GenerationConfig, log_softmax
from ..runtime.sequence import SequenceState
from ..runtime.types import Backend, KVCache

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("gpt2_edge.serve")


class QueueFullError(Exception):
    """No room for more sequences: the caller answers 429 and the client retries later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SchedulerClosedError(Exception):
    """The scheduler is shutting down and takes no new sequences."""


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


class Scheduler:
    """Continuous batching over one KV cache of ``max_batch`` slots (see the module docstring).

    At most ``max_batch + max_queue`` sequences are in the scheduler at once (running or
    waiting); ``submit`` refuses more at once with ``QueueFullError``.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        n_ctx: int,
        max_batch: int = 8,
        max_queue: int = 32,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch < 1:
            raise Gpt2EdgeError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise Gpt2EdgeError(f"max_queue must be >= 0, got {max_queue}")
        self.backend = backend
        self.n_ctx = n_ctx
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: deque[SequenceHandle] = deque()
        self._in_system = 0  # running + waiting, under _cond
        self._n_active = 0
        self._closing = False
        self._thread: threading.Thread | None = None

    # the submitting side (any thread) -------------------------------------------------------
    @property
    def capacity(self) -> int:
        """How many sequences the scheduler holds at most (running + waiting)."""
        return self.max_batch + self.max_queue

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Sequences holding a slot."""
        return self._n_active

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def submit(self, sequences: Sequence[SequenceHandle]) -> None:
        """Queue ``sequences`` (one request's choices) together, or none of them."""
        with self._cond:
            if self._closing or self._thread is None or not self._thread.is_alive():
                raise SchedulerClosedError("the server is shutting down")
            if self._in_system + len(sequences) > self.capacity:
                raise QueueFullError(
                    f"the server is at capacity ({self._n_active} running, {len(self._waiting)} waiting, "
                    f"room for {self.capacity}); retry later"
                )
            for s in sequences:
                s._wake = self._notify
                self._waiting.append(s)
            self._in_system += len(sequences)
            self._cond.notify()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    def start(self) -> None:
        """Start the scheduler thread (once)."""
        if self._thread is not None:
            raise RuntimeError("the scheduler was started already")
        self._thread = threading.Thread(target=self._run, name="gpt2-edge-scheduler", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current step; every sequence not finished gets an error event."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # the scheduler thread ----------------------------------------------------------------------
    def _run(self) -> None:
        cache = self.backend.new_cache(self.max_batch, self.n_ctx)
        free = list(range(self.max_batch))  # a heap: the lowest slots first keeps a step's rows together
        active: dict[int, SequenceHandle] = {}
        while True:
            with self._cond:
                while not self._closing and not self._waiting and not active:
                    self._cond.wait()
                if self._closing:
                    break
                admitted: list[SequenceHandle] = []
                for s in list(self._waiting):
                    if s.cancelled:
                        self._waiting.remove(s)
                        self._in_system -= 1
                        self._count_finish("cancelled")
                    elif len(admitted) < len(free):
                        self._waiting.remove(s)
                        admitted.append(s)
            for slot, s in list(active.items()):
                if s.cancelled:
                    self._leave(cache, free, active, slot, "cancelled")
            try:
                if admitted:
                    self._prefill(cache, free, active, admitted)
                if active:
                    self._decode(cache, free, active)
            except Exception as e:  # a failed step must not take the server down
                log.exception("scheduler step failed")
                for slot in list(active):
                    self._fail(active[slot], f"generation failed: {type(e).__name__}")
                    self._leave(cache, free, active, slot, "error")
                cache = self.backend.new_cache(self.max_batch, self.n_ctx)  # its state is unknown now
        for slot in list(active):
            self._fail(active[slot], "the server shut down before the sequence finished")
            self._leave(cache, free, active, slot, "error")
        with self._cond:
            while self._waiting:
                self._fail(self._waiting.popleft(), "the server shut down before the sequence started")
                self._in_system -= 1

    def _prefill(
        self,
        cache: KVCache,
        free: list[int],
        active: dict[int, SequenceHandle],
        admitted: list[SequenceHandle],
    ) -> None:
        slots = [heapq.heappop(free) for _ in admitted]
        for slot, s in zip(slots, admitted, strict=True):
            active[slot] = s
        self._n_active = len(active)
        logits = cache.prefill(slots, [s.state.prompt for s in admitted])
        for i, slot in enumerate(slots):
            self._advance(cache, free, active, slot, logits[i])

    def _decode(self, cache: KVCache, free: list[int], active: dict[int, SequenceHandle]) -> None:
        slots = sorted(active)
        logits = cache.decode(slots, [active[s].state.generated[-1] for s in slots])
        if self.metrics is not None:
            self.metrics.batch_occupancy.observe(len(slots))
        for i, slot in enumerate(slots):
            self._advance(cache, free, active, slot, logits[i])

    def _advance(
        self,
        cache: KVCache,
        free: list[int],
        active: dict[int, SequenceHandle],
        slot: int,
        logits: np.ndarray,
    ) -> None:
        """Pick, record and send one sequence's next token; release its slot when it finished."""
        s = active[slot]
        token = s.state.choose(logits)
        logprob, top = None, None
        if s.logprobs is not None:
            # The model's own distribution (before temperature / top-k / top-p), as OpenAI reports.
            lp = log_softmax(np.asarray(logits, np.float64))
            logprob = float(lp[token])
            top = top_logprobs(lp, s.logprobs)
        piece = s.state.append(token)
        now = time.perf_counter()
        if self.metrics is not None:
            if s.last_token_at is None:
                self.metrics.time_to_first_token.observe(now - s.submitted_at)
            else:
                self.metrics.inter_token_latency.observe(now - s.last_token_at)
            self.metrics.generation_tokens.inc()
        s.last_token_at = now
        self._send(s, TokenEvent(token, piece, logprob, top, s.state.finish_reason))
        if s.state.finished:
            self._leave(cache, free, active, slot, s.state.finish_reason or "length")

    def _leave(
        self, cache: KVCache, free: list[int], active: dict[int, SequenceHandle], slot: int, reason: str
    ) -> None:
        cache.release(slot)
        heapq.heappush(free, slot)
        del active[slot]
        self._n_active = len(active)
        with self._cond:
            self._in_system -= 1
        self._count_finish(reason)

    def _count_finish(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.sequences_finished.labels(reason=reason).inc()

    def _fail(self, s: SequenceHandle, message: str) -> None:
        self._send(s, TokenEvent(None, "", error=message))

    @staticmethod
    def _send(s: SequenceHandle, event: TokenEvent) -> None:
        try:
            s.sink(event)
        except Exception:  # the receiving side is gone (its event loop closed): stop generating
            s.cancel()
