"""Which KV-cache slots still hold which tokens: prefix reuse's bookkeeping. Torch-free.

A released slot of the in-place cache keeps its rows until a new sequence overwrites them. A
``PrefixCache`` remembers, per such slot, the token ids its rows hold (``put``), finds the slot
sharing the longest prefix with a new prompt (``match``: exact token ids), and evicts least
recently used entries first (``lru``). It holds no tensors and knows nothing of the model: the
caller copies the matched positions (``InPlaceCache.copy_prefix``) and prefills only the rest.
The server's scheduler uses it. A ``Generator`` made with ``prefix_cache=TOKENS`` keeps a
``KVStore``: copies of past calls' KV rows (prompt and continuation), found by the same exact
match and copied into the next call's cache before its prefill, evicted least recently used
beyond ``TOKENS`` tokens in all.

Because in-place bundles are batch-invariant and causal (bitwise), a prompt's first ``n``
positions cached by another sequence are the positions its own prefill would have written: the
output is the same with or without reuse.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import Gpt2EdgeError


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(diff[0]) if diff.size else n


@dataclass(frozen=True)
class PrefixMatch:
    slot: int  # the slot whose rows hold the prefix
    length: int  # positions to reuse


class PrefixCache:
    """Slot -> the token ids its rows hold, in least-recently-used order.

    ``min_match``: shorter common prefixes are not worth a copy (and are not reported). A match
    always leaves the prompt's last token to prefill (its logits give the next token)."""

    def __init__(self, min_match: int = 64) -> None:
        if min_match < 1:
            raise ValueError(f"min_match must be >= 1, got {min_match}")
        self.min_match = min_match
        self._entries: OrderedDict[int, np.ndarray] = OrderedDict()  # least recent first
        self.hits = 0  # lookups ``record``ed with a match
        self.misses = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, slot: int) -> bool:
        return slot in self._entries

    def tokens(self, slot: int) -> np.ndarray:
        return self._entries[slot]

    @property
    def total_tokens(self) -> int:
        return sum(len(t) for t in self._entries.values())

    def put(self, slot: int, tokens: Sequence[int]) -> None:
        """``slot``'s rows hold ``tokens`` (positions 0..len-1), most recently used now; entries
        shorter than ``min_match`` are not kept."""
        self._entries.pop(slot, None)
        if len(tokens) >= self.min_match:
            self._entries[slot] = np.asarray(tokens, np.int64)

    def drop(self, slot: int) -> None:
        """``slot`` is about to be overwritten (or its rows are gone)."""
        self._entries.pop(slot, None)

    def clear(self) -> None:
        self._entries.clear()

    def truncate(self, slot: int, length: int) -> None:
        """``slot`` keeps its first ``length`` positions only (its rows shrank)."""
        if slot in self._entries:
            kept = self._entries[slot][:length]
            if len(kept) >= self.min_match:
                self._entries[slot] = kept
            else:
                del self._entries[slot]

    def move(self, source: int, slot: int) -> None:
        """``source``'s entry now lives in ``slot`` (its rows were copied there)."""
        self._entries[slot] = self._entries.pop(source)

    def lru(self) -> list[int]:
        """Slots with an entry, least recently used first."""
        return list(self._entries)

    def match(
        self,
        prompt: Sequence[int],
        extra: Iterable[tuple[int, Sequence[int]]] = (),
        skip: Container[int] = (),
    ) -> PrefixMatch | None:
        """The entry (or ``extra`` candidate: a slot and the tokens its rows hold now) sharing the
        longest prefix with ``prompt``, at most ``len(prompt) - 1`` tokens (one is left to prefill:
        its logits give the next token); None under ``min_match``. Entries of ``skip`` slots are
        passed over. Counts nothing: ``record`` the match used."""
        best: PrefixMatch | None = None
        limit = len(prompt) - 1
        entries = ((s, t) for s, t in self._entries.items() if s not in skip)
        for slot, tokens in (*entries, *extra):
            n = min(common_prefix(prompt, tokens), limit)
            if n >= self.min_match and (best is None or n > best.length):
                best = PrefixMatch(slot, n)
        return best

    def record(self, match: PrefixMatch | None) -> None:
        """A lookup's outcome: a hit (its entry becomes the most recently used) or a miss."""
        if match is None:
            self.misses += 1
            return
        self.hits += 1
        self.reused_tokens += match.length
        if match.slot in self._entries:
            self._entries.move_to_end(match.slot)


class KVStore:
    """Past sequences' KV rows kept across calls, up to ``max_tokens`` tokens in all (a
    ``Generator``'s opt-in prefix cache; thread-safe). Memory: ``max_tokens`` x the model's KV
    bytes per token (2 x layers x width x 4 bytes in fp32: 72 KiB at GPT-2 124M).

    ``lookup`` finds the entry sharing the longest prefix (at least ``min_match`` tokens, at most
    the prompt's length - 1) and counts a hit or a miss; ``store`` keeps a finished sequence's
    rows, replacing entries it extends and skipping one an entry already covers."""

    def __init__(self, max_tokens: int, min_match: int = 32) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
            raise Gpt2EdgeError(f"prefix_cache must be a number of tokens >= 0 (0 = off), got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.index = PrefixCache(min_match)
        self._kv: dict[int, list[np.ndarray]] = {}
        self._ids = 0
        self._lock = threading.Lock()

    @property
    def hits(self) -> int:
        return self.index.hits

    @property
    def misses(self) -> int:
        return self.index.misses

    @property
    def reused_tokens(self) -> int:
        return self.index.reused_tokens

    def __len__(self) -> int:
        return len(self.index)

    @property
    def total_tokens(self) -> int:
        return self.index.total_tokens

    def lookup(self, prompt: Sequence[int]) -> tuple[int, list[np.ndarray]] | None:
        """The longest stored prefix of ``prompt``: its length and the rows holding it (at least
        that many positions; read them, never write), or None."""
        with self._lock:
            match = self.index.match(prompt)
            self.index.record(match)
            return None if match is None else (match.length, self._kv[match.slot])

    def store(self, tokens: Sequence[int], rows: Callable[[], list[np.ndarray]]) -> bool:
        """Keep ``tokens``' rows (``rows()`` copies them out of a cache, called only when they are
        kept). True when stored."""
        n = len(tokens)
        if n < self.index.min_match or n > self.max_tokens:
            return False
        with self._lock:
            for entry in self.index.lru():
                held = self.index.tokens(entry)
                if len(held) >= n and common_prefix(held, tokens) == n:
                    return False  # already covered: a lookup will find it
            arrays = rows()
            for entry in self.index.lru():  # entries the new one extends are redundant now
                held = self.index.tokens(entry)
                if common_prefix(held, tokens) == len(held):
                    self._drop(entry)
            self._ids += 1
            self.index.put(self._ids, tokens)
            self._kv[self._ids] = arrays
            while self.index.total_tokens > self.max_tokens:
                self._drop(self.index.lru()[0])
            return True

    def _drop(self, entry: int) -> None:
        self.index.drop(entry)
        del self._kv[entry]

    def clear(self) -> None:
        with self._lock:
            self.index.clear()
            self._kv.clear()
