"""Continuous batching: one thread owns the model's KV cache and moves every active sequence.

The cache has ``max_batch`` slots of up to the model's full context. Each iteration of the
scheduler thread:

1. drops sequences whose client went away or gave up (their slots are free again at once),
2. admits waiting sequences into free slots, oldest first, while their KV memory fits the budget;
   a prompt that begins with tokens a slot's rows still hold starts from a copy of them,
3. prefills at most ``prefill_chunk`` prompt tokens, oldest admission first: the first chunk of a
   prompt is a ``prefill`` of its slot, the next ones ``extend`` it; the logits of a prompt's last
   chunk give the sequence its first token, and it joins the decode batch,
4. runs one ``decode`` over every slot whose prompt is in, picking each slot's next token with
   that sequence's own chooser (its own seed); where a sequence asks for speculative decoding
   (``GenerationConfig.prompt_lookup``), one ``Speculator.step`` instead, below, and
5. hands each new token to the sequence's sink and releases the slots of finished sequences.

So a request joins the running batch at the next step and leaves it the step it finishes, and a
long prompt costs the running streams at most one chunk's prefill per token instead of its whole
prefill (``prefill_chunk=0``: every admitted prompt whole, in one step). A sequence whose prompt
is still going in holds its slot but is not decoded. The scheduler knows nothing of HTTP or
asyncio: a sequence's ``sink`` is called from the scheduler thread with each ``TokenEvent`` (the
app forwards it to its event loop). Torch-free.

**Speculative decoding** (prompt lookup; in-place caches, which roll back). When any sequence in
the step has ``prompt_lookup``, the step is ``runtime.speculative.Speculator.step``: each such
sequence drafts up to k tokens from its own prompt and text (as many as its acceptance rate makes
worth it), one pass verifies every row's draft (rows verify different numbers of tokens; the others
take one token, as in a plain step) and rolls the rejected positions back. A sequence then gets
several tokens in one step: each is its own ``TokenEvent`` (with its log-probability), appended in
order until the sequence finishes, so eos, a stop string or ``max_new_tokens`` inside an accepted
draft end the text exactly where plain decoding ends it. Greedy tokens are plain decoding's (up
to the last-bit caveat of ``runtime.speculative``'s "Numerics", which also applies to rows without
drafts in a verifying pass); sampled ones keep the target's distribution and a seed's tokens. A
concatenating cache (the TensorRT engine, the ``tensorrt`` target) decodes plainly.

**A draft model** (``draft``, ``gpt2-edge serve --draft``) drafts for every sequence, beside prompt
lookup where a sequence asks for that too (``Speculator`` picks a source per step). Its own
in-place cache has the scheduler's cache's shape (``Speculator.follow`` after each growth and idle
shrink), one row per slot: a prompt's draft rows are prefilled chunk by chunk as its prompt goes
in (from position 0, also where the prefix cache copied the target's rows), rolled back with the
target's on rejection, released with the slot. Its memory is not in ``kv_budget`` (a budget of
positions; the draft's positions are the same ones): it adds the draft's KV bytes per position
to each (``Speculator.draft_tokens_allocated``).

KV memory (admission within ``kv_budget``, the cache growing and shrinking with the work) and the
prefix cache are ``admission.KVMemory``'s; only this thread calls it. The request-side types
(``SequenceHandle``, ``TokenEvent``, ``Reservation``, the refusals) are ``sequences.py``'s,
imported here too. About 500 lines: the submitting side and the thread's loop and steps share one
lock and one state.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from ..errors import Gpt2EdgeError
from ..runtime.sampling import log_softmax
from ..runtime.speculative import DraftModel, Speculator
from ..runtime.types import Backend, can_verify
from .admission import (
    DEFAULT_PREFIX_BLOCK,
    DEFAULT_PREFIX_CACHE_BLOCKS,
    INITIAL_CAPACITY,
    KVMemory,
    Placement,
)
from .sequences import (
    QueueFullError,
    Reservation,
    SchedulerClosedError,
    SequenceHandle,
    TokenEvent,
    top_logprobs,
)

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "MAX_DRAFT_TOKENS",
    "MAX_PROMPT_LOOKUP",
    "QueueFullError",
    "Reservation",
    "Scheduler",
    "SchedulerClosedError",
    "SequenceHandle",
    "TokenEvent",
    "top_logprobs",
]

log = logging.getLogger("gpt2_edge.serve")

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per step; ServeSettings.prefill_chunk
MAX_PROMPT_LOOKUP = 32  # drafted tokens per step at most (ServeSettings.prompt_lookup, the request field)
MAX_DRAFT_TOKENS = 32  # a draft model's tokens per step at most (ServeSettings.draft_tokens)


class Scheduler:
    """Continuous batching over one KV cache of ``max_batch`` slots (see the module docstring).

    At most ``max_batch + max_queue`` sequences are in the scheduler at once (running, waiting,
    or reserved by a request that is still scoring its prompts); ``reserve`` and ``submit``
    refuse more at once with ``QueueFullError``. Work a request does beside the scheduler thread
    (prompt scoring) runs in ``side_executor``, one job at a time, never in the event loop's
    shared thread pool.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        n_ctx: int,
        max_batch: int = 8,
        max_queue: int = 32,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
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
        """``kv_budget``: KV tokens (slots x tokens per slot) at most, None = ``max_batch`` x
        ``n_ctx``; at least ``n_ctx``. ``idle_shrink_s``: how long the scheduler is idle before
        its cache shrinks. ``prompt_lookup``: the drafted tokens per step at most of a request that
        does not say (the app reads it; each sequence's own ``config.prompt_lookup`` decides).
        ``draft``: a draft model for every sequence (its cache beside the scheduler's; needs a
        cache that rolls back)."""
        if max_batch < 1:
            raise Gpt2EdgeError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise Gpt2EdgeError(f"max_queue must be >= 0, got {max_queue}")
        if prefill_chunk < 0:
            raise Gpt2EdgeError(f"prefill_chunk must be >= 0 (0 = whole prompts), got {prefill_chunk}")
        if not 0 <= prompt_lookup <= MAX_PROMPT_LOOKUP:
            raise Gpt2EdgeError(
                f"prompt_lookup must be in 0..{MAX_PROMPT_LOOKUP} (0 = off), got {prompt_lookup}"
            )
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
        self.idle_shrink_s = idle_shrink_s
        self.backend = backend
        self.n_ctx = n_ctx
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prompt_lookup = prompt_lookup
        self.draft = draft
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: deque[SequenceHandle] = deque()
        self._in_system = 0  # running + waiting + reserved, under _cond
        self._reserved = 0  # of which reserved, under _cond
        self.side_executor: ThreadPoolExecutor | None = None  # made by start()
        self._n_active = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        # The scheduler thread's own state.
        self._free: list[int] = []  # a heap: the lowest slots first keeps a step's rows together
        self._active: dict[int, SequenceHandle] = {}  # slot -> the sequence holding it
        self._prefilling: dict[int, int] = {}  # slot -> prompt tokens in the cache, in admission order
        self._spec: Speculator | None = None  # beside a cache that rolls back

    @property
    def metrics(self) -> Metrics | None:
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: Metrics | None) -> None:
        self._metrics = self.kv.metrics = metrics

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
        """The draft model's KV tokens allocated now (its cache has the scheduler's cache's shape,
        its context permitting); 0 without a draft model."""
        spec = self._spec
        return spec.draft_tokens_allocated if spec is not None else 0

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

    def _check_room(self, n: int) -> None:
        """Under ``_cond``: refuse ``n`` more sequences when closed or full."""
        if self._closing or self._thread is None or not self._thread.is_alive():
            raise SchedulerClosedError("the server is shutting down")
        if self._in_system + n > self.capacity:
            raise QueueFullError(
                f"the server is at capacity ({self._n_active} running, {len(self._waiting)} waiting, "
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

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    def start(self) -> None:
        """Make the KV cache (here, so a backend that cannot hold ``max_batch`` sequences of
        ``n_ctx`` tokens says so to the caller) and start the scheduler thread (once)."""
        if self._thread is not None:
            raise RuntimeError("the scheduler was started already")
        self._new_cache()
        self._free = list(range(self.max_batch))
        self.side_executor = ThreadPoolExecutor(1, thread_name_prefix="gpt2-edge-scoring")
        self._thread = threading.Thread(target=self._run, name="gpt2-edge-scheduler", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current step; every sequence not finished gets an error event."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.side_executor is not None:
            self.side_executor.shutdown(wait=False, cancel_futures=True)

    # the scheduler thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                shrink = False
                if self._idle() and not self.kv.shrunk:
                    self._cond.wait_for(lambda: not self._idle(), self.idle_shrink_s)
                    shrink = self._idle()
            if shrink:  # nothing to do for a while: give the memory back (out of the lock)
                self.kv.shrink()
                if self._spec is not None:
                    self._spec.follow()  # the draft model's cache too
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
                        self._count_finish("cancelled")
            for slot, s in list(self._active.items()):
                if s.cancelled:
                    self._leave(slot, "cancelled")
            failed = False
            try:
                with self._cond:
                    plans = self.kv.plan(self._waiting, self._active, self._free)
                self._admit(plans)
                if self._prefilling:
                    self._prefill_step()
                decoding = sorted(slot for slot in self._active if slot not in self._prefilling)
                if decoding:
                    self._decode(decoding)
            except Exception as e:  # a failed step must not take the server down
                log.exception("scheduler step failed")
                self.kv.cache = self._spec = None  # its state is unknown now: nothing more is asked of it
                for slot in list(self._active):
                    self._fail(self._active[slot], f"generation failed: {type(e).__name__}")
                    self._leave(slot, "error")
                failed = True
            if failed:  # out of the handler, whose traceback held the old cache (an engine lane, say)
                try:
                    self._new_cache()
                except Exception:  # no cache, no server: /health says "down" from now on
                    log.exception("the scheduler cannot make a new KV cache; it stops")
                    with self._cond:
                        self._closing = True
                    break
        for slot in list(self._active):
            self._fail(self._active[slot], "the server shut down before the sequence finished")
            self._leave(slot, "error")
        with self._cond:
            while self._waiting:
                self._fail(self._waiting.popleft(), "the server shut down before the sequence started")
                self._in_system -= 1
        self.kv.cache = self._spec = None  # what it holds (an engine's lane, say) goes back now

    def _idle(self) -> bool:
        """Under ``_cond``: nothing to do but wait."""
        return not self._closing and not self._waiting and not self._active

    # the scheduler thread's steps ----------------------------------------------------------------
    def _new_cache(self) -> None:
        cache = self.kv.new_cache()
        if self.draft is not None and not can_verify(cache):
            raise Gpt2EdgeError(
                "a draft model needs a KV cache that rolls back (an in-place bundle on ONNX Runtime); "
                "this backend's concatenates"
            )
        self._spec = Speculator(cache, draft=self.draft) if can_verify(cache) else None

    def _admit(self, plans: list[Placement]) -> None:
        """Give each planned sequence its slot; the cache grows once for all of them and copies the
        prefixes they reuse."""
        if not plans:
            return
        for s, slot, _ in plans:
            self._free.remove(slot)
            self._active[slot] = s
        heapq.heapify(self._free)
        self._n_active = len(self._active)
        self._prefilling.update(self.kv.admit(plans, self._active))
        if self._spec is not None:
            self._spec.follow()  # the draft model's cache grows with the scheduler's

    def _prefill_step(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens (0: all), oldest admission first; a prompt whose
        last chunk went in gets its first token from that chunk's logits."""
        cache = self.kv.cache
        assert cache is not None
        budget = self.prefill_chunk or self.n_ctx * self.max_batch
        first: dict[int, list[int]] = {}  # slot -> its prompt's first chunk (prefill)
        more: dict[int, list[int]] = {}  # slot -> a later chunk (extend)
        for slot, done in self._prefilling.items():
            if budget <= 0:
                break
            prompt = self._active[slot].state.prompt
            chunk = prompt[done : done + budget]
            (more if done else first)[slot] = chunk
            budget -= len(chunk)
        logits: dict[int, np.ndarray] = {}
        for chunks, run in ((first, cache.prefill), (more, cache.extend)):
            if chunks:
                logits.update(zip(chunks, run(list(chunks), list(chunks.values())), strict=True))
        self._feed_draft([*first, *more])
        for slot, chunk in (*first.items(), *more.items()):
            self._prefilling[slot] += len(chunk)
            if self._prefilling[slot] == len(self._active[slot].state.prompt):
                del self._prefilling[slot]
                first_logits = logits[slot][None]
                self._advance(slot, [self._active[slot].state.choose(first_logits[0])], first_logits)

    def _feed_draft(self, slots: list[int]) -> None:
        """The draft model prefills what the scheduler's cache now holds of these prompts, chunk by
        chunk as they go in, so a long prompt's draft rows do not all go in within one decode step (a
        prefix-cache hit's copied positions go in with its first chunk: the draft's cache keeps no
        prefix cache). Only for sequences that may draft (a third token to emit at least)."""
        cache = self.kv.cache
        if self._spec is None or self.draft is None or cache is None:
            return
        feed = [s for s in slots if self._active[s].state.config.max_new_tokens > 2]
        if feed:
            states = [self._active[s].state for s in feed]
            self._spec.feed_draft(feed, states, [cache.length(s) for s in feed])

    def _decode(self, slots: list[int]) -> None:
        cache = self.kv.cache
        assert cache is not None
        if self.metrics is not None:
            self.metrics.batch_occupancy.observe(len(slots))
        states = [self._active[s].state for s in slots]
        if self._spec is not None and (
            self.draft is not None or any(state.config.prompt_lookup for state in states)
        ):
            for slot, r in zip(slots, self._spec.step(slots, states), strict=True):
                self._advance(slot, r.tokens, r.logits, r.drafted)
        else:
            logits = cache.decode(slots, [state.generated[-1] for state in states])
            for i, slot in enumerate(slots):
                self._advance(slot, [states[i].choose(logits[i])], logits[i : i + 1])
        if not self.kv.resizable:
            self.kv.count(self._active)

    def _advance(self, slot: int, tokens: list[int], logits: np.ndarray, drafted: int = 0) -> None:
        """Record and send one sequence's new ``tokens`` (``logits``: the model's, each was chosen
        from), in order, until it finishes; then release its slot."""
        s = self._active[slot]
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
        for token, row in zip(tokens, logits, strict=True):
            logprob, top = None, None
            if s.logprobs is not None:
                # The model's own distribution (before temperature / top-k / top-p), as OpenAI reports.
                lp = log_softmax(np.asarray(row, np.float64))
                logprob = float(lp[token])
                top = top_logprobs(lp, s.logprobs)
            piece = s.state.append(token)
            if m is not None:
                m.generation_tokens.inc()
            self._send(s, TokenEvent(token, piece, logprob, top, s.state.finish_reason))
            if s.state.finished:
                self._leave(slot, s.state.finish_reason or "length")
                return
            if s.cancelled:  # the rest of this step's tokens go nowhere; the slot is freed next
                return

    def _leave(self, slot: int, reason: str) -> None:
        self.kv.leave(slot, self._active[slot].state, keep=reason != "error")
        if self._spec is not None:
            self._spec.release(slot)
        heapq.heappush(self._free, slot)
        del self._active[slot]
        self._prefilling.pop(slot, None)
        self._n_active = len(self._active)
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
