"""The request protocol: bodies (pydantic, strict: no silent coercion, no unknown fields), their
mapping to ``GenerationConfig``, and OpenAI's error shape. Nothing here runs a model.

Fields follow OpenAI's legacy ``/v1/completions``; ``top_k``, ``repetition_penalty`` and
``min_tokens`` are extensions (as in vLLM). OpenAI fields this server does not implement are
accepted only at their neutral value, so a client that sends the defaults still works and one
that asks for more hears so instead of getting something else.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.sampling import GenerationConfig, openai_generation_config

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 5  # as OpenAI's legacy completions
MAX_N = 128  # as OpenAI


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_Strict):
    """The body of ``POST /v1/completions``."""

    model: str | None = None
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    # extensions
    top_k: Annotated[int, Field(ge=-1)] = 0  # 0 or -1 = off (-1 is vLLM's spelling)
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    # OpenAI fields accepted at their neutral value only
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: Annotated[int, Field(ge=1)] | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None  # an end-user id for the caller's own logs; unused here

    def check_supported(self) -> None:
        """Refuse what this server does not implement, naming the field."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ApiError(400, f"{name} is not supported (only 0); use repetition_penalty", param=name)
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        if self.suffix:
            raise ApiError(400, "suffix is not supported (no insertion)", param="suffix")
        if self.min_tokens > self.max_tokens:
            raise ApiError(
                400,
                f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})",
                param="min_tokens",
            )
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(s == "" for s in stops):
            raise ApiError(400, "stop strings must not be empty", param="stop")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options needs stream: true", param="stream_options")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def generation_config(self, choice: int = 0) -> GenerationConfig:
        """How to generate choice ``choice`` of this request. Choice i of a seeded request uses
        seed + i: the n choices differ, and a request's choice 0 repeats whatever else is in the batch."""
        return openai_generation_config(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_tokens=self.min_tokens,
            repetition_penalty=self.repetition_penalty,
            seed=None if self.seed is None else (self.seed + choice) % 2**63,
            stop=self.stop_strings,
        )


class TokenizeRequest(_Strict):
    """The body of ``POST /tokenize``."""

    content: str
    model: str | None = None


class DetokenizeRequest(_Strict):
    """The body of ``POST /detokenize``."""

    tokens: TokenIds
    model: str | None = None


# Union fields: pydantic reports one error per member; one sentence per field reads better.
_UNION_HELP = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings",
}

M = TypeVar("M", bound=BaseModel)


def parse_body(raw: bytes, model: type[M]) -> M:
    """Bytes -> validated request, or an ``ApiError`` naming the field (never a stack trace)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(
            400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def _is_union_tag(x: object) -> bool:
    """pydantic puts the union member tried (``str``, ``list[constrained-int]``) into an error's loc."""
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool") or "-" in x)


def validation_error(e: ValidationError) -> ApiError:
    """The first problem of a pydantic error, as a 400 naming the field (``a.b.0`` for nested)."""
    errors = e.errors(include_url=False, include_input=False)
    first = errors[0]
    field = str(first["loc"][0]) if first["loc"] else None
    if field in _UNION_HELP:
        # A union reports one error per member: a value error (a negative id, too many stops)
        # says more than "not a string"; with type errors only, one sentence names the forms.
        mine = [x for x in errors if x["loc"][:1] == (field,)]
        values = [x for x in mine if not x["type"].endswith("_type")]
        if not values:
            return ApiError(400, _UNION_HELP[field], param=field, code="invalid_type")
        first = values[0]
    loc = ".".join(str(x) for x in first["loc"] if not _is_union_tag(x))
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {loc!r}", param=loc, code="unknown_field")
    if first["type"] == "missing":
        return ApiError(400, f"{loc} is required", param=loc, code="missing_field")
    return ApiError(400, f"{loc}: {first['msg']}", param=field, code="invalid_value")
