"""The decode loop shared by every backend: padding, context limits, eos / stop strings, timings.

A backend is anything with ``start(batch_size)`` and
``step(input_ids, attention_mask, position_ids) -> last-position logits (B, V)`` that keeps
its own KV cache between calls. The PyTorch reference (``gpt2_edge.model.generate``) and the
ONNX Runtime session are two such backends, so both run exactly this loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Generator as Generator_
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .sampling import GenerationConfig, TokenChooser


class Backend(Protocol):
    def start(self, batch_size: int) -> None: ...

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> np.ndarray: ...

    def reorder(self, rows: np.ndarray) -> None:
        """Keep only (and repeat) the given batch rows of the KV cache (beam search)."""
        ...


class ContextOverflowError(ValueError):
    """Prompt + new tokens do not fit the model's context."""


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids (an eos that ended the sequence included)
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


def fit_context(prompts: Sequence[Sequence[int]], config: GenerationConfig, n_ctx: int) -> list[list[int]]:
    """Refuse (or, with ``truncate``, left-truncate) prompts whose continuation would not fit."""
    if not prompts:
        raise ValueError("no prompts given")
    room = n_ctx - config.max_new_tokens
    out = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (0 tokens)")
        if len(p) > room:
            if not config.truncate or room < 1:
                raise ContextOverflowError(
                    f"prompt {i} has {len(p)} tokens and max_new_tokens is {config.max_new_tokens}: "
                    f"{len(p) + config.max_new_tokens} > the model's context of {n_ctx}; shorten the "
                    "prompt, lower max_new_tokens, or ask for left truncation"
                    + ("" if room >= 1 else " (max_new_tokens alone fills the context)")
                )
            p = p[len(p) - room :]
        out.append(list(p))
    return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` of a left-padded batch (int64)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = p
        mask[b, width - len(p) :] = 1
    return ids, mask, positions_from_mask(mask)


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Each real token's index among the real tokens of its row; pads get 0."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


def iter_decode(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    eos_token_id: int | None,
    n_ctx: int,
    detokenize: Callable[[Sequence[int]], str],
) -> Generator_[list[list[int]], None, list[GenerationResult]]:
    """The decode loop as a generator: yields every row's generated ids after each step and
    returns the results. Each row stops on its own (eos, a stop string, or the length)."""
    if config.num_beams != 1:
        raise ValueError("iter_decode is the num_beams=1 loop; beam search lives in runtime.beam")
    prompts = fit_context(prompts, config, n_ctx)
    B = len(prompts)
    pad_id = eos_token_id if eos_token_id is not None else 0
    ids, mask, pos = left_pad(prompts, pad_id)
    chooser = TokenChooser(config, eos_token_id)
    generated: list[list[int]] = [[] for _ in range(B)]
    seen: list[list[int]] = [list(p) for p in prompts]
    texts: list[str] = ["" for _ in range(B)]
    finish: list[str | None] = [None] * B

    t0 = time.perf_counter()
    backend.start(B)
    logits = backend.step(ids, mask, pos)
    t_first = time.perf_counter()
    steps = 0
    for step in range(config.max_new_tokens):
        nxt = chooser(logits, seen, step)
        for b in range(B):
            if finish[b] is not None:
                continue
            tok = int(nxt[b])
            generated[b].append(tok)
            seen[b].append(tok)
            if tok == eos_token_id:
                finish[b] = "eos"
                continue
            if config.stop:
                text = detokenize(generated[b])
                hits = [text.find(s) for s in config.stop if s in text]
                if hits:
                    texts[b] = text[: min(hits)]
                    finish[b] = "stop"
        steps += 1
        yield generated
        if all(f is not None for f in finish) or step == config.max_new_tokens - 1:
            break
        feed = np.where([f is None for f in finish], nxt, pad_id).astype(np.int64)[:, None]
        mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits = backend.step(feed, mask, pos)
    t_end = time.perf_counter()

    timings = step_timings(t_first - t0, t_end - t_first, steps)
    results = []
    for b in range(B):
        reason = finish[b] or "length"
        if reason != "stop":
            body = generated[b][:-1] if reason == "eos" else generated[b]
            texts[b] = detokenize(body)
        results.append(GenerationResult(texts[b], generated[b], reason, len(prompts[b]), dict(timings)))
    return results


def step_timings(prefill_s: float, decode_s: float, steps: int) -> dict[str, float]:
    """Prefill (= time to first token) and per-step decode time; the first token comes from prefill."""
    decode_steps = max(steps - 1, 0)
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "ms_per_token": 1000 * decode_s / decode_steps if decode_steps else 0.0,
        "steps": float(steps),
    }


def decode(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    eos_token_id: int | None,
    n_ctx: int,
    detokenize: Callable[[Sequence[int]], str],
) -> list[GenerationResult]:
    """Continue every prompt: greedy / sampled (``num_beams=1``) or beam search."""
    if config.num_beams > 1:
        from .beam import beam_search

        fitted = fit_context(prompts, config, n_ctx)  # refuses empty and overflowing prompts first
        return [
            beam_search(backend, p, config, eos_token_id=eos_token_id, n_ctx=n_ctx, detokenize=detokenize)
            for p in fitted
        ]
    it = iter_decode(backend, prompts, config, eos_token_id=eos_token_id, n_ctx=n_ctx, detokenize=detokenize)
    while True:
        try:
            next(it)
        except StopIteration as done:
            return done.value


def stream_text(
    steps: Iterator[list[list[int]]],
    detokenize: Callable[[Sequence[int]], str],
    stop: Sequence[str] = (),
) -> Iterator[str]:
    """Turn row 0's growing ids into text pieces, never splitting a UTF-8 character.

    A piece is held back while the text ends in an incomplete byte sequence (decoded as U+FFFD)
    or in what could still become a stop string, so the pieces always join to the final text.
    """
    emitted = 0
    it = iter(steps)
    while True:
        try:
            generated = next(it)[0]
        except StopIteration as done:
            results = done.value
            final = results[0].text
            if len(final) > emitted:
                yield final[emitted:]
            return
        text = detokenize(generated)
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for s in stop:  # hold back a suffix that is a prefix of a stop string
            for k in range(min(len(s), safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe


class Generator:
    """Text generation from a bundle, torch-free.

    >>> gen = Generator.from_bundle("out/bundle", provider="cpu", threads=2)
    >>> gen.generate("ROMEO:", GenerationConfig(max_new_tokens=20))[0].text
    """

    def __init__(
        self, backend: Backend, tokenizer, eos_token_id: int | None, n_ctx: int, load_s: float = 0.0
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.n_ctx = n_ctx
        self.load_s = load_s
        self.last_result: GenerationResult | None = None

    @classmethod
    def from_bundle(
        cls,
        path: str,
        provider: str = "cpu",
        threads: int | None = None,
        verify: bool = True,
        **provider_options: Any,
    ) -> Generator:
        """Load and verify a bundle; ``provider`` is cpu, cuda, tensorrt or auto.

        ``provider_options`` go to ``OrtBackend`` (``trt_fp16``, ``trt_cache_dir``,
        ``trt_workspace_mib``).
        """
        from .bundle import Bundle
        from .session import OrtBackend

        t0 = time.perf_counter()
        bundle = Bundle.load(path, verify=verify)
        backend = OrtBackend(bundle, provider=provider, threads=threads, **provider_options)
        return cls(
            backend, bundle.tokenizer(), bundle.eos_token_id, bundle.context_length, time.perf_counter() - t0
        )

    @property
    def provider(self) -> str:
        return getattr(self.backend, "provider", "torch")

    def generate(
        self, prompts: str | Sequence[str], config: GenerationConfig | None = None
    ) -> list[GenerationResult]:
        """Continue one prompt or a batch; one result per prompt."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            raise ValueError("no prompts given")
        return decode(
            self.backend,
            self.tokenizer.encode_batch(batch),
            config or GenerationConfig(),
            eos_token_id=self.eos_token_id,
            n_ctx=self.n_ctx,
            detokenize=self.tokenizer.decode,
        )

    def stream(self, prompt: str, config: GenerationConfig | None = None) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces while it is decoded.

        The pieces join to exactly ``generate(prompt, config)[0].text``; a multi-byte character
        is never split across pieces. ``self.last_result`` holds the full result afterwards.
        """
        config = config or GenerationConfig()
        if config.num_beams != 1:
            raise ValueError("streaming needs num_beams=1 (beam search only knows its text at the end)")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("stream takes one non-empty prompt string")
        it = iter_decode(
            self.backend,
            [self.tokenizer.encode(prompt)],
            config,
            eos_token_id=self.eos_token_id,
            n_ctx=self.n_ctx,
            detokenize=self.tokenizer.decode,
        )

        def capture() -> Generator_[list[list[int]], None, list[GenerationResult]]:
            results = yield from it
            self.last_result = results[0]
            return results

        yield from stream_text(capture(), self.tokenizer.decode, config.stop)
