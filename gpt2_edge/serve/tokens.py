"""The tokenizer routes: ``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``, in
the shapes vLLM serves (which lm-evaluation-harness's remote tokenizer reads) and llama-server's.

- ``/tokenize``: ``{"prompt": text}`` (vLLM) or ``{"content": text}`` (llama-server), optional
  ``add_special_tokens`` / ``add_special`` (GPT-2 adds no special tokens: no effect) ->
  ``{"tokens", "count", "max_model_len"}``. Any text within the body limit (``max_body_bytes``)
  is tokenized, off the event loop, however many tokens it is (as vLLM and llama-server do):
  lm-evaluation-harness's remote tokenizer counts whole documents before it windows them for
  rolling perplexity. Prompts are what must fit the context, not a text to count.
- ``/detokenize``: ``{"tokens": [...]}`` -> ``{"prompt": text, "content": text}`` (vLLM's and
  llama-server's names for the same text).
- ``/tokenizer_info``: what vLLM answers, the tokenizer's Hugging Face settings
  (``tokenizer_class``, ``eos_token``, ``bos_token``, ``unk_token``, ``pad_token``,
  ``model_max_length`` = the served context, ``chat_template``: the one ``/v1/chat/completions``
  renders, as Jinja source).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from .model import Model
from .prompts import check_ids
from .protocol import ApiError, DetokenizeRequest, TokenizeRequest, parse_body

router = APIRouter()


def check_length(model: Model, text: str, param: str) -> None:
    """Refuse text longer than any that fits the context, by its length alone (no tokenizing)."""
    if len(text) > model.max_prompt_chars:
        raise ApiError(
            400,
            f"{param} is {len(text)} characters; this model's context of {model.n_ctx} tokens holds no "
            f"text longer than {model.max_prompt_chars} characters",
            param=param,
            code="context_length_exceeded",
        )


def encode_text(model: Model, text: str, param: str, *, fit_context: bool = True) -> list[int]:
    """``text``'s token ids, or a 400 naming ``param``: text longer than any that fits the context
    (``check_length``, before tokenizing; ``fit_context=False``: not checked), or text that is not
    Unicode (a lone surrogate, which JSON's ``\\ud800`` escapes can carry). Call it off the event
    loop."""
    if fit_context:
        check_length(model, text, param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            f"{param} is not valid Unicode text: a lone surrogate (\\u{ord(text[e.start]):04x}) at "
            f"character {e.start}",
            param=param,
        ) from None
    return model.tokenizer.encode_batch([text])[0]  # lets go of the GIL, unlike encode


def tokenizer_info(model: Model, chat_template: str | None, config: dict[str, Any]) -> dict[str, Any]:
    """vLLM's ``/tokenizer_info``: the tokenizer's Hugging Face settings (``config``: the bundle's
    ``tokenizer_config.json``, if it carries one), with the served context and chat template."""
    eos = getattr(model.tokenizer, "eos_token", None)
    info: dict[str, Any] = {
        "tokenizer_class": "GPT2TokenizerFast",
        "bos_token": eos,  # GPT-2: one <|endoftext|> for all three, no padding token
        "eos_token": eos,
        "unk_token": eos,
        "pad_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        **{k: v for k, v in config.items() if k not in ("vocab_file", "merges_file")},
        "model_max_length": model.n_ctx,
    }
    if chat_template is not None:
        info["chat_template"] = chat_template
    else:
        info.pop("chat_template", None)
    return info


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    s = request.app.state.served
    req = parse_body(await request.body(), TokenizeRequest)
    s.check_model(req.model)
    text = req.text
    param = "prompt" if req.prompt is not None else "content"
    # bounded by the body limit alone (the middleware's): a text to count need not fit the context
    ids = await asyncio.to_thread(encode_text, s.model, text, param, fit_context=False)
    return {"tokens": ids, "count": len(ids), "max_model_len": s.model.n_ctx}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    s = request.app.state.served
    req = parse_body(await request.body(), DetokenizeRequest)
    s.check_model(req.model)
    check_ids(req.tokens, s.model.vocab_size, "tokens")
    text = await asyncio.to_thread(s.model.tokenizer.decode, req.tokens)
    return {"prompt": text, "content": text}


@router.get("/tokenizer_info")
async def get_tokenizer_info(request: Request) -> dict[str, Any]:
    s = request.app.state.served
    return tokenizer_info(s.model, s.chat.jinja_source, s.chat.tokenizer_config)
