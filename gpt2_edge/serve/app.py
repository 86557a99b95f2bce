"""The HTTP app: OpenAI-style ``/v1/completions`` and ``/v1/chat/completions`` (plain and
Server-Sent Events), ``/v1/models``, ``/health``, ``/metrics``, and the tokenizer routes
(``/tokenize``, ``/detokenize``, ``/tokenizer_info``: tokens.py) over one continuous-batching
``Engine``. Torch-free: a bundle, a backend (ONNX Runtime or a TensorRT engine), tokenizers,
numpy and the ASGI stack.

``create_app(model, settings)`` returns the ASGI app; ``gpt2-edge serve`` runs it on uvicorn, and
``gpt2_edge.serve.ray_app`` runs one per Ray Serve replica. The engine thread starts and stops
with the app's lifespan. The routes are module functions on one ``APIRouter``; what they serve
(model, engine, metrics, settings) is the app's ``state``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from . import tokens
from .chat import ChatTemplate, prepare_chat
from .completions import Completion, check_room
from .engine import Engine
from .metrics import Metrics
from .middleware import (
    LOOPBACK_NAMES,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    JsonBodyMiddleware,
    RequestCounterMiddleware,
)
from .model import Model
from .protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_body,
    validation_error,
)
from .settings import ServeSettings

__all__ = ["ROUTES", "Model", "ServeSettings", "create_app"]

log = logging.getLogger("gpt2_edge.serve")

ROUTES = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
    }
)

router = APIRouter()


@dataclass
class Served:
    """What one app serves, in ``app.state.served``."""

    model: Model
    settings: ServeSettings
    engine: Engine
    metrics: Metrics
    chat: ChatTemplate  # how /v1/chat/completions renders messages (chat.py)
    draining: bool = False  # SIGTERM or shutdown: /health says so, new completions get 503
    in_flight: int = 0  # requests under way but health checks and scrapes (a drain waits on them)

    def check_open(self) -> None:
        """New generation requests get 503 once the server is draining, and 429 when it is full:
        at once, before any work (parsing, tokenizing, scoring)."""
        if self.draining:
            raise ApiError(
                503,
                "the server is shutting down",
                type="server_error",
                code="shutting_down",
                headers={"Retry-After": "1"},
            )
        check_room(self.engine)

    def add_in_flight(self, n: int) -> None:
        self.in_flight += n

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model), or 404."""
        if name is None or name == self.model.name:
            return None
        if name in self.model.adapters:
            return name
        served = ", ".join(repr(n) for n in (self.model.name, *self.model.adapters))
        raise ApiError(
            404,
            f"the model {name!r} does not exist here; this server serves {served} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _kv_budget(budget: int | None, n_ctx: int) -> int | None:
    """The KV budget, at least one whole context (so every request fits once it is alone)."""
    if budget is not None and budget < n_ctx:
        log.warning("--kv-budget %d is under the model's context: raised to %d tokens", budget, n_ctx)
        return n_ctx
    return budget


def create_app(model: Model, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving ``model``; its engine runs while the app's lifespan does."""
    settings = settings or ServeSettings()
    max_batch = settings.max_batch
    if model.batch_variance and max_batch > 1:
        log.warning("decoding one sequence at a time (--max-batch 1): %s", model.batch_variance)
        max_batch = 1
    engine = Engine(
        model.backend,
        n_ctx=model.n_ctx,
        max_batch=max_batch,
        max_queue=settings.max_queue,
        prefill_chunk=settings.prefill_chunk,
        step_tokens=settings.step_tokens,
        kv_budget=_kv_budget(settings.kv_budget, model.n_ctx),
        prefix_cache=settings.prefix_cache,
        prefix_cache_blocks=settings.prefix_cache_blocks,
        prompt_lookup=settings.prompt_lookup,
        draft=model.draft,
    )
    metrics = Metrics(
        max_batch,
        lambda: engine.queue_depth,
        lambda: engine.active,
        kv_tokens=lambda: engine.kv_tokens_allocated,
        kv_budget=engine.kv_budget,
        draft_kv_tokens=(lambda: engine.draft_kv_tokens_allocated) if model.draft is not None else None,
    )
    engine.metrics = metrics
    served = Served(model, settings, engine, metrics, ChatTemplate.for_model(model))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            served.draining = True
            await asyncio.to_thread(engine.close)

    app = FastAPI(
        title="gpt2-edge",
        description="OpenAI-style completions over a gpt2-edge bundle, with continuous batching",
        lifespan=lifespan,
        docs_url=None,  # no browser UI pulling scripts from a CDN; /openapi.json stays
        redoc_url=None,
    )
    app.state.served = served

    # Middleware: the last added is the outermost. Counter -> CORS -> Host check (keyless) ->
    # API key -> JSON bodies only -> body limits -> routes.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    app.add_middleware(JsonBodyMiddleware)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    else:
        hosts = settings.allowed_hosts
        if settings.host not in (*LOOPBACK_NAMES, "0.0.0.0", "::", ""):  # the address it binds
            name = f"[{settings.host}]" if ":" in settings.host else settings.host
            hosts = (*hosts, f"{name}:{settings.port}")
        app.add_middleware(HostCheckMiddleware, allowed=hosts)
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
        in_flight=served.add_in_flight,
    )
    _add_error_handlers(app)
    app.include_router(router)
    app.include_router(tokens.router)
    return app


def served_by(request: Request) -> Served:
    return request.app.state.served


# routes -------------------------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    s = served_by(request)
    s.check_open()
    raw = await request.body()
    loop = asyncio.get_running_loop()

    def prepare() -> Completion:
        req = parse_body(raw, CompletionRequest)
        req.check_supported()
        adapter = s.check_model(req.model)
        return Completion(s.model, s.engine, s.metrics, req, loop, s.settings.timeout_s, adapter=adapter)

    # JSON, validation and tokenizing off the event loop, which serves every stream at once.
    return await run_job(request, await asyncio.to_thread(prepare))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    s = served_by(request)
    s.check_open()
    raw = await request.body()
    loop = asyncio.get_running_loop()

    def prepare() -> Completion:
        req = parse_body(raw, ChatCompletionRequest)
        adapter = s.check_model(req.model)
        return prepare_chat(
            s.model, s.engine, s.metrics, s.chat, req, loop, s.settings.timeout_s, adapter=adapter
        )

    return await run_job(request, await asyncio.to_thread(prepare))


async def run_job(request: Request, job: Completion) -> Response:
    """Hold the engine's room for the choices (429 when full: before any scoring), score the
    prompts when asked, schedule the choices, and answer (a stream or one body)."""
    req = job.req
    job.reserve()
    try:
        if req.echo and req.logprobs is not None:
            await job.score_prompts()
        job.submit()
    except BaseException:  # a refusal, a failure, or the request cancelled: the room goes back
        job.release()
        raise
    if req.stream:
        return StreamingResponse(
            job.sse(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    answer = await job.collect(request)
    return Response(answer.model_dump_json(), media_type="application/json")


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    model = served_by(request).model
    card = {
        "id": model.name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "gpt2-edge",
        "max_model_len": model.n_ctx,
    }
    # LoRA adapters as vLLM lists them: their own ids, the base model as root and parent
    adapters = [{**card, "id": name, "root": name, "parent": model.name} for name in model.adapters]
    return {"object": "list", "data": [card, *adapters]}


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    s = served_by(request)
    live = s.engine.running and not s.draining
    body = {
        "status": "ok" if live else ("draining" if s.draining else "down"),
        "model": s.model.name,
        "model_loaded": True,
        "queue_depth": s.engine.queue_depth,
        "active": s.engine.active,
        "max_batch": s.engine.max_batch,
        "max_queue": s.engine.max_queue,
        "kv_tokens_allocated": s.engine.kv_tokens_allocated,
        "kv_budget": s.engine.kv_budget,
        "draft_kv_tokens_allocated": s.engine.draft_kv_tokens_allocated,
        "step_invariant": s.model.step_invariant,
        "replica": s.settings.replica,
    }
    return JSONResponse(body, status_code=200 if live else 503)


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(served_by(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


# errors -------------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape; none shows a stack trace."""
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal)


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    err = validation_error(ValidationError.from_exception_data("request", list(e.errors())))
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    if e.status_code == 404:
        err = ApiError(404, f"no route {request.url.path}", type="not_found_error", code="unknown_route")
    elif e.status_code == 405:
        err = ApiError(
            405, f"method {request.method} is not allowed on {request.url.path}", code="method_not_allowed"
        )
    else:
        err = ApiError(e.status_code, str(e.detail))
    return JSONResponse(err.body(), status_code=err.status, headers=dict(e.headers or {}))


async def _internal(request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    err = ApiError(500, "internal server error", type="server_error", code="internal_error")
    return JSONResponse(err.body(), status_code=500)
