"""The engine's data: what a request hands it and gets back, and where a sequence runs.

- ``SequenceHandle``: one sequence to generate (its ``SequenceState``, the sink its ``TokenEvent``s
  go to, its log-probabilities request, its timings, its cancel flag);
- ``Slot``: one KV slot and all the engine knows of the sequence in it (the handle, the prompt
  tokens in the cache, the KV tokens it may hold, its admission order). A slot's sequence joins
  with ``take`` and leaves with ``clear``: nothing else holds a sequence's state (but the
  speculator's per-row drafting record, which ``runtime.speculative`` keeps by slot);
- ``Reservation``: room held for a request's sequences before they exist;
- the engine's two refusals, ``QueueFullError`` and ``SchedulerClosedError``.

Torch-free; no model needed: the scheduler's unit tests build these with fakes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..runtime.constraints import CompiledConstraint
from ..runtime.sampling import GenerationConfig
from ..runtime.sequence import SequenceState


class QueueFullError(Exception):
    """No room for more sequences: the caller answers 429 and the client retries later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SchedulerClosedError(Exception):
    """The engine is shutting down and takes no new sequences (or prompt scoring)."""


class Reservation:
    """Room for ``n`` sequences held in the engine's bound before they exist: a request takes
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
    """A sequence submitted to the engine; the submitter may ``cancel`` it at any time."""

    def __init__(
        self,
        prompt: Sequence[int],
        config: GenerationConfig,
        sink: Callable[[TokenEvent], None],
        *,
        eos_token_id: int | None,
        detokenize: Callable[[Sequence[int]], str],
        logprobs: int | None = None,
        constraint: CompiledConstraint | None = None,
        adapter_id: int = 0,
    ) -> None:
        """``logprobs``: None for none, k >= 0 for the chosen token's log-probability and the k
        most likely alternatives at each step. ``constraint``: ``config.constraint`` compiled (the
        sequence's matcher then lives on its state). ``adapter_id``: the LoRA adapter its slot runs
        with (``Model.adapter_id``; 0 = none)."""
        self.state = SequenceState(prompt, config, eos_token_id, detokenize, constraint)
        self.adapter_id = adapter_id
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
        """Stop generating; the engine frees the slot before its next step. Idempotent."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._wake()


class Slot:
    """One KV-cache slot (row ``index``) and the sequence in it, if any: the one place a running
    sequence's state lives (module docstring)."""

    __slots__ = ("index", "need", "order", "prefilled", "seq")

    def __init__(self, index: int) -> None:
        self.index = index
        self.seq: SequenceHandle | None = None
        self.prefilled = 0  # prompt tokens in the cache (a copied prefix included)
        self.need = 0  # KV tokens the sequence may hold: prompt + max_new_tokens, within the context
        self.order = 0  # when it was admitted: prompts are prefilled oldest admission first

    def take(self, seq: SequenceHandle, prefilled: int, need: int, order: int) -> None:
        self.seq, self.prefilled, self.need, self.order = seq, prefilled, need, order

    def clear(self) -> SequenceHandle:
        """The sequence leaves: the slot is free (its KV rows are the executor's to release)."""
        seq = self.seq
        assert seq is not None
        self.seq, self.prefilled, self.need = None, 0, 0
        return seq

    @property
    def prefilling(self) -> bool:
        """Its prompt is still going in (it holds the slot but is not decoded)."""
        return self.seq is not None and self.prefilled < len(self.seq.state.prompt)

    def __repr__(self) -> str:
        return (
            f"Slot({self.index}, prefilled={self.prefilled}, need={self.need}, busy={self.seq is not None})"
        )
