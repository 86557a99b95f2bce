"""One ``/v1/completions`` request, from its validated body to its response: the prompts checked
and tokenized, one scheduler sequence per choice, prompt log-probabilities for ``echo``, and the
answer as one JSON body or as Server-Sent Events, with OpenAI's legacy logprobs and usage.

The request's tokens arrive from the scheduler thread through an ``asyncio.Queue`` of the
request's event loop; nothing here blocks that loop (tokenizing and scoring run in threads).

One file past 400 lines: a request's life (sequences, prompt scoring, streaming, the final
response) shares its state; ``chat.py`` reuses it by subclassing.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from ..runtime.sampling import GenerationConfig
from .engine import Engine
from .metrics import Metrics
from .model import ServedModel
from .protocol import ApiError, CompletionRequest
from .sequences import (
    QueueFullError,
    Reservation,
    SchedulerClosedError,
    SequenceHandle,
    TokenEvent,
)


def admission_error(e: QueueFullError | SchedulerClosedError) -> ApiError:
    """The scheduler's refusal as the answer: 429 (full, retry later) or 503 (shutting down)."""
    if isinstance(e, QueueFullError):
        return ApiError(
            429,
            str(e),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after_s)},
        )
    return ApiError(503, str(e), type="server_error", code="shutting_down", headers={"Retry-After": "1"})


def check_room(engine: Engine) -> None:
    """429 / 503 at once, before a request does any work, when the engine could take none."""
    try:
        engine.check_room(1)
    except (QueueFullError, SchedulerClosedError) as e:
        raise admission_error(e) from None


# The event that ends a request's wait when its client goes away (index -1: no choice).
CLIENT_GONE = TokenEvent(None, "", error="the client disconnected")


def check_ids(ids: Sequence[int], vocab: int, param: str) -> None:
    """Refuse token ids outside the vocabulary, naming the field."""
    for t in ids:
        if t >= vocab:
            raise ApiError(
                400, f"{param}: token id {t} is outside the vocabulary (0..{vocab - 1})", param=param
            )


@dataclass
class Choice:
    """One choice of a completion as its events arrive."""

    prompt_index: int
    text: str = ""
    tokens: list[int] | None = None
    logprobs: list[float | None] | None = None
    top: list[tuple[tuple[int, float], ...] | None] | None = None
    finish_reason: str | None = None
    error: str | None = None
    sent: int = 0  # tokens whose logprobs went out in a stream chunk

    def __post_init__(self) -> None:
        self.tokens, self.logprobs, self.top = [], [], []


FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's


