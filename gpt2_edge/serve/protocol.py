"""The protocol: request bodies (pydantic, strict: no silent coercion, no unknown fields), their
mapping to ``GenerationConfig``, the typed responses (completions and chat, whole and streamed),
and OpenAI's error shape. Nothing here runs a model.

Fields follow OpenAI's legacy ``/v1/completions`` and its chat completions; ``top_k``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos`` and ``stream_options.continuous_usage_stats``
are extensions (as in vLLM, whose names the clients that benchmark and evaluate servers send:
guidellm, lm-evaluation-harness), and so is ``prompt_lookup`` (speculative decoding, this
server's own). Structured output takes OpenAI's ``response_format``, vLLM's ``guided_*`` and
``structured_outputs``, and llama-server's ``json_schema`` and ``grammar``. The tokenizer routes
take vLLM's and llama-server's names.
OpenAI fields this server does not implement are
accepted only at their neutral value, so a client that sends the defaults still works and one
that asks for more hears so instead of getting something else.

One file past 400 lines: every body the server takes (completions, chat, tokenize), every body it
answers, and the JSON guards in front of them, so a reader finds the whole wire format in one
place.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import Gpt2EdgeError
from ..runtime.constraints import Constraint, ConstraintError
from ..runtime.sampling import GenerationConfig, logit_bias_pairs, openai_generation_config
from .scheduler import MAX_PROMPT_LOOKUP

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 5  # as OpenAI's legacy completions
MAX_N = 128  # as OpenAI
# the structured-output fields of vLLM's legacy API and llama-server's (response_format and
# structured_outputs have a shape of their own)
CONSTRAINT_FIELDS = (
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "json_schema", "grammar",
)  # fmt: skip


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
    include_usage: bool = False  # a last chunk with the request's usage (OpenAI)
    continuous_usage_stats: bool = False  # usage so far in every chunk (vLLM's extension)


TokenIds = list[Annotated[int, Field(ge=0)]]


class JsonSchemaFormat(_Strict):
    """OpenAI's ``response_format.json_schema``: a name, the schema, strict (always kept here)."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: one of json (a schema), json_object, regex, choice, grammar."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def given(self) -> list[tuple[str, Any]]:
        out = [("json", self.json_)] if self.json_ is not None else []
        if self.json_object:
            out.append(("json_object", True))
        rest = [(k, getattr(self, k)) for k in ("regex", "choice", "grammar")]
        return out + [(k, v) for k, v in rest if v is not None]


