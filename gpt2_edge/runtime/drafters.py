"""Where drafted tokens come from (``runtime.speculative`` verifies them). Torch-free.

- ``PromptLookup``: the sequence itself. The tokens that followed the most recent earlier
  occurrence of its last n tokens (n = 3, 2, 1) in the prompt and the text so far; no model.
- ``DraftModel``: a smaller bundle with the target's tokenizer, run greedily over its own in-place
  KV cache (``Speculator`` keeps that cache in step with the accepted tokens).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Gpt2EdgeError
from .types import Backend


class PromptLookup:
    """One sequence's n-gram index: ``propose(seen, k)`` drafts the ``k`` tokens that followed the
    most recent earlier occurrence of the last ``n`` tokens of ``seen``, for the longest ``n`` in
    ``max_ngram .. min_ngram`` that has one (continued periodically when the match is less than
    ``k`` tokens from the end: a loop's drafts continue the loop). The index grows with the tokens
    appended since the last call (``seen`` only ever grows): a proposal costs O(max_ngram)
    dictionary look-ups."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise Gpt2EdgeError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.ngrams = range(max_ngram, min_ngram - 1, -1)
        self._next: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.ngrams}
        self._indexed = 0  # n-grams ending before this index (with a token after them) are in

    def propose(self, seen: Sequence[int], k: int) -> list[int]:
        """``k`` drafted tokens (``[]`` when no n-gram of the end of ``seen`` occurred before)."""
        found = self.match(seen)
        return self.continuation(seen, found[0], k) if found and k > 0 else []

    def match(self, seen: Sequence[int]) -> tuple[int, int] | None:
        """Where the tokens after the latest earlier occurrence of the longest matching n-gram start,
        and ``n``; None without one. Indexes the tokens appended since the last call."""
        L = len(seen)
        for end in range(max(self._indexed, 1), L):  # n-grams ending at end - 1, followed by seen[end]
            for n in self.ngrams:
                if end >= n:
                    self._next[n][tuple(seen[end - n : end])] = end
        self._indexed = max(self._indexed, L)
        for n in self.ngrams:
            if L >= n and (at := self._next[n].get(tuple(seen[L - n :]))) is not None:
                return at, n
        return None

    @staticmethod
    def continuation(seen: Sequence[int], at: int, k: int) -> list[int]:
        """The ``k`` tokens from ``seen[at]`` on, continued periodically past the end of ``seen``."""
        draft = [int(t) for t in seen[at : at + k]]
        while len(draft) < k:  # a match close to the end repeats itself: so does the draft
            draft.append(draft[len(draft) - (len(seen) - at)])
        return draft


class DraftModel:
    """A smaller model with the target's tokenizer that drafts up to ``max_tokens`` tokens per step,
    greedily (a point mass for the acceptance rule), over its own in-place KV cache.

    ``cost`` is one draft pass in target passes: the speculation policy drafts with the model only
    where the expected accepted tokens pay for its passes too. ``attach`` sets it from the weights'
    sizes (a decode pass reads every weight once), never below ``MIN_COST`` (a pass's fixed cost).

    >>> draft = DraftModel.from_bundle("out/tiny-bundle", max_tokens=4)
    >>> model = load_model("out/bundle", draft="out/tiny-bundle")  # the same, loaded and attached
    """

    MIN_COST = 0.1

    def __init__(self, backend: Backend, max_tokens: int = 4, cost: float = 0.25) -> None:
        _check_tokens(max_tokens)
        self.backend = backend
        self.max_tokens = max_tokens
        self.cost = cost

    @classmethod
    def from_bundle(
        cls, path: str | Path, max_tokens: int = 4, threads: int | None = None, verify: bool = True
    ) -> DraftModel:
        """Load the draft bundle on ONNX Runtime's CPU provider (it must have the in-place KV cache:
        drafts are rolled back). Its threads do not spin after a run: spinning, they take the cores
        from the target's next pass (2x slower per target step on 2 cores, measured)."""
        from .backends import load_backend

        _check_tokens(max_tokens)  # before the load
        no_spin = {"session.intra_op.allow_spinning": "0"}
        backend = load_backend(path, "cpu", threads=threads, verify=verify, session_config=no_spin)
        if not backend.capabilities.can_roll_back:
            raise Gpt2EdgeError(
                f"the draft bundle {path} has the concatenating KV cache; export it with the in-place "
                "one (`gpt2-edge export --kv-cache inplace`, the ort target's default)"
            )
        return cls(backend, max_tokens)

    def attach(self, target_bundle: Any) -> DraftModel:
        """Check the tokenizer against the target's and set ``cost`` from the weights' sizes."""
        self.check_tokenizer(target_bundle)
        self.cost = max(_weight_bytes(self.backend.bundle) / _weight_bytes(target_bundle), self.MIN_COST)
        return self

    def check_tokenizer(self, target_bundle: Any) -> None:
        """Refuse a draft whose tokenizer is not the target's (ids would mean other text)."""
        mine, theirs = self.backend.bundle, target_bundle
        if mine.dims.vocab_size != theirs.dims.vocab_size or _vocab(mine.path) != _vocab(theirs.path):
            raise Gpt2EdgeError(
                f"the draft bundle {mine.path} has another tokenizer than {theirs.path}: a draft model "
                "must share the target's vocabulary"
            )


def _vocab(bundle_path: Path) -> Any:
    data = json.loads((Path(bundle_path) / "tokenizer.json").read_text(encoding="utf-8"))
    return data.get("model"), [(t.get("id"), t.get("content")) for t in data.get("added_tokens", [])]


def _weight_bytes(bundle: Any) -> int:
    """The bytes of a bundle's model files (graph and external weights)."""
    return bundle.manifest.model_bytes()


def _check_tokens(max_tokens: object) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise Gpt2EdgeError(f"a draft model drafts an integer >= 1 tokens per step, got {max_tokens!r}")
