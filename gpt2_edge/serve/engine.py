"""The engine: one thread that owns the model's KV cache and moves every active sequence, and the
submitting side requests call from any thread (``reserve``, ``submit``, ``score``, ``cancel``
through a ``SequenceHandle``).

It is three parts, as vLLM's engine core and llama.cpp's server are:

- ``Scheduler`` (scheduler.py) decides a step: admissions within the KV budget, prompt chunks,
  the decode batch, a prompt scoring job;
- ``Executor`` (executor.py) runs it on the backend and the cache (prefill, extend, decode or a
  speculative step, prompt scoring; the KV memory and the speculator are its);
- ``OutputProcessor`` (output.py) turns the results into ``TokenEvent``s (log-probabilities, text
  pieces that stop strings end), and metrics.

Each iteration of the thread: free the slots of sequences whose client went away or gave up, ask
the scheduler for a plan, admit, run the chunks, hand each first token to the output processor,
decode the plan's slots that still hold their sequence, hand their tokens on, free the slots of
finished sequences (the slot's own record, the executor's rows, the scheduler's free list), and
run the plan's prompt scoring. Idle for ``idle_shrink_s``, the cache shrinks. A failed step fails
its running sequences and the engine goes on with a new cache.

The engine knows nothing of HTTP or asyncio: a sequence's ``sink`` is called from the engine thread
with each ``TokenEvent`` (the app forwards it to its event loop); a scoring job's result is a
``concurrent.futures.Future``. Torch-free.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import Gpt2EdgeError
from ..runtime.speculative import DraftModel
from ..runtime.types import Backend
from .admission import DEFAULT_PREFIX_BLOCK, DEFAULT_PREFIX_CACHE_BLOCKS, INITIAL_CAPACITY, KVMemory
from .executor import Executor
from .output import OutputProcessor, TopLogprobs, prompt_logprobs
from .scheduler import DEFAULT_PREFILL_CHUNK, DEFAULT_STEP_TOKENS, MAX_PROMPT_LOOKUP, Scheduler, StepPlan
from .sequences import QueueFullError, Reservation, SchedulerClosedError, SequenceHandle

if TYPE_CHECKING:
    import numpy as np

    from .metrics import Metrics

__all__ = ["Engine", "PromptScores", "ScoreJob"]

log = logging.getLogger("gpt2_edge.serve")

# One prompt's scores: each token's log-probability given the ones before, and the k best there.
PromptScores = tuple[list[float | None], list[TopLogprobs | None]]


@dataclass
class ScoreJob:
    """Prompt scoring for one request: its prompts, its ``logprobs`` k, where the result goes, and
    the scores so far (one prompt per step: a request of many prompts stalls the running streams
    by one full pass at a time)."""

    prompts: list[list[int]]
    k: int
    future: Future[list[PromptScores]]
    scores: list[PromptScores] = field(default_factory=list)


class Engine:
    """Continuous batching over one KV cache of ``max_batch`` slots (see the module docstring).

    At most ``max_batch + max_queue`` sequences are in the engine at once (running, waiting, or
    reserved by a request that is still scoring its prompts); ``reserve`` and ``submit`` refuse
    more at once with ``QueueFullError``.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        n_ctx: int,
        max_batch: int = 8,
        max_queue: int = 32,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        metrics: Metrics | None = None,
        kv_budget: int | None = None,
        prefix_cache: bool = True,
        prefix_cache_blocks: int = DEFAULT_PREFIX_CACHE_BLOCKS,
        prefix_block: int = DEFAULT_PREFIX_BLOCK,
        initial_capacity: int = INITIAL_CAPACITY,
        idle_shrink_s: float = 1.0,
        prompt_lookup: int = 0,
        draft: DraftModel | None = None,
    ) -> None:
        """``prefill_chunk``, ``step_tokens``: the scheduler's (scheduler.py: tokens of one prompt
        per step, tokens per step). ``kv_budget``: KV tokens (slots x tokens per slot) at most,
        None = ``max_batch`` x ``n_ctx``; at least ``n_ctx``. ``idle_shrink_s``: how long the
        engine is idle before its cache shrinks. ``prompt_lookup``: the drafted tokens per step at
        most of a request that does not say (the app reads it; each sequence's own
        ``config.prompt_lookup`` decides).
        ``draft``: a draft model for every sequence (its cache beside the engine's; needs a cache
        that rolls back)."""
        if max_queue < 0:
            raise Gpt2EdgeError(f"max_queue must be >= 0, got {max_queue}")
        if not 0 <= prompt_lookup <= MAX_PROMPT_LOOKUP:
            raise Gpt2EdgeError(
                f"prompt_lookup must be in 0..{MAX_PROMPT_LOOKUP} (0 = off), got {prompt_lookup}"
            )
        if max_batch < 1:
            raise Gpt2EdgeError(f"max_batch must be >= 1, got {max_batch}")
        self.kv = KVMemory(
            backend,
            n_ctx=n_ctx,
            max_batch=max_batch,
            kv_budget=kv_budget,
            prefix_cache=prefix_cache,
            prefix_cache_blocks=prefix_cache_blocks,
            prefix_block=prefix_block,
            initial_capacity=initial_capacity,
        )
        self.scheduler = Scheduler(
            self.kv, n_ctx=n_ctx, max_batch=max_batch, prefill_chunk=prefill_chunk, step_tokens=step_tokens
        )
        self.executor = Executor(backend, self.kv, draft)
        self.output = OutputProcessor()
        self.idle_shrink_s = idle_shrink_s
        self.n_ctx = n_ctx
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.step_tokens = step_tokens
        self.prompt_lookup = prompt_lookup
        self.draft = draft
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: deque[SequenceHandle] = deque()
        self._scoring: deque[ScoreJob] = deque()
        self._in_system = 0  # running + waiting + reserved, under _cond
        self._reserved = 0  # of which reserved, under _cond
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def metrics(self) -> Metrics | None:
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: Metrics | None) -> None:
        self._metrics = self.kv.metrics = self.output.metrics = metrics

    @property
    def kv_budget(self) -> int:
        """KV tokens (slots x tokens per slot) at most."""
        return self.kv.kv_budget

    @property
    def kv_tokens_allocated(self) -> int:
        """KV tokens allocated now (slots x tokens per slot; a concatenating cache: held)."""
        return self.kv.tokens_allocated

    @property
    def draft_kv_tokens_allocated(self) -> int:
        """The draft model's KV tokens allocated now (its cache has the engine's cache's shape,
        its context permitting); 0 without a draft model."""
        return self.executor.draft_tokens_allocated

    # the submitting side (any thread) -------------------------------------------------------
    @property
    def capacity(self) -> int:
        """How many sequences the engine holds at most (running + waiting)."""
        return self.max_batch + self.max_queue

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Sequences holding a slot."""
        return self.scheduler.n_active

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def _check_room(self, n: int) -> None:
        """Under ``_cond``: refuse ``n`` more sequences when closed or full."""
        if self._closing or self._thread is None or not self._thread.is_alive():
            raise SchedulerClosedError("the server is shutting down")
        if self._in_system + n > self.capacity:
            raise QueueFullError(
                f"the server is at capacity ({self.active} running, {len(self._waiting)} waiting, "
                f"{self._reserved} reserved, room for {self.capacity}); retry later"
            )

    def check_room(self, n: int = 1) -> None:
        """Raise ``QueueFullError`` / ``SchedulerClosedError`` now if ``n`` sequences would be
        refused: a request checks before any work (the answer may change before it submits)."""
        with self._cond:
            self._check_room(n)

    def reserve(self, n: int) -> Reservation:
        """Hold room for ``n`` sequences (``submit`` them with it, or ``release`` it)."""
        with self._cond:
            self._check_room(n)
            self._in_system += n
            self._reserved += n
        return Reservation(n)

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation not submitted. Idempotent."""
        with self._cond:
            if not reservation.done:
                reservation.done = True
                self._in_system -= reservation.n
                self._reserved -= reservation.n

    def submit(self, sequences: Sequence[SequenceHandle], reservation: Reservation | None = None) -> None:
        """Queue ``sequences`` (one request's choices) together, or none of them; with
        ``reservation`` (of ``len(sequences)``), into the room it holds."""
        with self._cond:
            if reservation is not None:
                if reservation.done or reservation.n != len(sequences):
                    raise ValueError("a reservation is used once, for as many sequences as it holds")
                reservation.done = True
                self._in_system -= reservation.n
                self._reserved -= reservation.n
            self._check_room(len(sequences))
            for s in sequences:
                s._wake = self._notify
                self._waiting.append(s)
            self._in_system += len(sequences)
            self._cond.notify()

    def score(self, prompts: list[list[int]], k: int) -> Future[list[PromptScores]]:
        """Score ``prompts`` (each token's log-probability given the ones before, and the ``k`` most
        likely tokens there) on the engine's thread, between steps; cancel the future to drop it.
        A request calls it within a ``reserve``: its room bounds the jobs waiting here."""
        job = ScoreJob(prompts, k, Future())
        with self._cond:
            if self._closing or self._thread is None:
                raise SchedulerClosedError("the server is shutting down")
            self._scoring.append(job)
            self._cond.notify()
        return job.future

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    def start(self) -> None:
        """Make the KV cache (here, so a backend that cannot hold ``max_batch`` sequences of
        ``n_ctx`` tokens says so to the caller) and start the engine thread (once)."""
        if self._thread is not None:
            raise RuntimeError("the engine was started already")
        self.executor.new_cache()
        self._thread = threading.Thread(target=self._run, name="gpt2-edge-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current step; every sequence not finished gets an error event."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # the engine thread -------------------------------------------------------------------------
    def _idle(self) -> bool:
        """Under ``_cond``: nothing to do but wait."""
        return not self._closing and not self._waiting and not self._scoring and not self.scheduler.n_active

    def _run(self) -> None:
        while True:
            with self._cond:
                shrink = False
                if self._idle() and not self.kv.shrunk:
                    self._cond.wait_for(lambda: not self._idle(), self.idle_shrink_s)
                    shrink = self._idle()
            if shrink:  # nothing to do for a while: give the memory back (out of the lock)
                self.executor.shrink()
                continue
            with self._cond:
                while self._idle():
                    self._cond.wait()
                if self._closing:
                    break
                for s in list(self._waiting):
                    if s.cancelled:
                        self._waiting.remove(s)
                        self._in_system -= 1
                        self.output.finished("cancelled")
            for slot in self.scheduler.cancelled():
                self._leave(slot.index, "cancelled")
            failed = False
            plan: StepPlan | None = None
            try:
                with self._cond:
                    plan = self.scheduler.schedule(self._waiting, self._scoring)
                self._step(plan)
            except Exception as e:  # a failed step must not take the server down
                log.exception("engine step failed")
                self.executor.drop_cache()  # its state is unknown now: nothing more is asked of it
                if plan is not None and plan.score is not None:  # its request would wait forever
                    _settle(plan.score.future, e)
                for slot in self.scheduler.running():
                    self.output.fail(slot.seq, f"generation failed: {type(e).__name__}")  # type: ignore[arg-type]
                    self._leave(slot.index, "error")
                failed = True
            if failed:  # out of the handler, whose traceback held the old cache (an engine lane, say)
                try:
                    self.executor.new_cache()
                except Exception:  # no cache, no server: /health says "down" from now on
                    log.exception("the engine cannot make a new KV cache; it stops")
                    with self._cond:
                        self._closing = True
                    break
        for slot in self.scheduler.running():
            self.output.fail(slot.seq, "the server shut down before the sequence finished")  # type: ignore[arg-type]
            self._leave(slot.index, "error")
        with self._cond:
            while self._waiting:
                self.output.fail(self._waiting.popleft(), "the server shut down before the sequence started")
                self._in_system -= 1
            while self._scoring:
                _settle(
                    self._scoring.popleft().future,
                    SchedulerClosedError("the server shut down before the prompts were scored"),
                )
        self.executor.drop_cache()

    def _step(self, plan: StepPlan) -> None:
        """Carry out one plan: admit, chunks (first tokens), decode, prompt scoring."""
        slots, output = self.scheduler.slots, self.output
        if plan.admit:
            self.executor.admit(plan.admit, self.scheduler.running())
        if plan.prefill or plan.extend:
            for index, (tokens, logits, _) in self.executor.prefill(slots, plan.prefill, plan.extend).items():
                self._emit(index, tokens, logits)
        decode = self.scheduler.still_running(plan.decode)
        if decode:
            output.step(len(decode))
            for index, (tokens, logits, drafted) in zip(
                decode, self.executor.decode(slots, decode), strict=True
            ):
                reason = output.emit(slots[index].seq, tokens, logits, drafted)  # type: ignore[arg-type]
                if reason is not None:
                    self._leave(index, reason)
            if not self.kv.resizable:  # a concatenating cache's allocation follows its sequences
                self.kv.count([s.index for s in slots if s.seq is not None])
        if plan.score is not None:
            self._score(plan.score)

    def _emit(self, index: int, tokens: list[int], logits: np.ndarray) -> None:
        reason = self.output.emit(self.scheduler.slots[index].seq, tokens, logits)  # type: ignore[arg-type]
        if reason is not None:
            self._leave(index, reason)

    def _leave(self, index: int, reason: str) -> None:
        self.executor.release(self.scheduler.slots[index], keep=reason != "error")
        self.scheduler.leave(index)
        with self._cond:
            self._in_system -= 1
        self.output.finished(reason)

    def _score(self, job: ScoreJob) -> None:
        """Score the job's next prompt; it goes back to the front of the queue until all are. Its
        future stays pending until then, so the request can still cancel it between prompts."""
        if job.future.cancelled():
            return  # its request went away
        try:
            ids = job.prompts[len(job.scores)]
            job.scores.append(prompt_logprobs(self.executor.score(ids), ids, job.k))
            if len(job.scores) < len(job.prompts):
                with self._cond:
                    self._scoring.appendleft(job)
                return
            job.future.set_result(job.scores)
        except InvalidStateError:  # cancelled meanwhile
            pass
        except Exception as e:
            _settle(job.future, e)


def _settle(future: Future[Any], error: BaseException) -> None:
    """Fail ``future`` unless its request cancelled it already."""
    with contextlib.suppress(InvalidStateError):
        future.set_exception(error)
