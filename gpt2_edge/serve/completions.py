"""One completion request's life with the engine, from its checked prompts to its answer: room held
(``reserve``, before any work of its own), prompts scored for ``echo`` (on the engine's thread),
one engine sequence per choice (``submit``), their events collected into one body or forwarded as
Server-Sent Events, cancelled when the client leaves or the request times out.

The request's tokens arrive from the engine thread through an ``asyncio.Queue`` of the request's
event loop; nothing here blocks that loop (tokenizing and rendering log-probabilities run in
threads). What the prompts are is prompts.py's; what the answer looks like, render.py's (the
completion shape, or chat's: chat.py makes a ``Completion`` with a ``ChatRender``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from ..errors import Gpt2EdgeError
from ..runtime.constraints import CompiledConstraint, ConstraintError, compile_constraint
from ..runtime.sampling import GenerationConfig, check_logit_bias_vocab
from .engine import Engine
from .metrics import Metrics
from .model import Model
from .prompts import Prompts
from .protocol import ApiError, ChatCompletionResponse, CompletionRequest, CompletionResponse, Usage
from .render import CompletionRender
from .sequences import QueueFullError, Reservation, SchedulerClosedError, SequenceHandle, TokenEvent


def admission_error(e: QueueFullError | SchedulerClosedError) -> ApiError:
    """The engine's refusal as the answer: 429 (full, retry later) or 503 (shutting down)."""
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

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's


@dataclass
class Choice:
    """One choice of a completion as its events arrive."""

    prompt_index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[tuple[tuple[int, float], ...] | None] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    sent: int = 0  # tokens whose logprobs went out in a stream chunk


def admit_constraint(model: Model, req: CompletionRequest) -> CompiledConstraint | None:
    """Check the request's ``logit_bias`` against this vocabulary and compile its structured-output
    constraint for this tokenizer (cached: the same schema again is no compile), or answer 400
    naming the field: before any decoding. Off the event loop (a compile takes milliseconds)."""
    try:
        check_logit_bias_vocab(GenerationConfig(logit_bias=req.logit_bias or {}), model.vocab_size)
    except Gpt2EdgeError as e:
        raise ApiError(400, str(e), param="logit_bias") from None
    found = req.constraint()
    if found is None:
        return None
    name, constraint = found
    try:
        return compile_constraint(model.tokenizer, constraint, model.vocab_size)
    except ConstraintError as e:
        raise ApiError(400, f"{name}: {e}", param=name) from None