class SamplingFields(_Strict):
    """The fields a completion and a chat request share, defined once: which model, how to sample,
    when to stop, how to stream. The extensions (``top_k``, ``repetition_penalty``, ``min_tokens``,
    ``ignore_eos``, ``prompt_lookup``) are vLLM's names (and this server's own, for speculation)."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions
    top_k: Annotated[int, Field(ge=-1)] = 0  # 0 or -1 = off (-1 is vLLM's spelling)
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False  # vLLM's: decode past the end-of-text token up to max_tokens
    # Speculative decoding: draft up to this many tokens per step from the prompt and the text so
    # far (prompt lookup), verified in one pass; the same tokens. None: the server's default
    # (--prompt-lookup); 0: off.
    prompt_lookup: Annotated[int, Field(ge=0, le=MAX_PROMPT_LOOKUP)] | None = None
    # OpenAI's: token id (a string, as JSON keys are) -> bias in [-100, 100], at most 300
    logit_bias: dict[str, float] | None = None
    # Structured output, at most one of: OpenAI's response_format; vLLM's guided_* (legacy) and
    # structured_outputs; llama-server's json_schema and grammar (GBNF). runtime/constraints.py.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None
    # OpenAI fields accepted at their neutral value only
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None  # an end-user id for the caller's own logs; unused here

    def constraint(self) -> tuple[str, Constraint] | None:
        """The structured-output field given, as (its name, the ``Constraint``); None for none.
        Two given: 400 naming both. A value that is no constraint: 400 naming its field (whether
        it compiles is the admission's check, with the tokenizer)."""
        given: list[tuple[str, Any]] = []
        rf = self.response_format
        if rf is not None and rf.type != "text":
            given.append(("response_format", rf))
        for name in CONSTRAINT_FIELDS:
            if getattr(self, name) is not None:
                given.append((name, getattr(self, name)))
        if self.structured_outputs is not None:
            given += [(f"structured_outputs.{k}", v) for k, v in self.structured_outputs.given()]
        if len(given) > 1:
            raise ApiError(
                400,
                f"{given[0][0]} and {given[1][0]} both constrain the output: send one",
                param=given[1][0],
            )
        if not given:
            return None
        name, value = given[0]
        kind = name.removeprefix("structured_outputs.").removeprefix("guided_")
        try:
            if name == "response_format":
                if value.type == "json_object":
                    return name, Constraint.json_object()
                if value.json_schema is None:
                    raise ApiError(
                        400, "response_format of type json_schema needs its json_schema", param=name
                    )
                return name, Constraint.json_schema(value.json_schema.schema_ or {})
            if kind == "json_object":
                return name, Constraint.json_object()
            if kind in ("json", "json_schema"):
                return name, Constraint.json_schema(value)
            if kind == "regex":
                return name, Constraint.regex(value)
            if kind == "choice":
                return name, Constraint.choice(value)
            return name, Constraint.grammar(value)
        except ConstraintError as e:
            raise ApiError(400, f"{name}: {e}", param=name) from None


class CompletionRequest(SamplingFields):
    """The body of ``POST /v1/completions``: the shared fields and its own."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: Annotated[int, Field(ge=0)] = 16  # 0 only with echo: score the prompt, generate nothing
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    # OpenAI fields accepted at their neutral value only
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        """Refuse what this server does not implement, naming the field."""
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(
                400,
                "max_tokens must be >= 1 (0 only with echo: true, which scores the prompt and generates "
                "nothing)",
                param="max_tokens",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ApiError(400, f"{name} is not supported (only 0); use repetition_penalty", param=name)
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of")
        if self.logit_bias:
            try:
                logit_bias_pairs(self.logit_bias)
            except Gpt2EdgeError as e:
                raise ApiError(400, str(e), param="logit_bias") from None
        self.constraint()
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

    def generation_config(self, choice: int = 0, prompt_lookup: int = 0) -> GenerationConfig:
        """How to generate choice ``choice`` of this request. Choice i of a seeded request uses
        seed + i: the n choices differ, and a request's choice 0 repeats whatever else is in the batch.
        ``prompt_lookup``: the server's default, for a request that does not say."""
        config = openai_generation_config(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_tokens=self.min_tokens,
            repetition_penalty=self.repetition_penalty,
            seed=None if self.seed is None else (self.seed + choice) % 2**63,
            stop=self.stop_strings,
            ignore_eos=self.ignore_eos,
            logit_bias=dict(logit_bias_pairs(self.logit_bias or {})),
            constraint=(found := self.constraint()) and found[1],
        )
        lookup = prompt_lookup if self.prompt_lookup is None else self.prompt_lookup
        return dataclasses.replace(config, prompt_lookup=lookup) if lookup else config


class TokenizeRequest(_Strict):
    """The body of ``POST /tokenize``: the text as ``prompt`` (vLLM's name, which lm-eval sends) or
    ``content`` (llama-server's). GPT-2's tokenizer adds no special tokens, so
    ``add_special_tokens`` (vLLM) and ``add_special`` (llama-server) change nothing."""

    prompt: str | None = None
    content: str | None = None
    add_special_tokens: bool = True
    add_special: bool = False
    model: str | None = None

    @property
    def text(self) -> str:
        if self.prompt is not None and self.content is not None:
            raise ApiError(400, "send the text as prompt or as content, not both", param="prompt")
        text = self.prompt if self.prompt is not None else self.content
        if text is None:
            raise ApiError(
                400,
                "prompt is required (the text to tokenize; content also works)",
                param="prompt",
                code="missing_field",
            )
        return text


class DetokenizeRequest(_Strict):
    """The body of ``POST /detokenize``."""

    tokens: TokenIds
    model: str | None = None


class ChatMessage(_Strict):
    """One message of a chat: ``content`` a string or OpenAI's list of parts (text parts only)."""

    role: Annotated[str, Field(min_length=1)]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, i: int) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            where = f"messages.{i}.content.{j}"
            if part.get("type") != "text":
                raise ApiError(
                    400,
                    f"{where}: only text parts are supported (type 'text'), got type {part.get('type')!r}",
                    param="messages",
                )
            if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
                raise ApiError(
                    400, f"{where}: a text part is {{'type': 'text', 'text': str}}", param="messages"
                )
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(SamplingFields):
    """The body of ``POST /v1/chat/completions`` (OpenAI's chat shape: the shared fields and its
    own). No tools, no echo."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # None: the rest of the context (OpenAI's default); max_completion_tokens is the newer name
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def message_texts(self) -> list[dict[str, str]]:
        """The messages as ``{"role", "content"}`` (+ ``name``) with string contents."""
        out = []
        for i, m in enumerate(self.messages):
            d = {"role": m.role, "content": m.text(i)}
            if m.name is not None:
                d["name"] = m.name
            out.append(d)
        return out

    def as_completion(self, prompt: list[int], n_ctx: int) -> CompletionRequest:
        """The completion request that generates this chat's answer to the token ids ``prompt``
        (the rendered messages), checked as ``/v1/completions`` checks its own."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        given = {
            k: v
            for k, v in (
                ("max_tokens", self.max_tokens),
                ("max_completion_tokens", self.max_completion_tokens),
            )
            if v is not None
        }
        if len(set(given.values())) > 1:
            raise ApiError(
                400, "max_tokens and max_completion_tokens differ; send one", param="max_completion_tokens"
            )
        max_tokens = next(iter(given.values()), None)
        if max_tokens is None:
            max_tokens = n_ctx - len(prompt)
            if max_tokens < 1:
                raise ApiError(
                    400,
                    f"this model's context is {n_ctx} tokens, and the messages take {len(prompt)} tokens "
                    "as the chat template renders them: no room to answer; send shorter messages",
                    param="messages",
                    code="context_length_exceeded",
                )
        req = CompletionRequest.model_construct(
            prompt=prompt,
            max_tokens=max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            **{name: getattr(self, name) for name in SamplingFields.model_fields},
        )
        req.check_supported()
        return req


