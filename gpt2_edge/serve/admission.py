"""The engine's KV memory: which waiting sequences fit (``plan``, the scheduler's ``Admission``),
into which slots, from which cached prefix, and how large the KV cache is (``admit``, ``leave``,
``shrink``: the executor's). Torch-free; only the engine's thread calls it.

**KV memory that follows the work** (a resizable cache: the in-place one). The cache starts at
one slot of ``INITIAL_CAPACITY`` tokens and grows (``reserve``: rows and tokens per slot in powers
of two, the held positions copied once) when an admitted sequence needs more: rows up to its slot,
tokens per slot up to its prompt + ``max_new_tokens``. ``kv_budget`` (tokens, default
``max_batch`` x the context: the old fixed size) bounds rows x tokens per slot: a sequence that
does not fit waits, and the ones behind it wait too (oldest first, so a long one is not starved);
every sequence fits once it is alone. Idle, the cache shrinks back, keeping what the prefix cache
may keep. A concatenating cache grows with its batch anyway; its admission keeps
rows x the longest sequence within the budget.

A speculative step (``runtime.speculative``) writes a row's pending token and up to k drafted
tokens at once, but never more than the sequence may still emit (``max_new_tokens`` minus what it
generated, minus one): its positions stay within prompt + ``max_new_tokens``, the need admission
reserved. Rejected positions are rolled back by the row's length alone.

**Prefix cache** (``prefix_cache``; resizable caches). A released slot's rows keep its sequence
until a new one overwrites them; ``PrefixCache`` remembers which tokens. A new prompt sharing at
least ``prefix_block`` leading tokens with a released slot (or with what a running one has
written) starts with those positions copied (or, in that very slot, kept) and prefills only the
rest: the same logits, as in-place bundles are batch-invariant and causal. New sequences take
free slots without cached rows first, then the least recently used ones. An idle server keeps
entries (most recent first) while rows x tokens stay within ``prefix_cache_blocks`` blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import Gpt2EdgeError
from ..runtime.prefix_cache import PrefixCache, PrefixMatch
from ..runtime.sequence import SequenceState
from ..runtime.types import Backend, KVCache, is_resizable

if TYPE_CHECKING:
    from .metrics import Metrics
    from .scheduler import Placement
    from .sequences import SequenceHandle, Slot

DEFAULT_PREFIX_BLOCK = 64  # tokens: the shortest prefix worth reusing, and the prefix cache's unit
DEFAULT_PREFIX_CACHE_BLOCKS = 32  # ServeSettings.prefix_cache_blocks: what an idle server keeps
INITIAL_CAPACITY = 128  # tokens per slot of a resizable cache when the server starts or goes idle


class KVMemory:
    """The KV cache of ``max_batch`` slots, its budget and its prefix cache (module docstring)."""

    def __init__(
        self,
        backend: Backend,
        *,
        n_ctx: int,
        max_batch: int,
        kv_budget: int | None = None,
        prefix_cache: bool = True,
        prefix_cache_blocks: int = DEFAULT_PREFIX_CACHE_BLOCKS,
        prefix_block: int = DEFAULT_PREFIX_BLOCK,
        initial_capacity: int = INITIAL_CAPACITY,
    ) -> None:
        kv_budget = max_batch * n_ctx if kv_budget is None else kv_budget
        if kv_budget < n_ctx:
            raise Gpt2EdgeError(f"kv_budget must be >= the context ({n_ctx} tokens), got {kv_budget}")
        if prefix_block < 1 or prefix_cache_blocks < 0 or initial_capacity < 1:
            raise Gpt2EdgeError("prefix_block and initial_capacity must be >= 1, prefix_cache_blocks >= 0")
        self.backend = backend
        self.n_ctx = n_ctx
        self.max_batch = max_batch
        self.kv_budget = kv_budget
        self.use_prefix_cache = prefix_cache
        self.prefix_cache_tokens = prefix_cache_blocks * prefix_block
        self.prefix_block = prefix_block
        self.initial_capacity = min(initial_capacity, n_ctx)
        self.metrics: Metrics | None = None
        self.cache: KVCache | None = None
        self.resizable = False
        self.prefix: PrefixCache | None = None
        self.shrunk = True  # the cache is at its idle size
        self.tokens_allocated = 0  # slots x tokens per slot (a concatenating cache: held)

    def new_cache(self) -> KVCache:
        """A cache of ``max_batch`` x ``n_ctx`` (a backend that cannot hold it says so now); a
        resizable one is shrunk at once to its idle size, before anything touched its memory."""
        self.cache = cache = self.backend.new_cache(self.max_batch, self.n_ctx)
        self.resizable = is_resizable(cache)
        self.prefix = PrefixCache(self.prefix_block) if self.resizable and self.use_prefix_cache else None
        if self.resizable:
            cache.reserve(self.initial_capacity, 1)  # type: ignore[attr-defined]
        self.shrunk = True
        self.count(())
        return cache

    def count(self, active: Collection[int]) -> None:
        """Update ``tokens_allocated`` (``active``: the slots in use, for a concatenating cache)."""
        cache = self.cache
        if cache is None:
            self.tokens_allocated = 0
        elif self.resizable:
            self.tokens_allocated = cache.n_slots * cache.capacity
        else:
            lengths = [cache.length(s) for s in active]
            self.tokens_allocated = len(lengths) * max(lengths, default=0)

    def written(self, slot: int, state: SequenceState) -> list[int]:
        """The tokens whose positions ``slot``'s rows hold (``state``: the sequence in it) as a
        prompt would write them: with a prompt graph (int4) the generated tokens' positions were
        written by the main graph, so only the prompt's count."""
        assert self.cache is not None
        n = self.cache.length(slot)
        if self.backend.capabilities.prompt_graph:
            n = min(n, len(state.prompt))
        return (state.prompt + state.generated)[:n] if n > len(state.prompt) else state.prompt[:n]

    def need_of(self, s: SequenceHandle) -> int:
        return min(len(s.state.prompt) + s.state.config.max_new_tokens, self.n_ctx)

    def _pow2(self, n: int, start: int, cap: int) -> int:
        size = start
        while size < n:
            size *= 2
        return min(size, cap)

    def _shape(self, rows: int, tokens: int) -> tuple[int, int] | None:
        """Rows and tokens per slot (powers of two where the budget allows) for at least
        ``rows`` x ``tokens``; None when even those do not fit the budget."""
        if rows * tokens > self.kv_budget:
            return None
        r, t = self._pow2(rows, 1, self.max_batch), self._pow2(tokens, self.initial_capacity, self.n_ctx)
        if r * t <= self.kv_budget:
            return r, t
        return (rows, t) if rows * t <= self.kv_budget else (rows, tokens)

    # admission ------------------------------------------------------------------------------------
    def plan(
        self, waiting: deque[SequenceHandle], running: Sequence[Slot], free: list[int]
    ) -> list[Placement]:
        """Take the waiting sequences that fit from the front of ``waiting``, oldest first, each
        with its slot and the prefix it starts from; stop at the first that does not fit
        (``running``: the slots in use)."""
        plans: list[Placement] = []
        active = {s.index: s.seq for s in running if s.seq is not None}
        taken = set(active)
        needs = [s.need for s in running]
        free = sorted(free)
        while waiting and len(taken) < self.max_batch:
            s = waiting[0]
            plan = self._place(s, active, taken, needs, [f for f in free if f not in taken])
            if plan is None:
                break
            waiting.popleft()
            plans.append((s, *plan))
            taken.add(plan[0])
            needs.append(self.need_of(s))
        return plans

    def _place(
        self,
        s: SequenceHandle,
        active: Mapping[int, SequenceHandle],
        taken: set[int],
        needs: list[int],
        free: list[int],
    ) -> tuple[int, PrefixMatch | None] | None:
        """A slot for ``s`` (and the prefix it reuses) whose memory fits the budget, or None."""
        need = self.need_of(s)
        tokens = max([need, *needs])
        if not self.resizable:
            return (free[0], None) if self._shape(len(taken) + 1, tokens) is not None else None
        cache = self.cache
        assert cache is not None
        match = None
        prefix = self.prefix
        if prefix is not None and not s.adapter_id:
            # Rows written by running sequences are final; slots planned this round are not sources.
            # Rows of a LoRA adapter's sequence hold its keys and values, not the base model's.
            running = [
                (slot, self.written(slot, h.state))
                for slot, h in active.items()
                if cache.length(slot) and not h.adapter_id
            ]
            match = prefix.match(s.state.prompt, running, skip=taken)
        rows_now = cache.n_slots
        plain = [f for f in free if prefix is None or f not in prefix]
        cached = [f for f in (prefix.lru() if prefix else []) if f in free]
        candidates: list[tuple[int, PrefixMatch | None]] = []
        if match is not None and match.slot in free:
            candidates.append((match.slot, match))  # its own rows: nothing to copy
        # a slot without cached rows, unless that grows the cache and an old entry's slot does not
        below = [f for f in cached if f < rows_now and (match is None or f != match.slot)]
        if plain and (plain[0] < rows_now or not below):
            candidates.append((plain[0], match))
        elif below:
            candidates.append((below[0], match))
        elif cached:
            candidates.append((cached[0], match))  # the least recently used entry goes
        candidates.append((free[0], None))  # the last resort: the lowest slot, nothing reused
        for slot, m in candidates:
            rows = max([slot, *taken, *([m.slot] if m is not None else [])]) + 1
            if self._shape(rows, tokens) is not None:
                if prefix is not None:
                    prefix.record(m)
                    if self.metrics is not None:
                        self.metrics.prefix_cache_lookups.labels(result="hit" if m else "miss").inc()
                        if m is not None:
                            self.metrics.prefix_cache_tokens.inc(m.length)
                return slot, m
        return None

    def admit(self, plans: list[Placement], running: Sequence[Slot]) -> None:
        """Grow the cache once for the planned sequences (``running``: every slot in use, theirs
        included, with its ``need``) and copy the prefixes they reuse."""
        if not plans:
            return
        active = [s.index for s in running]
        self.shrunk = False
        cache = self.cache
        assert cache is not None
        if self.resizable:
            sources = [m.slot for _, _, m in plans if m is not None]
            rows = max([*active, *sources]) + 1
            tokens = max(s.need for s in running)
            if rows > cache.n_slots or tokens > cache.capacity:
                grown = (max(rows, cache.n_slots), max(tokens, cache.capacity))
                if grown[0] * grown[1] <= self.kv_budget:
                    grown = self._shape(*grown) or grown
                else:
                    grown = self._shape(rows, tokens) or (rows, tokens)
                self._resize(*grown)
            for _, slot, m in plans:
                if m is not None:
                    cache.copy_prefix(m.slot, slot, m.length)  # type: ignore[attr-defined]
            for _, slot, _ in plans:
                if self.prefix is not None:
                    self.prefix.drop(slot)  # its rows are this sequence's now
        for seq, slot, _ in plans:
            if seq.adapter_id:  # released slots run without one (the caches reset it)
                cache.set_adapter(slot, seq.adapter_id)  # type: ignore[attr-defined]
        self.count(active)

    def leave(self, slot: int, state: SequenceState, keep: bool, adapter_id: int = 0) -> None:
        """The sequence in ``slot`` left: free its slot in the cache (``keep``: its rows stay in the
        prefix cache until overwritten; never a LoRA adapter's rows, ``adapter_id`` not 0)."""
        if self.cache is not None:
            if self.prefix is not None and keep and not adapter_id:
                self.prefix.put(slot, self.written(slot, state))
            self.cache.release(slot)

    def _resize(self, rows: int, tokens: int) -> None:
        """Reallocate the cache, keeping what its sequences and the prefix cache's entries hold
        (entries that no longer fit are cut or dropped)."""
        cache = self.cache
        assert cache is not None
        keep = [cache.length(r) for r in range(cache.n_slots)]
        if self.prefix is not None:
            for slot in self.prefix.lru():
                if slot >= rows:
                    self.prefix.drop(slot)
                else:
                    self.prefix.truncate(slot, tokens)
                    if slot in self.prefix:
                        keep[slot] = max(keep[slot], len(self.prefix.tokens(slot)))
        cache.reserve(tokens, rows, keep)  # type: ignore[attr-defined]
        self.count(())  # a resizable cache: its shape alone

    def shrink(self) -> None:
        """Idle: back to the smallest cache that keeps the most recent prefix-cache entries
        within ``prefix_cache_tokens`` (rows x tokens per slot)."""
        self.shrunk = True
        if not self.resizable or self.cache is None:
            return
        rows, tokens = 1, self.initial_capacity
        if self.prefix is not None:
            for slot in reversed(self.prefix.lru()):  # most recent first
                r = max(rows, slot + 1)
                t = self._pow2(len(self.prefix.tokens(slot)), self.initial_capacity, self.n_ctx)
                t = max(tokens, t)
                if r * t > max(self.prefix_cache_tokens, self.initial_capacity):
                    continue
                rows, tokens = r, t
        if (rows, tokens) != (self.cache.n_slots, self.cache.capacity):
            self._resize(rows, tokens)
