"""A completion request's prompts, checked and tokenized: strings or token-id lists, each refused
before any work it would waste (too many sequences for the server, a text longer than any that
fits the context: by its length, before tokenizing; a token list: by its length, before its ids
are looked at), then tokenized (``encode_batch``, which lets go of the GIL: call it off the event
loop), their ids checked against the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .model import Model
from .protocol import ApiError, CompletionRequest


def check_ids(ids: Sequence[int], vocab: int, param: str) -> None:
    """Refuse token ids outside the vocabulary, naming the field."""
    for t in ids:
        if t >= vocab:
            raise ApiError(
                400, f"{param}: token id {t} is outside the vocabulary (0..{vocab - 1})", param=param
            )


class Prompts:
    """The prompts of one request: ``ids`` (one token list per prompt) and ``texts`` (what ``echo``
    shows: the prompt's own text, or its ids decoded)."""

    def __init__(self, model: Model, req: CompletionRequest, capacity: int) -> None:
        """Checks and tokenizes (call it off the event loop: a prompt may be long). ``capacity``:
        the sequences the server holds at once; ``len(prompts) x n`` more is refused first."""
        self.model = model
        self.req = req
        items = self._items()
        n_choices = len(items) * req.n
        if n_choices > capacity:  # before tokenizing what would be refused anyway
            raise ApiError(
                400,
                f"{len(items)} prompt(s) x n={req.n} = {n_choices} sequences exceed what this server "
                f"holds at once ({capacity}); send fewer",
                param="n",
            )
        self._check_lengths(items)  # before tokenizing anything
        self.ids = [self._encode(item, i, len(items)) for i, item in enumerate(items)]
        self.texts = [self._text(i) for i in range(len(self.ids))]

    def __len__(self) -> int:
        return len(self.ids)

    def _items(self) -> list[Any]:
        """The prompts of the request: strings or token-id lists."""
        p = self.req.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt is empty", param="prompt")
        if isinstance(p[0], int):
            return [p]
        return list(p)

    def _check_lengths(self, items: list[Any]) -> None:
        """Refuse a text prompt that cannot fit the context by its length alone (longer than
        ``max_prompt_chars`` characters), before any is tokenized. (A token list is judged by its
        length in ``_encode`` before its ids are looked at.)"""
        limit = self.model.max_prompt_chars
        for i, item in enumerate(items):
            name = "the prompt" if len(items) == 1 else f"prompt {i}"
            if isinstance(item, str) and len(item) > limit:
                raise ApiError(
                    400,
                    f"{name} is {len(item)} characters; this model's context of {self.model.n_ctx} tokens "
                    f"holds no text longer than {limit} characters",
                    param="prompt",
                    code="context_length_exceeded",
                )

    def _encode(self, item: str | list[int], i: int, count: int) -> list[int]:
        if isinstance(item, str):
            # encode_batch lets go of the GIL while it works (encode holds it): the event loop,
            # which serves every stream and /health, goes on meanwhile.
            ids = self.model.tokenizer.encode_batch([item])[0]
        else:
            ids = list(item)
        name = "the prompt" if count == 1 else f"prompt {i}"
        if len(ids) + self.req.max_tokens > self.model.n_ctx:  # before looking at each id
            raise ApiError(
                400,
                f"this model's context is {self.model.n_ctx} tokens, but {name} has {len(ids)} tokens "
                f"and max_tokens is {self.req.max_tokens} ({len(ids) + self.req.max_tokens} in all); "
                "shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        check_ids(ids, self.model.vocab_size, "prompt")
        if not ids:
            raise ApiError(400, f"{name} is empty (0 tokens)", param="prompt")
        return ids

    def _text(self, i: int) -> str:
        p = self.req.prompt
        if isinstance(p, str):
            return p
        if isinstance(p, list) and p and isinstance(p[i], str):
            return p[i]
        return self.model.tokenizer.decode(self.ids[i])
