"""``POST /v1/chat/completions``: OpenAI's chat shape over the machinery of ``/v1/completions``.

The messages are rendered into one prompt by the model's chat template and tokenized; the answer
is then one ``Completion`` (completions.py: same engine, limits, timeouts, streaming) whose
output speaks chat (render.py's ``ChatRender``: ``message`` / ``delta`` instead of ``text``, chat
logprobs, ``chat.completion`` and ``chat.completion.chunk`` objects, a first streamed chunk per
choice with the assistant's role).

The chat template:

- A bundle that carries a Hugging Face chat template (``chat_template.jinja``, or
  ``tokenizer_config.json``'s ``chat_template``, listed in its manifest) is rendered with it, as
  ``transformers``' ``apply_chat_template`` does: a sandboxed Jinja environment, ``messages``,
  ``add_generation_prompt=True``, ``bos_token``, ``eos_token``, ``raise_exception``. The answer
  ends at the model's end-of-text token, as that model was tuned to. Such a template needs
  ``jinja2``: without it the server refuses to start (``ChatTemplateError``) rather than render a
  tuned model's chat in a format it was not tuned on.
- Otherwise (GPT-2 and the shipped default model are not chat-tuned: their bundles carry none)
  the plain default: one ``Role: content`` line per message (System / User / Assistant) and a
  last ``Assistant:`` for the answer, which stops at the next ``"\\nUser:"`` (a stop string added
  to the request's own) unless ``ignore_eos`` asks for exactly ``max_tokens``. Its Jinja form
  (``DEFAULT_TEMPLATE``) is what ``/tokenizer_info`` shows; it renders the same text.

Message contents are strings or OpenAI's lists of text parts (joined by newlines); roles other than
system, user and assistant are refused by the default template and left to a model's own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..errors import Gpt2EdgeError
from .completions import Completion
from .engine import Engine
from .metrics import Metrics
from .model import Model
from .protocol import ApiError, ChatCompletionRequest
from .render import ChatRender
from .tokens import check_length, encode_text

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
DEFAULT_STOP = "\nUser:"  # where the default template's next turn would begin
# The default template in Jinja, for clients that render it themselves (/tokenizer_info); the
# server renders it in Python (jinja2 is not a dependency of the `serve` extra): the same text.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}[message['role']] }}: "
    "{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(Gpt2EdgeError):
    """A bundle's chat template cannot be used (no jinja2 to render it, or not valid Jinja)."""


def _token_text(value: Any) -> str | None:
    """A special token from ``tokenizer_config.json``: a string or an ``AddedToken`` dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """How messages become a prompt: a model's Hugging Face template, or the plain default."""

    def __init__(
        self,
        source: str | None = None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        tokenizer_config: dict[str, Any] | None = None,
    ) -> None:
        """``source``: the Jinja source of a model's template (None: the default template)."""
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.tokenizer_config = tokenizer_config or {}  # the bundle's, for /tokenizer_info
        self._compiled: Any = None
        if source is not None:
            self._compiled = _compile(source)

    @classmethod
    def for_model(cls, model: Model) -> ChatTemplate:
        """The template of ``model``'s bundle, or the default when it carries none (or when the
        model is not read from a bundle)."""
        bundle = model.bundle
        eos = getattr(model.tokenizer, "eos_token", None)
        if bundle is None:
            return cls(bos_token=eos, eos_token=eos)
        config = bundle.tokenizer_config()
        return cls(
            bundle.chat_template(),
            bos_token=_token_text(config.get("bos_token")) or eos,
            eos_token=_token_text(config.get("eos_token")) or eos,
            tokenizer_config=config,
        )

    @property
    def is_default(self) -> bool:
        return self.source is None

    @property
    def jinja_source(self) -> str:
        """The template as Jinja source: the model's, or ``DEFAULT_TEMPLATE``."""
        return self.source if self.source is not None else DEFAULT_TEMPLATE

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings the template adds to a request's own (the model's own template ends an
        answer with its end-of-text token instead)."""
        return (DEFAULT_STOP,) if self.is_default else ()

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt for ``messages`` (``{"role", "content"}`` with string contents), ending where
        the assistant's answer begins; a 400 naming ``messages`` when the template refuses them."""
        if self._compiled is None:
            lines = []
            for i, m in enumerate(messages):
                if m["role"] not in ROLES:
                    raise ApiError(
                        400,
                        f"messages.{i}.role: {m['role']!r} is not one of {', '.join(ROLES)} (this model "
                        "has no chat template of its own; the default one knows these roles)",
                        param="messages",
                    )
                lines.append(f"{ROLES[m['role']]}: {m['content']}\n")
            return "".join(lines) + "Assistant:"
        import jinja2

        try:
            return self._compiled.render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:  # raise_exception(...) included: the template's own words
            raise ApiError(
                400, f"the model's chat template refused the messages: {e}", param="messages"
            ) from None


def _compile(source: str) -> Any:
    """Compile a Hugging Face chat template as ``transformers`` does (sandboxed, trimmed blocks)."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError(
            "the bundle has a chat template, and rendering it needs jinja2: pip install jinja2 "
            "(the server does not serve a chat-tuned model's chat in a format it was not tuned on)"
        ) from None

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the bundle's chat template is not valid Jinja: {e}") from None


def prepare_chat(
    model: Model,
    engine: Engine,
    metrics: Metrics,
    template: ChatTemplate,
    req: ChatCompletionRequest,
    loop: asyncio.AbstractEventLoop,
    timeout_s: float,
    adapter: str | None = None,
) -> Completion:
    """The chat request as a ``Completion`` answering in chat's shape (``ChatRender``): messages
    rendered, bounded, tokenized, checked; ``adapter``: the LoRA adapter it runs with.
    Call it off the event loop (rendering and tokenizing take time on long messages)."""
    messages = req.message_texts()
    check_length(model, "".join(m["content"] for m in messages), "messages")  # before rendering
    prompt = encode_text(model, template.render(messages), "messages")
    return Completion(
        model,
        engine,
        metrics,
        req.as_completion(prompt, model.n_ctx),
        loop,
        timeout_s,
        render=ChatRender,
        extra_stop=template.stop,
        adapter=adapter,
    )
