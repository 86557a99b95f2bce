"""The two KV-cache forms behind one slot interface (``types.KVCache``). Torch-free.

**In place** (``InPlaceCache``, the ``ort`` target's default): one buffer per layer and K/V of
``[n_slots, n_head, capacity, head_size]``, allocated once when the cache is made. The graph's
attention (ONNX Runtime ``GroupQueryAttention``) gets the same buffer bound as past *and*
present, so a step writes only its new positions. Each row is a slot with its own length; a
step runs a contiguous range of rows, rows with nothing to do are idle (no tokens written).

**Concatenating** (``ConcatCache``, the interchange form, the ``tensorrt`` target's): the graph
returns past + new as fresh ``present`` tensors. The slots live in one left-padded batch whose
presents are bound as the next step's past; a slot joining or leaving re-pads the batch once.
A step that feeds some rows only (``extend`` of a chunk, ``decode`` of some slots) gives the
others masked pad columns; when those gaps would push the batch past ``capacity`` columns, the
batch is re-padded without them (``_compact``, through the host like a join).

In-place graph inputs, per row ``b`` of a step (a right-padded chunk of ``S`` tokens):
``attention_mask[b]`` has ``T_b`` leading ones (``T_b`` = tokens cached after the step),
``position_ids[b, 0]`` is the first new token's position ``P_b``, so the row brings
``T_b - P_b`` tokens (0 = idle). ``logits_to_keep = 1`` returns each row's last new position.

One file past 400 lines: the two cache forms share the slot rules (``_check_prefill``) and are
read side by side; each is about 200 lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..errors import Gpt2EdgeError
from .types import left_pad


class CacheError(Gpt2EdgeError):
    """A slot was used out of turn (full, busy, free or out of range)."""


def _check_prefill(cache: Any, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> None:
    if len(slots) != len(prompts) or not slots:
        raise CacheError(f"prefill needs one prompt per slot, got {len(slots)} slots, {len(prompts)} prompts")
    if len(set(slots)) != len(slots):
        raise CacheError(f"slots repeat: {list(slots)}")
    for s, p in zip(slots, prompts, strict=True):
        if not 0 <= s < cache.n_slots:
            raise CacheError(f"slot {s} is out of range (0..{cache.n_slots - 1})")
        if cache.length(s):
            raise CacheError(f"slot {s} is busy ({cache.length(s)} tokens); release it first")
        if not 0 < len(p) <= cache.capacity:
            raise CacheError(f"a prompt of {len(p)} tokens does not fit a slot of {cache.capacity}")


def _check_extend(cache: Any, slots: Sequence[int], chunks: Sequence[Sequence[int]]) -> None:
    if len(slots) != len(chunks) or not slots:
        raise CacheError(f"extend needs one chunk per slot, got {len(slots)} slots, {len(chunks)} chunks")
    if len(set(slots)) != len(slots):
        raise CacheError(f"slots repeat: {list(slots)}")
    for s, c in zip(slots, chunks, strict=True):
        if not 0 <= s < cache.n_slots:
            raise CacheError(f"slot {s} is out of range (0..{cache.n_slots - 1})")
        held = cache.length(s)
        if not held:
            raise CacheError(f"slot {s} is empty; prefill it first")
        if not c:
            raise CacheError(f"the chunk for slot {s} is empty")
        if held + len(c) > cache.capacity:
            raise CacheError(
                f"a chunk of {len(c)} tokens does not fit slot {s} after {held} cached "
                f"(capacity {cache.capacity})"
            )


class ConcatRunner(Protocol):
    """One forward pass of a concatenating-form model, with its tensors kept opaque."""

    pad_id: int

    def run(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        pos: np.ndarray,
        past: list[Any] | None,
        adapter_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[Any]]:
        """Last-position logits ``(B, V)`` and the presents; ``past=None`` is an empty past."""
        ...

    def to_numpy(self, value: Any) -> np.ndarray: ...

    def from_numpy(self, array: np.ndarray) -> Any: ...


class ConcatCache:
    """Slots over a concatenating-form model: one left-padded batch, presents fed back as past.

    It cannot roll a slot back (``truncate``) nor return every position's logits (``verify``):
    ``can_verify`` is False, and speculative decoding runs plain steps on it."""

    can_verify = False

    def __init__(self, runner: ConcatRunner, n_slots: int, capacity: int, lora: bool = False) -> None:
        self.runner = runner
        self.n_slots = n_slots
        self.capacity = capacity
        # LoRA slots: each slot's adapter id (0 = none), fed per row (``set_adapter``); None = no slots.
        self._adapter: dict[int, int] | None = {} if lora else None
        self._rows: list[int] = []  # the slot held by each batch row
        self._past: list[Any] | None = None
        self._mask = np.zeros((0, 0), np.int64)
        self._next = np.zeros(0, np.int64)  # real tokens of each row = its next position

    def length(self, slot: int) -> int:
        return int(self._next[self._rows.index(slot)]) if slot in self._rows else 0

    def set_adapter(self, slot: int, adapter_id: int) -> None:
        """Run ``slot`` with LoRA adapter ``adapter_id`` (0 = none) from its next pass on (set it
        before the prefill: the cached keys and values are the adapter's)."""
        if self._adapter is None:
            if adapter_id:
                raise CacheError("this model takes no LoRA adapters at run time")
            return
        self._adapter[slot] = adapter_id

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any] | None, slots: Sequence[int]
    ) -> tuple[np.ndarray, list[Any]]:
        """One pass of the runner; ``slots``: the slot of each row (their adapters, with LoRA slots)."""
        if self._adapter is None:
            return self.runner.run(ids, mask, pos, past)
        adapter_ids = np.array([self._adapter.get(s, 0) for s in slots], np.int64)
        return self.runner.run(ids, mask, pos, past, adapter_ids=adapter_ids)

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> np.ndarray:
        _check_prefill(self, slots, prompts)
        ids, mask, pos = left_pad(prompts, self.runner.pad_id)
        logits, presents = self._run(ids, mask, pos, None, slots)
        lengths = np.array([len(p) for p in prompts], np.int64)
        if not self._rows:
            self._rows, self._past, self._mask, self._next = list(slots), presents, mask, lengths
        else:
            self._join(list(slots), presents, mask, lengths)
        return logits

    def _join(self, slots: list[int], presents: list[Any], mask: np.ndarray, lengths: np.ndarray) -> None:
        """Left-pad the running batch and the new rows to one width and stack them."""
        assert self._past is not None
        width = max(self._mask.shape[1], mask.shape[1])

        def pad(a: np.ndarray, axis: int) -> np.ndarray:
            widths = [(0, 0)] * a.ndim
            widths[axis] = (width - a.shape[axis], 0)
            return np.pad(a, widths)

        self._past = [
            self.runner.from_numpy(
                np.concatenate([pad(self.runner.to_numpy(a), 2), pad(self.runner.to_numpy(b), 2)])
            )
            for a, b in zip(self._past, presents, strict=True)
        ]
        self._mask = np.concatenate([pad(self._mask, 1), pad(mask, 1)])
        self._rows += slots
        self._next = np.concatenate([self._next, lengths])

    def extend(self, slots: Sequence[int], chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """One pass over the whole batch: each chunk right-aligned in its row (its last token in the
        last column, whose logits come back), masked pads in the rows of the other slots."""
        _check_extend(self, slots, chunks)
        todo = {s: list(c) for s, c in zip(slots, chunks, strict=True)}
        out: dict[int, np.ndarray] = {}
        while todo:
            room = self._make_room(max(len(c) for c in todo.values()))
            if room < 1:
                full = [s for s, n in zip(self._rows, self._next, strict=True) if n >= self.capacity]
                raise CacheError(f"slot {full[0]} is full ({self.capacity} tokens); release it first")
            piece = {s: c[:room] for s, c in todo.items()}
            logits = self._run_chunks(piece)
            for s, c in piece.items():
                if len(c) == len(todo[s]):
                    out[s] = logits[self._rows.index(s)]
                    del todo[s]
                else:
                    todo[s] = todo[s][len(c) :]
        return np.stack([out[s] for s in slots])

    def _run_chunks(self, chunks: dict[int, list[int]]) -> np.ndarray:
        """Append ``chunks`` (slot -> tokens) right-aligned in one pass; each row's last logits."""
        S = max(len(c) for c in chunks.values())
        R = len(self._rows)
        ids = np.full((R, S), self.runner.pad_id, np.int64)
        new = np.zeros((R, S), np.int64)
        # Pads take a valid position; with mask 0 they are never attended to.
        pos = np.repeat(np.minimum(self._next, self.capacity - 1)[:, None], S, axis=1)
        for s, c in chunks.items():
            r, k = self._rows.index(s), len(c)
            ids[r, S - k :] = c
            new[r, S - k :] = 1
            pos[r, S - k :] = self._next[r] + np.arange(k)
        mask = np.concatenate([self._mask, new], axis=1)
        logits, self._past = self._run(ids, mask, pos, self._past, self._rows)
        self._mask = mask
        self._next = self._next + new.sum(axis=1)
        return logits

    def _make_room(self, width: int) -> int:
        """Columns a pass may add (up to ``width``) without the batch outgrowing ``capacity``;
        re-pads the batch without its gaps first when they are in the way."""
        room = self.capacity - self._mask.shape[1]
        if room < width and self._mask.shape[1] > int(self._next.max()):
            self._compact()
            room = self.capacity - self._mask.shape[1]
        return min(room, width)

    def _compact(self) -> None:
        """Re-pad the batch without the columns each row masks: every row's tokens right-aligned,
        the batch as wide as its longest row. (Positions are explicit: a cached key does not
        depend on its column.)"""
        assert self._past is not None
        width = int(self._next.max())
        cols = [np.flatnonzero(row) for row in self._mask]
        mask = np.zeros((len(cols), width), np.int64)
        for r, c in enumerate(cols):
            mask[r, width - len(c) :] = 1
        past = []
        for p in self._past:
            a = self.runner.to_numpy(p)  # (rows, heads, columns, head_size)
            b = np.zeros((*a.shape[:2], width, a.shape[3]), a.dtype)
            for r, c in enumerate(cols):
                b[r, :, width - len(c) :] = a[r][:, c]
            past.append(self.runner.from_numpy(b))
        self._past, self._mask = past, mask

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        if self._rows:
            self._make_room(1)
        row_of = {s: r for r, s in enumerate(self._rows)}
        feed = np.full(len(self._rows), self.runner.pad_id, np.int64)
        active = np.zeros(len(self._rows), np.int64)
        for s, t in zip(slots, tokens, strict=True):
            if s not in row_of:
                raise CacheError(f"slot {s} is empty; prefill it first")
            if self._next[row_of[s]] >= self.capacity:
                raise CacheError(f"slot {s} is full ({self.capacity} tokens)")
            feed[row_of[s]] = t
            active[row_of[s]] = 1
        # Idle rows take a pad token with mask 0: it is never attended to.
        mask = np.concatenate([self._mask, active[:, None]], axis=1)
        pos = np.minimum(self._next, self.capacity - 1)[:, None]
        logits, self._past = self._run(feed[:, None], mask, pos, self._past, self._rows)
        self._mask = mask
        self._next = self._next + active
        return logits[[row_of[s] for s in slots]]

    def verify(self, slots: Sequence[int], chunks: Sequence[Sequence[int]]) -> np.ndarray:
        raise CacheError("the concatenating KV cache cannot verify drafted tokens (no rollback)")

    def truncate(self, slot: int, length: int) -> None:
        raise CacheError("the concatenating KV cache cannot roll a slot back")

    def release(self, slot: int) -> None:
        if slot not in self._rows:
            return
        keep = [r for r, s in enumerate(self._rows) if s != slot]
        self._take(keep, [self._rows[r] for r in keep])
        if self._adapter is not None:
            self._adapter.pop(slot, None)

    def reorder(self, sources: Sequence[int]) -> None:
        row_of = {s: r for r, s in enumerate(self._rows)}
        self._take([row_of[s] for s in sources], list(range(len(sources))))
        if self._adapter is not None:
            self._adapter = {i: self._adapter.get(s, 0) for i, s in enumerate(sources)}

    def _take(self, rows: list[int], slots: list[int]) -> None:
        if not rows:
            self._rows, self._past = [], None
            self._mask, self._next = np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
            return
        mask = self._mask[rows]
        first = int(np.argmax(mask.any(axis=0)))  # drop columns no remaining row attends to
        assert self._past is not None
        self._past = [self.runner.from_numpy(self.runner.to_numpy(p)[rows][:, :, first:]) for p in self._past]
        self._mask = mask[:, first:]
        self._next = self._next[rows]
        self._rows = slots


class InPlaceBinding(Protocol):
    """A model's inputs/outputs bound to a fixed range of cache rows (past = present = the rows)."""

    def run(self, feeds: dict[str, np.ndarray], prompt: bool = False) -> np.ndarray:
        """Each row's last-position logits ``(rows, V)``; valid until the next run. ``prompt``: the
        rows bring prompt chunks (a model with a prompt graph runs them through it)."""
        ...

    def run_all(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits at every position ``(rows, S, V)``."""
        ...


class InPlaceRunner(Protocol):
    """An in-place-form model: host buffers for the cache, and bindings over ranges of their rows."""

    n_positions: int

    def cache_arrays(self, n_slots: int, capacity: int) -> list[np.ndarray]:
        """Zeroed buffers, one per past input, ``[n_slots, n_head, capacity, head_size]``."""
        ...

    def inplace_binding(self, cache: list[np.ndarray]) -> InPlaceBinding:
        """Bind ``cache`` (views of the buffers: rows lo..hi) as both past and present."""
        ...


class InPlaceCache:
    """Slots in buffers allocated once; each step writes only the new positions. A slot rolls back
    by its length alone (``truncate``), which makes speculative decoding's ``verify`` cheap."""

    can_verify = True

    def __init__(self, runner: InPlaceRunner, n_slots: int, capacity: int, lora: bool = False) -> None:
        if not 0 < capacity <= runner.n_positions:
            raise CacheError(f"capacity must be in 1..{runner.n_positions} (the context), got {capacity}")
        self.runner = runner
        self.n_slots = n_slots
        self.capacity = capacity
        self.buffers = runner.cache_arrays(n_slots, capacity)
        self._len = np.zeros(n_slots, np.int64)
        self._bindings: dict[tuple[int, int], InPlaceBinding] = {}  # per row range, made once
        # LoRA slots: each slot's adapter id (0 = none), fed per row (``set_adapter``); None = no slots.
        self._adapter = np.zeros(n_slots, np.int64) if lora else None

    def length(self, slot: int) -> int:
        return int(self._len[slot])

    def set_adapter(self, slot: int, adapter_id: int) -> None:
        """Run ``slot`` with LoRA adapter ``adapter_id`` (0 = none) from its next pass on (set it
        before the prefill: the cached keys and values are the adapter's)."""
        if self._adapter is None:
            if adapter_id:
                raise CacheError("this model takes no LoRA adapters at run time")
            return
        self._adapter[slot] = adapter_id

    def _with_adapters(self, feeds: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
        if self._adapter is not None:
            feeds["adapter_ids"] = self._adapter[lo:hi].copy()
        return feeds

    def _binding(self, lo: int, hi: int) -> InPlaceBinding:
        binding = self._bindings.get((lo, hi))
        if binding is None:
            binding = self._bindings[(lo, hi)] = self.runner.inplace_binding([b[lo:hi] for b in self.buffers])
        return binding

    def _step(
        self, chunks: dict[int, Sequence[int]], keep_all: bool = False, prompt: bool = False
    ) -> np.ndarray:
        """One forward pass over rows ``min(chunks)..max(chunks)``; rows without a chunk idle.
        ``prompt``: the chunks are prompt tokens (``prefill``/``extend``: the runner's prompt graph,
        where it has one; a generated token never goes there, so a sequence's tokens run the same
        graph however its prompt was chunked or batched)."""
        lo, hi = min(chunks), max(chunks) + 1
        S = max(len(c) for c in chunks.values())
        rows = np.arange(lo, hi)
        past = self._len[lo:hi]
        q = np.array([len(chunks.get(int(r), ())) for r in rows], np.int64)
        if np.any((q > 0) & (past + S > self.capacity)):
            raise CacheError(
                f"a chunk of {S} tokens does not fit after {past.max()} cached (capacity {self.capacity})"
            )
        # An idle row states P = T (nothing new) at a length that leaves room for the padded chunk.
        start = np.where(q > 0, past, np.clip(past, 1, max(self.capacity - S, 1)))
        total = start + q
        ids = np.zeros((hi - lo, S), np.int64)
        for i, r in enumerate(rows):
            c = chunks.get(int(r))
            if c:
                ids[i, : len(c)] = c
        pos = np.minimum(
            start[:, None] + np.minimum(np.arange(S)[None], np.maximum(q - 1, 0)[:, None]),
            self.runner.n_positions - 1,
        )
        pos[:, 0] = start  # the graph reads the row's new-token count as T - position_ids[:, 0]
        mask = (np.arange(int(total.max()))[None] < total[:, None]).astype(np.int64)
        feeds = self._with_adapters({"input_ids": ids, "attention_mask": mask, "position_ids": pos}, lo, hi)
        binding = self._binding(lo, hi)
        logits = binding.run_all(feeds) if keep_all else binding.run(feeds, prompt=prompt).copy()
        self._len[lo:hi] += q
        return logits

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> np.ndarray:
        _check_prefill(self, slots, prompts)
        return self._chunks(slots, prompts)

    def extend(self, slots: Sequence[int], chunks: Sequence[Sequence[int]]) -> np.ndarray:
        _check_extend(self, slots, chunks)
        return self._chunks(slots, chunks)

    def _one_pass(self, slots: Sequence[int], width: int) -> bool:
        """Whether ``slots`` are a contiguous range (a generate call's batch) where every chunk
        padded to ``width`` fits."""
        return max(slots) - min(slots) + 1 == len(slots) and all(
            self._len[s] + width <= self.capacity for s in slots
        )

    def _chunks(self, slots: Sequence[int], chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """Each chunk after its slot's cached tokens: one pass where ``_one_pass`` allows, else one
        pass per slot."""
        if self._one_pass(slots, max(len(c) for c in chunks)):
            out = self._step({slots[i]: chunks[i] for i in range(len(slots))}, prompt=True)
            return out[[s - min(slots) for s in slots]]
        return np.concatenate([self._step({s: c}, prompt=True) for s, c in zip(slots, chunks, strict=True)])

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        # The per-token path: the same feeds as ``_step`` for one-token chunks, built with numpy.
        idx = np.asarray(slots, dtype=np.int64)
        held = self._len[idx]
        if not held.all() or (held >= self.capacity).any():
            bad = int(idx[np.argmax((held == 0) | (held >= self.capacity))])
            why = "is empty; prefill it first" if not self._len[bad] else f"is full ({self.capacity} tokens)"
            raise CacheError(f"slot {bad} {why}")
        lo, hi = int(idx.min()), int(idx.max()) + 1
        past = self._len[lo:hi]
        active = np.zeros(hi - lo, np.int64)
        active[idx - lo] = 1
        # idle rows state P = T (nothing new) at a length with room for the one-token chunk
        start = np.where(active, past, np.minimum(np.maximum(past, 1), self.capacity - 1))
        total = start + active
        ids = np.zeros((hi - lo, 1), np.int64)
        ids[idx - lo, 0] = tokens
        mask = (np.arange(int(total.max()))[None] < total[:, None]).astype(np.int64)
        feeds = self._with_adapters(
            {"input_ids": ids, "attention_mask": mask, "position_ids": start[:, None]}, lo, hi
        )
        logits = self._binding(lo, hi).run(feeds)[
            idx - lo
        ]  # fancy indexing copies out of the binding's buffer
        self._len[lo:hi] += active
        return logits

    def verify(self, slots: Sequence[int], chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """Append each chunk after its slot's tokens, as ``extend`` does, and return the logits at
        every new position ``(len(slots), S, V)``, ``S`` the longest chunk (a shorter chunk's row
        is padded past its end with logits that mean nothing). Speculative decoding feeds
        ``[pending token, *drafted tokens]`` and rolls the rejected ones back with ``truncate``."""
        if len(slots) == 1 and 0 < (held := int(self._len[slots[0]])) and 0 < len(chunks[0]):
            slot, S = slots[0], len(chunks[0])  # batch 1: ``_step``'s feeds, built directly
            if 0 <= slot < self.n_slots and held + S <= self.capacity:
                feeds = {
                    "input_ids": np.array([chunks[0]], np.int64),
                    "attention_mask": np.ones((1, held + S), np.int64),
                    "position_ids": np.arange(held, held + S, dtype=np.int64)[None],
                }
                self._with_adapters(feeds, slot, slot + 1)
                logits = self._binding(slot, slot + 1).run_all(feeds)
                self._len[slot] = held + S
                return logits
        _check_extend(self, slots, chunks)
        S = max(len(c) for c in chunks)
        if self._one_pass(slots, S):
            out = self._step(dict(zip(slots, chunks, strict=True)), keep_all=True)
            return out[[s - min(slots) for s in slots]]
        rows = [self._step({s: c}, keep_all=True)[0] for s, c in zip(slots, chunks, strict=True)]
        return np.stack([np.pad(r, ((0, S - len(r)), (0, 0))) for r in rows])

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``slot`` (>= 1; at most what it holds): the rest are
        forgotten in place, nothing is copied."""
        held = int(self._len[slot])
        if not 0 < length <= held:
            raise CacheError(f"slot {slot} holds {held} tokens: cannot keep {length}")
        self._len[slot] = length

    def release(self, slot: int) -> None:
        self._len[slot] = 0  # rows past a slot's length are never read: nothing to clear
        if self._adapter is not None:
            self._adapter[slot] = 0

    def reorder(self, sources: Sequence[int]) -> None:
        n = len(sources)
        width = int(self._len[list(sources)].max()) if n else 0
        for b in self.buffers:
            b[:n, :, :width] = b[list(sources), :, :width]
        self._len[:n] = self._len[list(sources)]
        if self._adapter is not None:
            self._adapter[:n] = self._adapter[list(sources)]

    def full_logits(self, ids: np.ndarray) -> np.ndarray:
        """All logits ``(B, T, V)`` of unpadded sequences ``ids`` (perplexity, parity)."""
        return self._step({b: list(ids[b]) for b in range(ids.shape[0])}, keep_all=True)

    # memory that follows the work (the server) ----------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached position of one slot takes over every layer's K and V."""
        return sum(b.shape[1] * b.shape[3] * b.itemsize for b in self.buffers)

    def reserve(self, capacity: int, n_slots: int | None = None, keep: Sequence[int] | None = None) -> None:
        """Reallocate the buffers to ``n_slots`` rows (default: as many as now) of ``capacity``
        tokens, larger or smaller. Row ``r`` kept (``r`` < both row counts) copies its first
        ``keep[r]`` positions (default: what the slot holds; more keeps a released slot's rows,
        which hold their last sequence until overwritten: the server's prefix cache), once; the
        rest of the new buffers is never touched. The bindings are made again on the next step.
        Every sequence held must fit: its slot below ``n_slots``, its length at most ``capacity``."""
        n_slots = self.n_slots if n_slots is None else n_slots
        if not 0 < capacity <= self.runner.n_positions or n_slots < 1:
            raise CacheError(
                f"{n_slots} slots of {capacity} tokens: out of range (1..{self.runner.n_positions} tokens)"
            )
        held = np.flatnonzero(self._len)
        if held.size and (held.max() >= n_slots or self._len.max() > capacity):
            raise CacheError(
                f"slots {held.tolist()} hold up to {int(self._len.max())} tokens: they do not fit "
                f"{n_slots} slots of {capacity}"
            )
        keep = self._len if keep is None else np.asarray(keep, np.int64)
        rows = min(self.n_slots, n_slots)
        buffers = self.runner.cache_arrays(n_slots, capacity)
        for old, new in zip(self.buffers, buffers, strict=True):
            for r in range(rows):
                n = min(int(keep[r]), capacity, self.capacity)
                if n:
                    new[r, :, :n] = old[r, :, :n]
        self._bindings.clear()  # they bind the old buffers, which go with them
        self.buffers = buffers
        length = np.zeros(n_slots, np.int64)
        length[:rows] = self._len[:rows]
        self._len, self.n_slots, self.capacity = length, n_slots, capacity
        if self._adapter is not None:
            adapter = np.zeros(n_slots, np.int64)
            adapter[:rows] = self._adapter[:rows]
            self._adapter = adapter

    def read_prefix(self, slot: int, length: int) -> list[np.ndarray]:
        """Copies of ``slot``'s first ``length`` positions, one array per buffer
        ``[n_head, length, head_size]`` (a ``Generator``'s prefix cache keeps them across calls)."""
        if not 0 <= slot < self.n_slots or not 0 < length <= self._len[slot]:
            raise CacheError(f"slot {slot} holds {self.length(slot)} tokens: cannot read {length}")
        return [b[slot, :, :length].copy() for b in self.buffers]

    def write_prefix(self, slot: int, arrays: Sequence[np.ndarray], length: int) -> None:
        """Free ``slot`` takes the first ``length`` positions of ``arrays`` (``read_prefix``'s,
        from this model) and holds ``length`` tokens; ``extend`` appends after them."""
        if not 0 <= slot < self.n_slots or self._len[slot]:
            raise CacheError(f"slot {slot} is out of range or busy; release it first")
        if len(arrays) != len(self.buffers) or not 0 < length <= min(self.capacity, arrays[0].shape[1]):
            raise CacheError(f"a prefix of {length} tokens does not fit slot {slot} ({self.capacity} tokens)")
        for b, a in zip(self.buffers, arrays, strict=True):
            b[slot, :, :length] = a[:, :length]
        self._len[slot] = length

    def copy_prefix(self, source: int, slot: int, length: int) -> None:
        """Free ``slot`` takes the first ``length`` positions of ``source``'s rows and holds
        ``length`` tokens; ``extend`` appends after them. ``source`` may be free (a released
        slot's rows keep their last sequence until overwritten: the caller knows which tokens
        they hold) or ``slot`` itself (nothing is copied)."""
        if not (0 <= source < self.n_slots and 0 <= slot < self.n_slots):
            raise CacheError(f"slots {source}, {slot}: out of range (0..{self.n_slots - 1})")
        if self._len[slot]:
            raise CacheError(f"slot {slot} is busy ({self._len[slot]} tokens); release it first")
        if not 0 < length <= self.capacity:
            raise CacheError(f"a prefix of {length} tokens does not fit a slot of {self.capacity}")
        if source != slot:
            for b in self.buffers:
                b[slot, :, :length] = b[source, :, :length]
        self._len[slot] = length
