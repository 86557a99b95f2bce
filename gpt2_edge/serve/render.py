"""What a completion's answer looks like: its choices, log-probabilities, usage and streamed chunks
as the typed responses of protocol.py, in OpenAI's legacy completion shape (``CompletionRender``)
or its chat shape (``ChatRender``: ``message`` / ``delta`` instead of ``text``, chat logprobs
``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``, a first streamed chunk per choice
with the assistant's role). It knows nothing of the engine or of HTTP; completions.py calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprob,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionResponse,
    ContentDelta,
    RoleDelta,
    StreamOptions,
    Usage,
    sse,
)

TopLogprobs = tuple[tuple[int, float], ...]


class CompletionRender:
    """One ``/v1/completions`` answer's shapes (``id``, ``created`` and the model's name are the
    request's; ``decode``: the tokenizer's)."""

    ID_PREFIX = "cmpl-"

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        id: str,
        created: int,
        model: str,
        stream_options: StreamOptions | None = None,
    ) -> None:
        self.decode = decode
        self.id = id
        self.created = created
        self.model = model
        self.stream_options = stream_options

    def logprobs(
        self,
        tokens: Sequence[int],
        lps: Sequence[float | None],
        tops: Sequence[TopLogprobs | None],
        base: int,
        before: Sequence[int] = (),
    ) -> CompletionLogprobs:
        """OpenAI's legacy logprobs for ``tokens`` (which follow the ids ``before``); text offsets
        count from ``base``."""
        decode = self.decode
        return CompletionLogprobs(
            tokens=[decode([t]) for t in tokens],
            token_logprobs=list(lps),
            top_logprobs=[None if top is None else {decode([t]): lp for t, lp in top} for top in tops],
            text_offset=[base + len(decode([*before, *tokens[:i]])) for i in range(len(tokens))],
        )

    def response(
        self,
        texts: Sequence[str],
        logprobs: Sequence[CompletionLogprobs | None],
        finish: Sequence[str | None],
        usage: Usage,
    ) -> CompletionResponse:
        choices = [
            CompletionChoice(text=t, index=i, logprobs=lp, finish_reason=f)
            for i, (t, lp, f) in enumerate(zip(texts, logprobs, finish, strict=True))
        ]
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _usage_field(self, usage: Callable[[], Usage]) -> tuple[Usage | None, bool]:
        """A chunk's ``usage``: the usage so far with ``continuous_usage_stats`` (vLLM), null with
        ``include_usage`` alone (OpenAI: only the last chunk has it), else absent."""
        options = self.stream_options
        if options is not None and options.continuous_usage_stats:
            return usage(), True
        return None, options is not None and options.include_usage

    def chunk(
        self,
        index: int,
        text: str,
        logprobs: CompletionLogprobs | None,
        finish: str | None,
        usage: Callable[[], Usage],
    ) -> str:
        """Choice ``index``'s next piece as one Server-Sent Event."""
        so_far, shown = self._usage_field(usage)
        choice = CompletionChunkChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        body = CompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=so_far
        )
        return sse(body, shown)

    def opening(self, n: int, usage: Callable[[], Usage]) -> list[str]:
        """Chunks a stream begins with, before any text (none here)."""
        return []

    def usage_chunk(self, usage: Usage) -> str:
        """The last chunk with ``include_usage``: no choices, the request's usage."""
        return sse(
            CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage), True
        )


class ChatRender(CompletionRender):
    """One ``/v1/chat/completions`` answer's shapes (module docstring)."""

    ID_PREFIX = "chatcmpl-"

    def _entry(self, token: int, lp: float | None) -> ChatTokenLogprob:
        text = self.decode([token])
        return ChatTokenLogprob(token=text, logprob=lp, bytes=list(text.encode("utf-8")))

    def logprobs(  # type: ignore[override]
        self,
        tokens: Sequence[int],
        lps: Sequence[float | None],
        tops: Sequence[TopLogprobs | None],
        base: int,
        before: Sequence[int] = (),
    ) -> ChatLogprobs:
        """OpenAI's chat logprobs (``bytes``: the UTF-8 of the token's text)."""
        content = []
        for t, lp, top in zip(tokens, lps, tops, strict=True):
            e = self._entry(t, lp)
            content.append(
                ChatLogprob(
                    token=e.token,
                    logprob=lp,
                    bytes=e.bytes,
                    top_logprobs=[self._entry(u, v) for u, v in top or ()],
                )
            )
        return ChatLogprobs(content=content)

    def response(  # type: ignore[override]
        self,
        texts: Sequence[str],
        logprobs: Sequence[ChatLogprobs | None],
        finish: Sequence[str | None],
        usage: Usage,
    ) -> ChatCompletionResponse:
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=t), logprobs=lp, finish_reason=f)
            for i, (t, lp, f) in enumerate(zip(texts, logprobs, finish, strict=True))
        ]
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _chat_chunk(self, choice: ChatChunkChoice, usage: Callable[[], Usage]) -> str:
        so_far, shown = self._usage_field(usage)
        body = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=so_far
        )
        return sse(body, shown)

    def chunk(  # type: ignore[override]
        self,
        index: int,
        text: str,
        logprobs: ChatLogprobs | None,
        finish: str | None,
        usage: Callable[[], Usage],
    ) -> str:
        choice = ChatChunkChoice(
            index=index, delta=ContentDelta(content=text), logprobs=logprobs, finish_reason=finish
        )
        return self._chat_chunk(choice, usage)

    def opening(self, n: int, usage: Callable[[], Usage]) -> list[str]:
        """A first chunk per choice with the assistant's role."""
        return [
            self._chat_chunk(
                ChatChunkChoice(index=i, delta=RoleDelta(), logprobs=None, finish_reason=None), usage
            )
            for i in range(n)
        ]

    def usage_chunk(self, usage: Usage) -> str:
        return sse(
            ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage),
            True,
        )
