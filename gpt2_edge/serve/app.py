"""The HTTP app: OpenAI-style ``/v1/completions`` (plain and Server-Sent Events), ``/v1/models``,
``/health``, ``/metrics``, ``/tokenize`` and ``/detokenize`` over one continuous-batching
``Scheduler``. Torch-free: a bundle, onnxruntime, tokenizers, numpy and the ASGI stack.

``create_app(model, settings)`` returns the ASGI app; ``gpt2-edge serve`` runs it on uvicorn, and
``gpt2_edge.serve.ray_app`` runs one per Ray Serve replica. The scheduler thread starts and stops
with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ..runtime.sampling import GenerationConfig, log_softmax
from ..runtime.types import Backend
from .metrics import Metrics
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestCounterMiddleware
from .scheduler import (
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
    SequenceHandle,
    TokenEvent,
    top_logprobs,
)
from .schemas import (
    ApiError,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_body,
    validation_error,
)

log = logging.getLogger("gpt2_edge.serve")

ROUTES = frozenset({"/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize"})


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches, limits and protects (the ``gpt2-edge serve`` options)."""

    max_batch: int = 8  # KV-cache slots: sequences decoded together in one step
    max_queue: int = 32  # sequences waiting for a slot before new requests get 429
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer`
    timeout_s: float = 300.0  # per request, from arrival to its last token
    max_body_bytes: int = 1 << 20
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers, browsers on other origins are refused
    model_name: str | None = None  # the id in /v1/models (default: the bundle directory's name)
    replica: str | None = None  # shown by /health: which replica answered (Ray Serve)


class ServedModel:
    """What the app serves: a backend (shareable), its tokenizer, eos id, context and name."""

    def __init__(
        self, backend: Backend, tokenizer: Any, eos_token_id: int | None, n_ctx: int, name: str
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.n_ctx = n_ctx
        self.name = name
        self.vocab_size: int = tokenizer.vocab_size

    @classmethod
    def from_bundle(
        cls, path: str | Path, provider: str = "cpu", threads: int | None = None, name: str | None = None
    ) -> ServedModel:
        """Load and verify a bundle into one ONNX Runtime session (``provider``: cpu, cuda, tensorrt,
        auto)."""
        from ..runtime.bundle import Bundle
        from ..runtime.session import OrtBackend

        bundle = Bundle.load(path)
        backend = OrtBackend(bundle, provider=provider, threads=threads)
        return cls(
            backend, bundle.tokenizer(), bundle.eos_token_id, bundle.context_length, name or bundle.path.name
        )


def create_app(model: ServedModel, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving ``model``; its scheduler runs while the app's lifespan does."""
    settings = settings or ServeSettings()
    scheduler = Scheduler(
        model.backend, n_ctx=model.n_ctx, max_batch=settings.max_batch, max_queue=settings.max_queue
    )
    metrics = Metrics(settings.max_batch, lambda: scheduler.queue_depth, lambda: scheduler.active)
    scheduler.metrics = metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            app.state.draining = True
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(
        title="gpt2-edge",
        description="OpenAI-style completions over a gpt2-edge bundle, with continuous batching",
        lifespan=lifespan,
        docs_url=None,  # no browser UI pulling scripts from a CDN; /openapi.json stays
        redoc_url=None,
    )
    app.state.draining = False
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.model = model
    app.state.settings = settings

    # Middleware: the last added is the outermost. Counter -> CORS -> API key -> body limit -> routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(
        RequestCounterMiddleware,
        count=lambda route, status: metrics.requests.labels(route=route, status=str(status)).inc(),
        routes=ROUTES,
    )
    _add_error_handlers(app)

    def check_model(name: str | None) -> None:
        if name is not None and name != model.name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist here; this server serves {model.name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        if app.state.draining:
            raise ApiError(
                503,
                "the server is shutting down",
                type="server_error",
                code="shutting_down",
                headers={"Retry-After": "1"},
            )
        raw = await request.body()
        loop = asyncio.get_running_loop()

        def prepare() -> _Completion:
            req = parse_body(raw, CompletionRequest)
            req.check_supported()
            check_model(req.model)
            return _Completion(model, scheduler, metrics, settings, req, loop)

        # JSON, validation and tokenizing off the event loop, which serves every stream at once.
        job = await asyncio.to_thread(prepare)
        req = job.req
        if req.echo and req.logprobs is not None:
            await job.score_prompts()
        job.submit()
        if req.stream:
            return StreamingResponse(
                job.sse(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return JSONResponse(await job.collect(request))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model.name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "gpt2-edge",
                    "max_model_len": model.n_ctx,
                }
            ],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        live = scheduler.running and not app.state.draining
        body = {
            "status": "ok" if live else ("draining" if app.state.draining else "down"),
            "model": model.name,
            "model_loaded": True,
            "queue_depth": scheduler.queue_depth,
            "active": scheduler.active,
            "max_batch": scheduler.max_batch,
            "max_queue": scheduler.max_queue,
            "replica": settings.replica,
        }
        return JSONResponse(body, status_code=200 if live else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = parse_body(await request.body(), TokenizeRequest)
        check_model(req.model)
        ids = model.tokenizer.encode(req.content)
        return {"tokens": ids, "count": len(ids), "max_model_len": model.n_ctx}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse_body(await request.body(), DetokenizeRequest)
        check_model(req.model)
        _check_ids(req.tokens, model.vocab_size, "tokens")
        return {"content": model.tokenizer.decode(req.tokens)}

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape; none shows a stack trace."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        from pydantic import ValidationError

        err = validation_error(ValidationError.from_exception_data("request", list(e.errors())))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            err = ApiError(404, f"no route {request.url.path}", type="not_found_error", code="unknown_route")
        elif e.status_code == 405:
            err = ApiError(
                405,
                f"method {request.method} is not allowed on {request.url.path}",
                code="method_not_allowed",
            )
        else:
            err = ApiError(e.status_code, str(e.detail))
        return JSONResponse(err.body(), status_code=err.status, headers=dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = ApiError(500, "internal server error", type="server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)


def _check_ids(ids: Sequence[int], vocab: int, param: str) -> None:
    for t in ids:
        if t >= vocab:
            raise ApiError(
                400, f"{param}: token id {t} is outside the vocabulary (0..{vocab - 1})", param=param
            )


@dataclass
class _Choice:
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


class _Completion:
    """One ``/v1/completions`` request: prompts -> sequences in the scheduler -> the response."""

    def __init__(
        self,
        model: ServedModel,
        scheduler: Scheduler,
        metrics: Metrics,
        settings: ServeSettings,
        req: CompletionRequest,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Checks and tokenizes the prompts (call it off the event loop: a prompt may be long)."""
        self.model = model
        self.scheduler = scheduler
        self.metrics = metrics
        self.req = req
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.loop = loop
        self.deadline = loop.time() + settings.timeout_s
        self.timeout_s = settings.timeout_s
        items = self._prompt_items()
        n_choices = len(items) * req.n
        if n_choices > scheduler.capacity:  # before tokenizing what would be refused anyway
            raise ApiError(
                400,
                f"{len(items)} prompt(s) x n={req.n} = {n_choices} sequences exceed what this server "
                f"holds at once ({scheduler.capacity}); send fewer",
                param="n",
            )
        self.prompts = [self._encode(item, i, len(items)) for i, item in enumerate(items)]
        self.prompt_texts = [self._prompt_text(i) for i in range(len(self.prompts))]
        self.prompt_scores: list[dict[str, Any]] | None = None
        self.choices = [_Choice(i // req.n) for i in range(n_choices)]
        self.events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        self.sequences: list[SequenceHandle] = []

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

    def _encode(self, item: str | list[int], i: int, count: int) -> list[int]:
        ids = self.model.tokenizer.encode(item) if isinstance(item, str) else list(item)
        _check_ids(ids, self.model.vocab_size, "prompt")
        name = "the prompt" if count == 1 else f"prompt {i}"
        if not ids:
            raise ApiError(400, f"{name} is empty (0 tokens)", param="prompt")
        if len(ids) + self.req.max_tokens > self.model.n_ctx:
            raise ApiError(
                400,
                f"this model's context is {self.model.n_ctx} tokens, but {name} has {len(ids)} tokens "
                f"and max_tokens is {self.req.max_tokens} ({len(ids) + self.req.max_tokens} in all); "
                "shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return ids

    def _prompt_text(self, i: int) -> str:
        p = self.req.prompt
        if isinstance(p, str):
            return p
        if isinstance(p, list) and p and isinstance(p[i], str):
            return p[i]
        return self.model.tokenizer.decode(self.prompts[i])

    def _config(self, choice: int) -> GenerationConfig:
        r = self.req
        sample = r.temperature > 0  # OpenAI: temperature 0 is greedy; top_p / top_k then do nothing
        return GenerationConfig(
            max_new_tokens=r.max_tokens,
            min_new_tokens=r.min_tokens,
            do_sample=sample,
            temperature=r.temperature if sample else 1.0,
            top_k=max(r.top_k, 0) if sample else 0,
            top_p=r.top_p if sample else 1.0,
            repetition_penalty=r.repetition_penalty,
            # Choice i of a seeded request uses seed + i: n choices differ, and a request's
            # choice 0 repeats whatever else is in the batch.
            seed=None if r.seed is None else (r.seed + choice) % 2**63,
            stop=r.stop_strings,
        )

    def submit(self) -> None:
        """Put every choice into the scheduler, or answer 429 (full) / 503 (shutting down)."""
        for i, choice in enumerate(self.choices):

            def sink(event: TokenEvent, i: int = i) -> None:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (i, event))

            self.sequences.append(
                SequenceHandle(
                    self.prompts[choice.prompt_index],
                    self._config(i),
                    sink,
                    eos_token_id=self.model.eos_token_id,
                    detokenize=self.model.tokenizer.decode,
                    logprobs=self.req.logprobs,
                )
            )
        try:
            self.scheduler.submit(self.sequences)
        except QueueFullError as e:
            raise ApiError(
                429,
                str(e),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after_s)},
            ) from None
        except SchedulerClosedError as e:
            raise ApiError(
                503, str(e), type="server_error", code="shutting_down", headers={"Retry-After": "1"}
            ) from None
        self.metrics.prompt_tokens.inc(sum(len(self.prompts[c.prompt_index]) for c in self.choices))

    def cancel(self) -> None:
        for s in self.sequences:
            s.cancel()

    # prompt log-probabilities (echo + logprobs) ---------------------------------------------
    async def score_prompts(self) -> None:
        """Log-probabilities of each prompt token given the ones before (``echo`` + ``logprobs``):
        one full-sequence pass per prompt, beside the scheduler (the backend is thread-safe)."""
        logits_fn = getattr(self.model.backend, "logits", None)
        if logits_fn is None:
            raise ApiError(400, "echo with logprobs is not supported by this backend", param="echo")
        self.prompt_scores = await asyncio.to_thread(self._score_prompts, logits_fn)

    def _score_prompts(self, logits_fn: Any) -> list[dict[str, Any]]:
        k = self.req.logprobs or 0
        scores = []
        for ids in self.prompts:
            logits = logits_fn(np.asarray([ids], np.int64))
            lps: list[float | None] = [None]
            tops: list[tuple[tuple[int, float], ...] | None] = [None]
            for pos in range(1, len(ids)):  # row by row: a float64 copy of all rows would be T x V
                lp = log_softmax(logits[0, pos - 1].astype(np.float64))
                lps.append(float(lp[ids[pos]]))
                tops.append(top_logprobs(lp, k))
            scores.append(self._logprobs(ids, lps, tops, 0))
        return scores

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

    def _absorb(self, i: int, event: TokenEvent) -> _Choice:
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

    def _echo_prefix(self, c: _Choice) -> str:
        return self.prompt_texts[c.prompt_index] if self.req.echo else ""

    def _usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.tokens or ()) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def collect(self, request: Request) -> dict[str, Any]:
        """Wait for every choice (the whole response at once); give up on timeout or disconnect."""
        try:
            while not self._done():
                try:
                    remaining = self.deadline - self.loop.time()
                    # Wake now and then to notice a client that went away.
                    i, event = await asyncio.wait_for(self.events.get(), max(min(remaining, 0.5), 0))
                except asyncio.TimeoutError:
                    if self.loop.time() >= self.deadline:
                        raise ApiError(
                            408,
                            f"the request did not finish within {self.timeout_s:g} s",
                            type="timeout_error",
                            code="timeout",
                        ) from None
                    if await request.is_disconnected():
                        raise ApiError(499, "the client disconnected") from None
                    continue
                self._absorb(i, event)
        finally:
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
                    lp = _join_logprobs(self.prompt_scores[c.prompt_index], lp)
            choices.append(
                {
                    "text": self._echo_prefix(c) + c.text,
                    "index": i,
                    "logprobs": lp,
                    "finish_reason": c.finish_reason,
                }
            )
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model.name,
            "choices": choices,
            "usage": self._usage(),
        }

    def _chunk(self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model.name,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }
        if self.req.stream_options is not None and self.req.stream_options.include_usage:
            body["usage"] = None
        return _sse(body)

    async def sse(self) -> AsyncIterator[str]:
        """Server-Sent Events: a chunk per piece of text of each choice, then ``data: [DONE]``.

        When the client disconnects, Starlette cancels this generator: ``finally`` cancels the
        sequences, and the scheduler frees their slots before its next step."""
        want_lp = self.req.logprobs is not None
        try:
            if self.req.echo:
                for i, c in enumerate(self.choices):
                    lp = self.prompt_scores[c.prompt_index] if self.prompt_scores is not None else None
                    yield self._chunk(i, self.prompt_texts[c.prompt_index], lp, None)
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
                    yield _sse(err.body())
                    return
                c = self._absorb(i, event)
                if c.error is not None:
                    yield _sse(ApiError(500, c.error, type="server_error", code="generation_failed").body())
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
                usage = {"id": self.id, "object": "text_completion", "created": self.created}
                yield _sse({**usage, "model": self.model.name, "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()


def _join_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {key: a[key] + b[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
