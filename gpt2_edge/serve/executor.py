"""The executor: runs a scheduler's plan on the backend and the KV cache, and nothing else.

It owns the KV memory (admission.py's ``KVMemory``: the cache, its growth within the budget, the
prefix cache) and, beside a cache that rolls back, the ``runtime.speculative.Speculator``. Per
step it

- admits: grows the cache once for the admitted sequences and copies the prefixes they reuse
  (the draft model's cache follows);
- prefills and extends the plan's prompt chunks, in passes of at most ``PASS_TOKENS`` padded
  tokens (neighbouring slots together): a step's budget (scheduler.py's ``step_tokens``) may hold a
  burst of prompts, and one pass over all of them would hold their activations at once (measured:
  peak RSS +19% at 16 prompts of 128 in one pass) for no speed (prefill time is linear in tokens on
  the CPU); a prompt's last chunk gives the sequence its first token, chosen with the sequence's
  own chooser (its own seed). With a draft model, its rows are prefilled chunk by chunk as the
  prompt goes in (``feed_draft``);
- decodes: one ``decode`` over the plan's slots, or, where a sequence asks for speculative decoding
  (``GenerationConfig.prompt_lookup``) or a draft model drafts for every sequence, one
  ``Speculator.step``: drafts, one verifying pass, the rejected positions rolled back in place.
  A sequence then gets several tokens in one step, each with the target's logits it was chosen
  from. Greedy tokens are plain decoding's (up to the last-bit caveat of
  ``runtime.speculative``'s "Numerics"); sampled ones keep the target's distribution and a seed's
  tokens. A concatenating cache (the TensorRT engine, the ``tensorrt`` target) decodes plainly;
- scores prompts: one full-sequence pass (``backend.logits``) per prompt, for ``echo`` with
  ``logprobs``, on the engine's thread between steps;
- releases a leaving sequence's rows (into the prefix cache unless it failed) and its draft rows.

**A draft model** (``gpt2-edge serve --draft``): its in-place cache has the target cache's shape
(``Speculator.follow`` after each growth and idle shrink), one row per slot, prefilled from
position 0 (also where the prefix cache copied the target's rows), rolled back with the target's,
released with the slot. Its memory is not in ``kv_budget`` (a budget of positions; the draft's
positions are the same ones): it adds the draft's KV bytes per position to each.

What a step's tokens become (events, logprobs, metrics) is output.py's. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import Gpt2EdgeError
from ..runtime.constraints import mask_worker, masks_of
from ..runtime.speculative import DraftModel, Speculator
from ..runtime.types import Backend, can_verify
from .admission import KVMemory
from .scheduler import Chunk, Placement
from .sequences import Slot

# One sequence's part of a step: its new tokens, the logits each was chosen from, tokens drafted.
Step = tuple[list[int], np.ndarray, int]
# Padded prompt tokens per pass at most (a longer chunk runs alone): the pass size of one default
# chunk, which the scheduler's step budget may exceed many times over (module docstring).
PASS_TOKENS = 256


def passes(chunks: Sequence[Chunk], limit: int = PASS_TOKENS) -> list[list[Chunk]]:
    """``chunks`` in passes: by slot, neighbouring slots together while rows x the longest chunk
    stays within ``limit`` (the cache pads a pass's chunks to its longest, over contiguous rows)."""
    out: list[list[Chunk]] = []
    for c in sorted(chunks, key=lambda c: c.slot):
        group = out[-1] if out else None
        if (
            group is not None
            and c.slot == group[-1].slot + 1
            and (len(group) + 1) * max(len(c.tokens), *(len(g.tokens) for g in group)) <= limit
        ):
            group.append(c)
        else:
            out.append([c])
    return out


class Executor:
    """Runs plans on ``backend`` over the cache ``memory`` manages (module docstring)."""

    def __init__(self, backend: Backend, memory: KVMemory, draft: DraftModel | None = None) -> None:
        self.backend = backend
        self.kv = memory
        self.draft = draft
        self.spec: Speculator | None = None  # beside a cache that rolls back
        self.pass_tokens = PASS_TOKENS

    @property
    def draft_tokens_allocated(self) -> int:
        spec = self.spec
        return spec.draft_tokens_allocated if spec is not None else 0

    def new_cache(self) -> None:
        """A fresh cache (and speculator); a backend that cannot hold the batch says so here."""
        cache = self.kv.new_cache()
        if self.draft is not None and not can_verify(cache):
            raise Gpt2EdgeError(
                "a draft model needs a KV cache that rolls back (an in-place bundle on ONNX Runtime); "
                "this backend's concatenates"
            )
        self.spec = Speculator(cache, draft=self.draft) if can_verify(cache) else None

    def drop_cache(self) -> None:
        """Ask nothing more of the cache (a failed step left it unknown, or the engine stopped):
        what it holds (an engine's lane, say) goes back now."""
        self.kv.cache = self.spec = None

    def shrink(self) -> None:
        """Idle: the cache (and the draft's) back to the idle size."""
        self.kv.shrink()
        if self.spec is not None:
            self.spec.follow()

    def admit(self, plans: list[Placement], running: Sequence[Slot]) -> None:
        if not plans:
            return
        self.kv.admit(plans, running)
        if self.spec is not None:
            self.spec.follow()  # the draft model's cache grows with the target's

    def prefill(self, slots: Sequence[Slot], prefill: list[Chunk], extend: list[Chunk]) -> dict[int, Step]:
        """Put the chunks into the cache (``prefill``: prompts' first chunks, ``extend``: later
        ones); each prompt whose last chunk went in -> its first token and the logits it was chosen
        from, in the order of the chunks (``slots``: the scheduler's, by index)."""
        cache = self.kv.cache
        assert cache is not None
        logits: dict[int, np.ndarray] = {}
        for chunks, run in ((prefill, cache.prefill), (extend, cache.extend)):
            for group in passes(chunks, self.pass_tokens):
                rows = run([c.slot for c in group], [c.tokens for c in group])
                logits.update(zip((c.slot for c in group), rows, strict=True))
        self._feed_draft(slots, [c.slot for c in (*prefill, *extend)])
        first: dict[int, Step] = {}
        for c in (*prefill, *extend):
            if c.last:
                state = slots[c.slot].seq.state  # type: ignore[union-attr]
                row = logits[c.slot][None]
                first[c.slot] = ([state.choose(row[0])], row, 0)
        return first

    def _feed_draft(self, slots: Sequence[Slot], fed: list[int]) -> None:
        """The draft model prefills what the target's cache now holds of these prompts, chunk by
        chunk as they go in, so a long prompt's draft rows do not all go in within one decode step (a
        prefix-cache hit's copied positions go in with its first chunk: the draft's cache keeps no
        prefix cache). Only for sequences that may draft (a third token to emit at least)."""
        cache = self.kv.cache
        if self.spec is None or self.draft is None or cache is None:
            return
        feed = [i for i in fed if slots[i].seq.state.config.max_new_tokens > 2]  # type: ignore[union-attr]
        if feed:
            states = [slots[i].seq.state for i in feed]  # type: ignore[union-attr]
            self.spec.feed_draft(feed, states, [cache.length(i) for i in feed])

    def decode(self, slots: Sequence[Slot], decode: list[int]) -> list[Step]:
        """One step of the sequences in ``decode`` (slot indices, lowest first): for each, its next
        tokens, the logits each was chosen from (views of the pass's, no copy), and how many tokens
        were drafted for it."""
        cache = self.kv.cache
        assert cache is not None
        states = [slots[i].seq.state for i in decode]  # type: ignore[union-attr]
        if self.spec is not None and (
            self.draft is not None or any(state.config.prompt_lookup for state in states)
        ):
            return [(r.tokens, r.logits, r.drafted) for r in self.spec.step(decode, states)]
        constrained = [s for s in states if s.constraint is not None]
        # the constrained rows' masks in a worker thread while the model runs (none for free rows)
        ahead = mask_worker().submit(masks_of, constrained) if constrained else None
        logits = cache.decode(decode, [state.generated[-1] for state in states])
        masks = dict(zip(map(id, constrained), ahead.result(), strict=True)) if ahead is not None else {}
        return [
            ([state.choose(logits[i], masks.get(id(state)))], logits[i : i + 1], 0)
            for i, state in enumerate(states)
        ]

    def release(self, slot: Slot, keep: bool) -> None:
        """The sequence in ``slot`` leaves: its rows are free (``keep``: they stay in the prefix
        cache until overwritten), and its draft rows."""
        assert slot.seq is not None
        self.kv.leave(slot.index, slot.seq.state, keep=keep, adapter_id=slot.seq.adapter_id)
        if self.spec is not None:
            self.spec.release(slot.index)

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """The logits of every position of ``ids``, one full-sequence pass: ``(T, V)``."""
        return self.backend.logits(np.asarray([ids], np.int64))[0]  # type: ignore[attr-defined]