# responses ----------------------------------------------------------------------------------------
# What the server answers, field for field in OpenAI's order (render.py builds them). Not strict:
# only the server makes them.
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: per token its text, log-probability, the k most likely tokens'
    texts and log-probabilities, and where its text starts."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    def __add__(self, other: CompletionLogprobs) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=self.tokens + other.tokens,
            token_logprobs=self.token_logprobs + other.token_logprobs,
            top_logprobs=self.top_logprobs + other.top_logprobs,
            text_offset=self.text_offset + other.text_offset,
        )


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """The body of a ``/v1/completions`` answer."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed ``/v1/completions`` answer. ``usage``: absent, or null
    (``include_usage``: only the last chunk has it), or the usage so far (``continuous_usage_stats``);
    ``sse`` leaves it out where absent."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]  # the UTF-8 of the token's text


class ChatLogprob(ChatTokenLogprob):
    top_logprobs: list[ChatTokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob]


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    """The body of a ``/v1/chat/completions`` answer."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class RoleDelta(BaseModel):
    """A streamed choice's first delta: who speaks."""

    role: str = "assistant"
    content: str = ""


class ContentDelta(BaseModel):
    content: str


class ChatChunkChoice(BaseModel):
    index: int
    delta: RoleDelta | ContentDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed chat answer (``usage`` as ``CompletionChunk``'s)."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


def sse(chunk: CompletionChunk | ChatCompletionChunk, usage: bool) -> str:
    """``chunk`` as one Server-Sent Event (``usage``: whether the chunk carries the key at all)."""
    return f"data: {chunk.model_dump_json(exclude=None if usage else {'usage'})}\n\n"


# Union fields: pydantic reports one error per member; one sentence per field reads better.
_UNION_HELP = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings",
}

M = TypeVar("M", bound=BaseModel)


MAX_JSON_DEPTH = 32  # arrays and objects inside each other; no request here needs more than 5
# A JSON escape of a UTF-16 surrogate: "\\ud800" decodes to a str that is not Unicode text
# (the tokenizer, the response's encoder and the log all fail on it), unless paired.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_body(raw: bytes, model: type[M]) -> M:
    """Bytes -> validated request, or an ``ApiError`` naming the field (never a stack trace):
    not UTF-8, not JSON, nested deeper than ``MAX_JSON_DEPTH``, a number too long to convert, a
    string with a lone surrogate, not an object, or not the model."""
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
    except RecursionError:
        raise ApiError(400, _too_deep()) from None
    except ValueError:  # an integer of more digits than Python converts (int_max_str_digits)
        raise ApiError(400, "the request body has a number with too many digits") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH or _SURROGATE_ESCAPE.search(text):
        _check_values(data, surrogates=_SURROGATE_ESCAPE.search(text) is not None)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def _too_deep() -> str:
    return (
        f"the request body is nested too deeply (more than {MAX_JSON_DEPTH} arrays or objects inside "
        "each other)"
    )


def _check_values(data: dict[str, Any], surrogates: bool) -> None:
    """Walk the parsed body (iteratively: no recursion for a hostile depth): refuse nesting past
    ``MAX_JSON_DEPTH`` and, when the text had surrogate escapes, strings that are not Unicode."""
    stack: list[tuple[Any, tuple[str, ...], int]] = [(data, (), 1)]
    while stack:
        value, loc, depth = stack.pop()
        if isinstance(value, dict):
            items: Any = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, _too_deep(), param=loc[0] if loc else None)
        for key, item in items:
            where = (*loc, str(key))
            if surrogates:
                if not loc and isinstance(key, str) and not _is_text(key):
                    # no field's name holds a surrogate: an unknown field, named as JSON escapes it
                    name = _escaped(key)
                    raise ApiError(400, f"unknown field '{name}'", param=name, code="unknown_field")
                for s in (key, item) if isinstance(key, str) else (item,):
                    if isinstance(s, str):
                        _check_text(s, where)
            if isinstance(item, dict | list):
                stack.append((item, where, depth + 1))


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(s: str) -> str:
    """``s`` with each lone surrogate as its JSON escape (``\\ud800``): text an error can carry."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_text(s: str, loc: tuple[str, ...]) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        field = _escaped(".".join(loc))
        raise ApiError(
            400,
            f"{field}: a lone surrogate (\\u{ord(s[e.start]):04x}) at character {e.start} is not text; "
            "send a character beyond U+FFFF as a surrogate pair, or as UTF-8",
            param=_escaped(loc[0]),
        ) from None


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
    loc = _escaped(".".join(str(x) for x in first["loc"] if not _is_union_tag(x)))
    field = None if field is None else _escaped(field)
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {loc!r}", param=loc, code="unknown_field")
    if first["type"] == "missing":
        return ApiError(400, f"{loc} is required", param=loc, code="missing_field")
    return ApiError(400, f"{loc}: {first['msg']}", param=field, code="invalid_value")