class Completion:
    """One ``/v1/completions`` request: prompts -> sequences in the scheduler -> the response.

    ``max_tokens: 0`` (only with ``echo``) scores and echoes the prompts and generates nothing: no
    sequence enters the scheduler, and every choice finishes at once with ``length``. Subclasses
    (chat.py) change the output's shape: ``OBJECT`` / ``CHUNK_OBJECT`` / ``ID_PREFIX``,
    ``_choice``, ``_chunk_choice``, ``_logprobs``, and ``generation_config``."""

    OBJECT = "text_completion"  # the response's "object"
    CHUNK_OBJECT = "text_completion"  # a streamed chunk's
    ID_PREFIX = "cmpl-"

    def __init__(
        self,
        model: ServedModel,
        engine: Engine,
        metrics: Metrics,
        req: CompletionRequest,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
    ) -> None:
        """Checks and tokenizes the prompts (call it off the event loop: a prompt may be long).
        A text prompt longer than any that fits the context is refused by its length first."""
        self.model = model
        self.engine = engine
        self.metrics = metrics
        self.req = req
        self.id = f"{self.ID_PREFIX}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.loop = loop
        self.deadline = loop.time() + timeout_s
        self.timeout_s = timeout_s
        items = self._prompt_items()
        n_choices = len(items) * req.n
        if n_choices > engine.capacity:  # before tokenizing what would be refused anyway
            raise ApiError(
                400,
                f"{len(items)} prompt(s) x n={req.n} = {n_choices} sequences exceed what this server "
                f"holds at once ({engine.capacity}); send fewer",
                param="n",
            )
        self._check_lengths(items)  # before tokenizing anything
        self.prompts = [self._encode(item, i, len(items)) for i, item in enumerate(items)]
        self.prompt_texts = [self._prompt_text(i) for i in range(len(self.prompts))]
        self.prompt_scores: list[dict[str, Any]] | None = None
        self.choices = [Choice(i // req.n) for i in range(n_choices)]
        self.events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        self.sequences: list[SequenceHandle] = []
        self.reservation: Reservation | None = None  # the scheduler's room, from reserve() to submit()

    # building the sequences ---------------------------------------------------------------------
    def _prompt_items(self) -> list[Any]:
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

    def _prompt_text(self, i: int) -> str:
        p = self.req.prompt
        if isinstance(p, str):
            return p
        if isinstance(p, list) and p and isinstance(p[i], str):
            return p[i]
        return self.model.tokenizer.decode(self.prompts[i])

    def generation_config(self, choice: int) -> GenerationConfig:
        """How to generate choice ``choice`` (speculative decoding: the server's default unless the
        request says)."""
        return self.req.generation_config(choice, self.engine.prompt_lookup)

    def reserve(self) -> None:
        """Hold the scheduler's room for every choice before any work of this request's own
        (prompt scoring), or answer 429 (full) / 503 (shutting down) at once. ``submit`` uses the
        room; whatever ends the request before that must ``release`` it."""
        try:
            self.reservation = self.engine.reserve(len(self.choices))
        except (QueueFullError, SchedulerClosedError) as e:
            raise admission_error(e) from None

    def release(self) -> None:
        """Give back the room ``reserve`` held, unless ``submit`` used it. Idempotent."""
        if self.reservation is not None:
            self.engine.release(self.reservation)

    def submit(self) -> None:
        """Put every choice into the scheduler (into the room ``reserve`` held, if it did), or
        answer 429 (full) / 503 (shutting down)."""
        if self.req.max_tokens == 0:  # echo only: nothing to generate, nothing to schedule
            self.release()
            for c in self.choices:
                c.finish_reason = "length"
            self.metrics.prompt_tokens.inc(sum(len(self.prompts[c.prompt_index]) for c in self.choices))
            return
        for i, choice in enumerate(self.choices):

            def sink(event: TokenEvent, i: int = i) -> None:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (i, event))

            self.sequences.append(
                SequenceHandle(
                    self.prompts[choice.prompt_index],
                    self.generation_config(i),
                    sink,
                    eos_token_id=self.model.eos_token_id,
                    detokenize=self.model.tokenizer.decode,
                    logprobs=self.req.logprobs,
                )
            )
        try:
            self.engine.submit(self.sequences, self.reservation)
        except (QueueFullError, SchedulerClosedError) as e:
            raise admission_error(e) from None
        self.metrics.prompt_tokens.inc(sum(len(self.prompts[c.prompt_index]) for c in self.choices))

    def cancel(self) -> None:
        for s in self.sequences:
            s.cancel()

    # prompt log-probabilities (echo + logprobs) ---------------------------------------------
    async def score_prompts(self) -> None:
        """Log-probabilities of each prompt token given the ones before (``echo`` + ``logprobs``):
        one full-sequence pass per prompt on the engine's thread, between its steps (not in a
        thread pool every request's parsing and tokenizing needs). Call it after ``reserve``: the
        room it holds bounds the scoring jobs waiting in the engine."""
        try:
            future = self.engine.score(self.prompts, self.req.logprobs or 0)
        except SchedulerClosedError as e:
            raise admission_error(e) from None
        try:
            scores = await asyncio.wrap_future(future)
        except SchedulerClosedError as e:
            raise admission_error(e) from None

        def render() -> list[dict[str, Any]]:  # text offsets decode every prefix: off the event loop
            return [
                self._logprobs(ids, lps, tops, 0)
                for ids, (lps, tops) in zip(self.prompts, scores, strict=True)
            ]

        self.prompt_scores = await asyncio.to_thread(render)

    # output -----------------------------------------------------------------------------------
    def _logprobs(
        self,
        tokens: Sequence[int],
        lps: Sequence[float | None],
        tops: Sequence[tuple[tuple[int, float], ...] | None],
        base: int,
        before: Sequence[int] = (),
    ) -> dict[str, Any]:
        """OpenAI's legacy logprobs object for ``tokens`` (which follow the ids ``before``); text
        offsets count from ``base``."""
        decode = self.model.tokenizer.decode
        return {
            "tokens": [decode([t]) for t in tokens],
            "token_logprobs": list(lps),
            "top_logprobs": [None if top is None else {decode([t]): lp for t, lp in top} for top in tops],
            "text_offset": [base + len(decode([*before, *tokens[:i]])) for i in range(len(tokens))],
        }

    def _absorb(self, i: int, event: TokenEvent) -> Choice:
        c = self.choices[i]
        if event.error is not None:
            c.error = event.error
            return c
        assert c.tokens is not None and c.logprobs is not None and c.top is not None
        assert event.token is not None
        c.tokens.append(event.token)
        c.logprobs.append(event.logprob)
        c.top.append(event.top_logprobs)
        c.text += event.text
        if event.finish_reason is not None:
            c.finish_reason = FINISH[event.finish_reason]
        return c

    async def _next(self) -> tuple[int, TokenEvent]:
        remaining = self.deadline - self.loop.time()
        if remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(self.events.get(), remaining)

    def _done(self) -> bool:
        return all(c.finish_reason is not None or c.error is not None for c in self.choices)

    def _echo_prefix(self, c: Choice) -> str:
        return self.prompt_texts[c.prompt_index] if self.req.echo else ""

    def _usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.tokens or ()) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _watch_disconnect(self, request: Request) -> None:
        """Wait for the client's ``http.disconnect`` (the body was read: nothing else comes), then
        cancel the sequences and wake ``collect``."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()
        self.events.put_nowait((-1, CLIENT_GONE))

    async def collect(self, request: Request) -> dict[str, Any]:
        """Wait for every choice (the whole response at once); give up on timeout, or as soon as
        the client disconnects: its sequences are cancelled then, and the scheduler frees their
        slots before its next step."""
        watch = asyncio.ensure_future(self._watch_disconnect(request))
        try:
            while not self._done():
                try:
                    i, event = await self._next()
                except asyncio.TimeoutError:
                    raise ApiError(
                        408,
                        f"the request did not finish within {self.timeout_s:g} s",
                        type="timeout_error",
                        code="timeout",
                    ) from None
                if i < 0:
                    raise ApiError(499, "the client disconnected")
                self._absorb(i, event)
        finally:
            watch.cancel()
            self.cancel()  # no-op for finished sequences; frees the slots of the others
        failed = [c.error for c in self.choices if c.error]
        if failed:
            raise ApiError(500, failed[0], type="server_error", code="generation_failed")
        if self.req.logprobs is not None:  # text offsets decode every prefix: off the event loop
            return await asyncio.to_thread(self._response)
        return self._response()

    def _response(self) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(self.choices):
            assert c.tokens is not None and c.logprobs is not None and c.top is not None
            lp = None
            if self.req.logprobs is not None:
                prefix = self._echo_prefix(c)
                lp = self._logprobs(c.tokens, c.logprobs, c.top, len(prefix))
                if self.req.echo and self.prompt_scores is not None:
                    lp = join_logprobs(self.prompt_scores[c.prompt_index], lp)
            choices.append(self._choice(i, c, lp))
        return {
            "id": self.id,
            "object": self.OBJECT,
            "created": self.created,
            "model": self.model.name,
            "choices": choices,
            "usage": self._usage(),
        }

    def _choice(self, index: int, c: Choice, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        """Choice ``index`` of the whole response."""
        return {
            "text": self._echo_prefix(c) + c.text,
            "index": index,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }

    def _chunk_choice(
        self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None
    ) -> dict[str, Any]:
        """Choice ``index`` of one streamed chunk."""
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _chunk(self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> str:
        return self._sse_chunk(self._chunk_choice(index, text, logprobs, finish))

    def _sse_chunk(self, choice: dict[str, Any]) -> str:
        """One chunk event: ``usage`` is the usage so far with ``continuous_usage_stats`` (vLLM),
        null with ``include_usage`` alone (OpenAI: only the last chunk has it)."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": self.CHUNK_OBJECT,
            "created": self.created,
            "model": self.model.name,
            "choices": [choice],
        }
        options = self.req.stream_options
        if options is not None and options.continuous_usage_stats:
            body["usage"] = self._usage()
        elif options is not None and options.include_usage:
            body["usage"] = None
        return sse_event(body)

    async def sse(self) -> AsyncIterator[str]:
        """Server-Sent Events: a chunk per piece of text of each choice, then ``data: [DONE]``.

        When the client disconnects, Starlette cancels this generator: ``finally`` cancels the
        sequences, and the scheduler frees their slots before its next step."""
        want_lp = self.req.logprobs is not None
        try:
            if self.req.echo:  # with max_tokens 0 the prompt is all there is: the choice ends here
                for i, c in enumerate(self.choices):
                    lp = self.prompt_scores[c.prompt_index] if self.prompt_scores is not None else None
                    yield self._chunk(i, self.prompt_texts[c.prompt_index], lp, c.finish_reason)
            while not self._done():
                try:
                    i, event = await self._next()
                except asyncio.TimeoutError:
                    err = ApiError(
                        408,
                        f"the request did not finish within {self.timeout_s:g} s",
                        type="timeout_error",
                        code="timeout",
                    )
                    yield sse_event(err.body())
                    return
                c = self._absorb(i, event)
                if c.error is not None:
                    err = ApiError(500, c.error, type="server_error", code="generation_failed")
                    yield sse_event(err.body())
                    return
                if not event.text and c.finish_reason is None:
                    continue  # text held back (a partial character or stop string): nothing to show yet
                assert c.tokens is not None and c.logprobs is not None and c.top is not None
                lp = None
                if want_lp:
                    new = slice(c.sent, len(c.tokens))
                    base = len(self._echo_prefix(c))
                    lp = self._logprobs(c.tokens[new], c.logprobs[new], c.top[new], base, c.tokens[: c.sent])
                    c.sent = len(c.tokens)
                yield self._chunk(i, event.text, lp, c.finish_reason)
            if self.req.stream_options is not None and self.req.stream_options.include_usage:
                usage = {"id": self.id, "object": self.CHUNK_OBJECT, "created": self.created}
                yield sse_event({**usage, "model": self.model.name, "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()


def join_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {key: a[key] + b[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def sse_event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
