"""The scheduler: it decides, and only decides. Each step it makes a ``StepPlan`` from the waiting
queue, the slots and the KV budget; the executor (executor.py) runs it, the output processor
(output.py) turns what came out into events, and the engine (engine.py) tells the scheduler who
left. It runs no model, touches no cache and speaks no HTTP: its tests (tests/serve/
test_scheduler.py) drive it with fake slots and a fake budget.

A step's plan, in the order the engine carries it out:

1. ``admit``: waiting sequences into free slots, oldest first, while their KV memory fits the
   budget (``Admission.plan``: admission.py's ``KVMemory``, which also picks a cached prefix a
   prompt starts from); the lowest free slots first, which keeps a step's rows together;
2. ``prefill`` / ``extend``: prompt chunks, oldest admission first, each at most
   ``prefill_chunk`` tokens of one prompt (0: the prompt's whole rest), within the step's token
   budget ``step_tokens`` (0: none): the decoding rows count one token each and come first
   (decode-first, as vLLM's ``max_num_batched_tokens`` and llama-server's batch), the chunks fill
   what is left; the oldest prompt's chunk always goes in, so prompts progress whatever the
   budget. The first chunk of a prompt is a ``prefill`` of its slot (from the prefix it reuses),
   the next ones ``extend`` it; a prompt's last chunk (``Chunk.last``) gives the sequence its first
   token;
3. ``decode``: every slot whose prompt is in after this step's chunks (a prompt completed by this
   step's chunk included, unless its first token finished it: the engine decodes the plan's slots
   that still hold their sequence).

So a request joins the running batch at the next step and leaves it the step it finishes, and a
long prompt costs the running streams at most one chunk's prefill per step instead of its whole
prefill. A sequence whose prompt is still going in holds its slot but is not decoded. The
scheduler advances a slot's ``prefilled`` when it plans the chunk (as vLLM's scheduler counts
computed tokens): a failed step fails every running sequence anyway.

**Why a step budget beside the chunk** (issue 23: guidellm's closed-loop clients, 16 streams of
128 + 64 tokens; benchmarks/sim_scheduler.py drives this scheduler under such clients with modelled
step costs, benchmarks/bench_serve_peers.py measures the server). A client's inter-token latency
(guidellm's: a request's mean gap) is its decode time plus every prefill that runs while it
decodes; the prefill work is the same however it is chunked, so what decides the latency is
*when* prompts go in. With one 256-token chunk per step, a burst of 16 prompts goes in two per
step: the sequences start (and so finish, and come back) a step or more apart, and from then on
every prompt goes in while the others decode (inter-token p50 at 16 clients 66-70 ms simulated,
73.5 ms measured before). When a burst goes in within one step, its sequences start together,
decode together and come back together: the next burst goes in while nobody decodes (39 ms
simulated). The price is the burst's time to first token (each of its sequences waits for all of
its prompts). A long prompt still goes in ``prefill_chunk`` tokens per step beside running streams.

Prompt scoring (``echo`` with ``logprobs``: one full-sequence pass per prompt) is planned here too:
at most one request's scoring per step (``StepPlan.score``), beside the step's tokens.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import Gpt2EdgeError
from ..runtime.prefix_cache import PrefixMatch
from .sequences import SequenceHandle, Slot

__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "DEFAULT_STEP_TOKENS",
    "MAX_DRAFT_TOKENS",
    "MAX_PROMPT_LOOKUP",
    "Admission",
    "Chunk",
    "Placement",
    "Scheduler",
    "StepPlan",
]

DEFAULT_PREFILL_CHUNK = 256  # tokens of one prompt per step; ServeSettings.prefill_chunk
# Tokens per step (decoding rows + prompt chunks); ServeSettings.step_tokens. llama-server's batch
# (n_batch) and vLLM's max_num_batched_tokens have this default too; 16 prompts of 128 tokens fit.
DEFAULT_STEP_TOKENS = 2048
MAX_PROMPT_LOOKUP = 32  # drafted tokens per step at most (ServeSettings.prompt_lookup, the request field)
MAX_DRAFT_TOKENS = 32  # a draft model's tokens per step at most (ServeSettings.draft_tokens)

# A waiting sequence admitted: its slot, and the cached prefix it starts from.
Placement = tuple[SequenceHandle, int, PrefixMatch | None]


class Admission(Protocol):
    """Which waiting sequences fit the KV budget, and into which slots (admission.py's
    ``KVMemory``; a test's fake budget)."""

    def plan(
        self, waiting: deque[SequenceHandle], running: Sequence[Slot], free: list[int]
    ) -> list[Placement]:
        """Take the sequences that fit from the front of ``waiting`` (oldest first), each with its
        slot among ``free`` and the prefix it starts from; stop at the first that does not fit."""
        ...

    def need_of(self, s: SequenceHandle) -> int:
        """The KV tokens ``s`` may hold."""
        ...


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens of one slot that go into the cache this step."""

    slot: int
    tokens: list[int]
    last: bool  # the prompt's last chunk: its logits give the sequence its first token


@dataclass
class StepPlan:
    """What one step does, decided before anything runs (module docstring)."""

    admit: list[Placement] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)  # first chunks of prompts (``cache.prefill``)
    extend: list[Chunk] = field(default_factory=list)  # later chunks (``cache.extend``)
    decode: list[int] = field(default_factory=list)  # slots decoded after the chunks, lowest first
    score: Any = None  # one request's prompt scoring (engine.ScoreJob), or None

    @property
    def empty(self) -> bool:
        return not (self.admit or self.prefill or self.extend or self.decode or self.score is not None)


class Scheduler:
    """Decides each step from the queue, the slots and the KV budget (module docstring). Only the
    engine's thread calls it; ``slots`` is the one record of who runs where."""

    def __init__(
        self,
        memory: Admission,
        *,
        n_ctx: int,
        max_batch: int = 8,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        step_tokens: int = DEFAULT_STEP_TOKENS,
    ) -> None:
        if max_batch < 1:
            raise Gpt2EdgeError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 0:
            raise Gpt2EdgeError(f"prefill_chunk must be >= 0 (0 = whole prompts), got {prefill_chunk}")
        if step_tokens < 0:
            raise Gpt2EdgeError(f"step_tokens must be >= 0 (0 = no step budget), got {step_tokens}")
        self.memory = memory
        self.n_ctx = n_ctx
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.step_tokens = step_tokens
        self.slots = [Slot(i) for i in range(max_batch)]
        self._free = list(range(max_batch))  # a heap: the lowest slots first
        self._admitted = 0  # admissions so far: each slot's ``order``
        self.n_active = 0  # slots holding a sequence

    def running(self) -> list[Slot]:
        """The slots holding a sequence, oldest admission first (the order the prefix cache
        learns released rows in, and looks at running ones)."""
        return sorted((s for s in self.slots if s.seq is not None), key=_admission)

    def cancelled(self) -> list[Slot]:
        """Running slots whose sequence was cancelled, oldest admission first: the engine frees
        them before the step."""
        out = [s for s in self.slots if s.seq is not None and s.seq.cancelled]
        return sorted(out, key=_admission) if len(out) > 1 else out

    def schedule(self, waiting: deque[SequenceHandle], scoring: deque[Any] | None = None) -> StepPlan:
        """This step's plan; takes the admitted sequences from ``waiting`` and at most one job from
        ``scoring`` (call it under the lock their submitters use)."""
        plan = StepPlan(score=scoring.popleft() if scoring else None)
        if waiting and self._free:
            plan.admit = self.memory.plan(waiting, self.running(), sorted(self._free))
        for seq, index, match in plan.admit:
            self._free.remove(index)
            self._admitted += 1
            self.slots[index].take(
                seq, match.length if match is not None else 0, self.memory.need_of(seq), self._admitted
            )
        if plan.admit:
            heapq.heapify(self._free)
            self.n_active = self.max_batch - len(self._free)
        prefilling: list[Slot] = []
        decode: list[int] = []  # slot indices, lowest first
        for slot in self.slots:
            seq = slot.seq
            if seq is not None:
                if slot.prefilled < len(seq.state.prompt):
                    prefilling.append(slot)
                else:
                    decode.append(slot.index)
        if prefilling:
            if len(prefilling) > 1:
                prefilling.sort(key=_admission)
            # decode-first: the decoding rows take their tokens of the budget, the chunks the rest
            room = self.step_tokens - len(decode) if self.step_tokens else self.n_ctx * self.max_batch
            completed = False
            for n, slot in enumerate(prefilling):
                prompt = slot.seq.state.prompt  # type: ignore[union-attr]
                done = slot.prefilled
                size = min(len(prompt) - done, self.prefill_chunk or self.n_ctx)
                if n:  # the oldest prompt's chunk always goes in: prompts progress whatever the budget
                    size = min(size, room)
                if size <= 0:
                    break
                tokens = prompt[done : done + size]
                slot.prefilled += size
                chunk = Chunk(slot.index, tokens, slot.prefilled == len(prompt))
                (plan.extend if done else plan.prefill).append(chunk)
                room -= size
                if chunk.last:  # its prompt is in: decoded with the others this step
                    decode.append(slot.index)
                    completed = True
            if completed:
                decode.sort()
        plan.decode = decode
        return plan

    def still_running(self, slots: Sequence[int]) -> list[int]:
        """Of ``slots``, those whose sequence has not left (a first token can finish one)."""
        return [i for i in slots if self.slots[i].seq is not None]

    def leave(self, index: int) -> SequenceHandle:
        """The sequence in slot ``index`` left (finished, cancelled or failed): the slot is free."""
        seq = self.slots[index].clear()
        heapq.heappush(self._free, index)
        self.n_active = self.max_batch - len(self._free)
        return seq


def _admission(slot: Slot) -> int:
    return slot.order