class Completion:
    """One ``/v1/completions`` (or chat) request: prompts -> sequences in the engine -> the answer.

    ``max_tokens: 0`` (only with ``echo``) scores and echoes the prompts and generates nothing: no
    sequence enters the engine, and every choice finishes at once with ``length``."""

    def __init__(
        self,
        model: Model,
        engine: Engine,
        metrics: Metrics,
        req: CompletionRequest,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
        *,
        render: type[CompletionRender] = CompletionRender,
        extra_stop: tuple[str, ...] = (),
        adapter: str | None = None,
    ) -> None:
        """Checks and tokenizes the prompts (call it off the event loop: a prompt may be long).
        ``render``: the answer's shape; ``extra_stop``: stop strings added to the request's own
        (unless it asks for ``ignore_eos``: exactly ``max_tokens``); ``adapter``: the LoRA adapter
        its sequences run with (the answer names it as the model), None = the base model."""
        if adapter is not None and req.echo and req.logprobs is not None:
            raise ApiError(
                400,
                "echo with logprobs scores the prompt with the base model only; leave it out for a "
                f"LoRA adapter ({adapter!r})",
                param="echo",
                code="unsupported_with_adapter",
            )
        self.adapter_id = model.adapter_id(adapter) if adapter is not None else 0
        self.model = model
        self.engine = engine
        self.metrics = metrics
        self.req = req
        self.extra_stop = extra_stop
        self.render = render(
            model.tokenizer.decode, f"{render.ID_PREFIX}{uuid.uuid4().hex}", int(time.time()),
            adapter or model.name, req.stream_options,
        )  # fmt: skip
        self.loop = loop
        self.deadline = loop.time() + timeout_s
        self.timeout_s = timeout_s
        self.constraint = admit_constraint(model, req)
        self.prompts = Prompts(model, req, engine.capacity)
        self.prompt_scores: list[Any] | None = None  # rendered logprobs of each prompt (echo)
        self.choices = [Choice(i // req.n) for i in range(len(self.prompts) * req.n)]
        self.events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        self.sequences: list[SequenceHandle] = []
        self.reservation: Reservation | None = None  # the engine's room, from reserve() to submit()

    # the engine's side -------------------------------------------------------------------------
    def generation_config(self, choice: int) -> GenerationConfig:
        """How to generate choice ``choice`` (speculative decoding: the server's default unless the
        request says)."""
        config = self.req.generation_config(choice, self.engine.prompt_lookup)
        if self.extra_stop and not self.req.ignore_eos:
            config = dataclasses.replace(config, stop=(*config.stop, *self.extra_stop))
        return config

    def reserve(self) -> None:
        """Hold the engine's room for every choice before any work of this request's own (prompt
        scoring), or answer 429 (full) / 503 (shutting down) at once. ``submit`` uses the room;
        whatever ends the request before that must ``release`` it."""
        try:
            self.reservation = self.engine.reserve(len(self.choices))
        except (QueueFullError, SchedulerClosedError) as e:
            raise admission_error(e) from None

    def release(self) -> None:
        """Give back the room ``reserve`` held, unless ``submit`` used it. Idempotent."""
        if self.reservation is not None:
            self.engine.release(self.reservation)

    def submit(self) -> None:
        """Put every choice into the engine (into the room ``reserve`` held, if it did), or answer
        429 (full) / 503 (shutting down)."""
        prompt_tokens = sum(len(self.prompts.ids[c.prompt_index]) for c in self.choices)
        if self.req.max_tokens == 0:  # echo only: nothing to generate, nothing to schedule
            self.release()
            for c in self.choices:
                c.finish_reason = "length"
            self.metrics.prompt_tokens.inc(prompt_tokens)
            return
        for i, choice in enumerate(self.choices):

            def sink(event: TokenEvent, i: int = i) -> None:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (i, event))

            self.sequences.append(
                SequenceHandle(
                    self.prompts.ids[choice.prompt_index],
                    self.generation_config(i),
                    sink,
                    eos_token_id=self.model.eos_token_id,
                    detokenize=self.model.tokenizer.decode,
                    logprobs=self.req.logprobs,
                    constraint=self.constraint,
                    adapter_id=self.adapter_id,
                )
            )
        try:
            self.engine.submit(self.sequences, self.reservation)
        except (QueueFullError, SchedulerClosedError) as e:
            raise admission_error(e) from None
        self.metrics.prompt_tokens.inc(prompt_tokens)

    def cancel(self) -> None:
        for s in self.sequences:
            s.cancel()

    async def score_prompts(self) -> None:
        """Log-probabilities of each prompt token given the ones before (``echo`` + ``logprobs``):
        one full-sequence pass per prompt on the engine's thread, between its steps (not in a
        thread pool every request's parsing and tokenizing needs). Call it after ``reserve``: the
        room it holds bounds the scoring jobs waiting in the engine."""
        try:
            future = self.engine.score(self.prompts.ids, self.req.logprobs or 0)
            scores = await asyncio.wrap_future(future)
        except SchedulerClosedError as e:
            raise admission_error(e) from None

        def render() -> list[Any]:  # text offsets decode every prefix: off the event loop
            return [
                self.render.logprobs(ids, lps, tops, 0)
                for ids, (lps, tops) in zip(self.prompts.ids, scores, strict=True)
            ]

        self.prompt_scores = await asyncio.to_thread(render)

    # collecting ---------------------------------------------------------------------------------
    def _absorb(self, i: int, event: TokenEvent) -> Choice:
        c = self.choices[i]
        if event.error is not None:
            c.error = event.error
            return c
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
        return self.prompts.texts[c.prompt_index] if self.req.echo else ""

    def _usage(self) -> Usage:
        prompt = sum(len(p) for p in self.prompts.ids)
        completion = sum(len(c.tokens) for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _timeout(self) -> ApiError:
        return ApiError(
            408,
            f"the request did not finish within {self.timeout_s:g} s",
            type="timeout_error",
            code="timeout",
        )

    async def _watch_disconnect(self, request: Request) -> None:
        """Wait for the client's ``http.disconnect`` (the body was read: nothing else comes), then
        cancel the sequences and wake ``collect``."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()
        self.events.put_nowait((-1, CLIENT_GONE))

    async def collect(self, request: Request) -> CompletionResponse | ChatCompletionResponse:
        """Wait for every choice (the whole answer at once); give up on timeout, or as soon as the
        client disconnects: its sequences are cancelled then, and the engine frees their slots
        before its next step."""
        watch = asyncio.ensure_future(self._watch_disconnect(request))
        try:
            while not self._done():
                try:
                    i, event = await self._next()
                except asyncio.TimeoutError:
                    raise self._timeout() from None
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

    def _response(self) -> CompletionResponse | ChatCompletionResponse:
        logprobs: list[Any] = []
        for c in self.choices:
            lp = None
            if self.req.logprobs is not None:
                lp = self.render.logprobs(c.tokens, c.logprobs, c.top, len(self._echo_prefix(c)))
                if self.req.echo and self.prompt_scores is not None:
                    lp = self.prompt_scores[c.prompt_index] + lp
            logprobs.append(lp)
        texts = [self._echo_prefix(c) + c.text for c in self.choices]
        finish = [c.finish_reason for c in self.choices]
        return self.render.response(texts, logprobs, finish, self._usage())

    async def sse(self) -> AsyncIterator[str]:
        """Server-Sent Events: the opening chunks (chat: the assistant's role), a chunk per piece of
        text of each choice, then ``data: [DONE]``.

        When the client disconnects, Starlette cancels this generator: ``finally`` cancels the
        sequences, and the engine frees their slots before its next step."""
        render, want_lp = self.render, self.req.logprobs is not None
        try:
            for chunk in render.opening(len(self.choices), self._usage):
                yield chunk
            if self.req.echo:  # with max_tokens 0 the prompt is all there is: the choice ends here
                for i, c in enumerate(self.choices):
                    lp = self.prompt_scores[c.prompt_index] if self.prompt_scores is not None else None
                    yield render.chunk(
                        i, self.prompts.texts[c.prompt_index], lp, c.finish_reason, self._usage
                    )
            while not self._done():
                try:
                    i, event = await self._next()
                except asyncio.TimeoutError:
                    yield error_event(self._timeout())
                    return
                c = self._absorb(i, event)
                if c.error is not None:
                    yield error_event(ApiError(500, c.error, type="server_error", code="generation_failed"))
                    return
                if not event.text and c.finish_reason is None:
                    continue  # text held back (a partial character or stop string): nothing to show yet
                lp = None
                if want_lp:
                    new = slice(c.sent, len(c.tokens))
                    base = len(self._echo_prefix(c))
                    lp = render.logprobs(c.tokens[new], c.logprobs[new], c.top[new], base, c.tokens[: c.sent])
                    c.sent = len(c.tokens)
                yield render.chunk(i, event.text, lp, c.finish_reason, self._usage)
            if self.req.stream_options is not None and self.req.stream_options.include_usage:
                yield render.usage_chunk(self._usage())
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()


def error_event(err: ApiError) -> str:
    """An error in OpenAI's shape as one Server-Sent Event (a stream's status line went out already)."""
    return f"data: {json.dumps(err.body(), separators=(',', ':'))}\n\n"
