"""The decode loop shared by every backend: context limits, eos / stop strings, timings.

A backend (``types.Backend``) makes KV caches; the loop owns one cache per call, so one backend
(one ONNX Runtime session, or the PyTorch reference) serves concurrent calls. The PyTorch
reference (``gpt2_edge.model.generate``) and the ONNX Runtime session both run exactly this loop.
With ``GenerationConfig.prompt_lookup`` or a draft model, its steps are speculative ones
(``runtime.speculative``) where the cache can roll back (in place), plain ones elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Generator as Generator_
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Gpt2EdgeError, Gpt2EdgeTypeError
from .beam import beam_search
from .constraints import CompiledConstraint, compile_constraint, mask_worker, masks_of
from .loader import Model, load_model
from .prefix_cache import KVStore
from .sampling import GenerationConfig, TokenChooser, check_logit_bias_vocab
from .sequence import SequenceState
from .speculative import DraftModel, Speculator
from .types import (
    Backend,
    ContextOverflowError,
    GenerationResult,
    can_verify,
    fit_context,
    left_pad,
    positions_from_mask,
    step_timings,
)

__all__ = [
    "ContextOverflowError",
    "DraftModel",
    "GenerationResult",
    "Generator",
    "Model",
    "decode",
    "fit_context",
    "iter_decode",
    "left_pad",
    "load_model",
    "positions_from_mask",
]


def iter_decode(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    eos_token_id: int | None,
    n_ctx: int,
    detokenize: Callable[[Sequence[int]], str],
    draft: DraftModel | None = None,
    prefix_cache: KVStore | None = None,
    constraint: CompiledConstraint | None = None,
    mask_ahead: bool = True,
    adapters: Sequence[int] | None = None,
) -> Generator_[list[SequenceState], None, list[GenerationResult]]:
    """The decode loop as a generator: yields every row's ``SequenceState`` after each step (its
    ``piece`` is the text that step made showable) and returns the results. Each row stops on its
    own (eos, a stop string, or the length) and leaves the batch. With ``config.prompt_lookup`` or a
    ``draft`` model, a step may add several tokens to a row (speculative decoding), on caches
    that can roll back; the results' timings then count its passes and drafted/accepted tokens.
    With a ``prefix_cache`` (in-place caches), prompts start from stored rows of earlier calls
    that share their beginning, and each finished row is stored. With ``config.constraint``,
    ``constraint`` is it compiled for this tokenizer (``runtime.constraints.compile_constraint``):
    every row keeps to it, and ends ("stop") once it is complete; ``mask_ahead``: its masks for the
    next step are computed in a worker thread while the model runs (llguidance and ONNX Runtime
    both release the GIL), else after it. ``adapters``: each row's LoRA adapter id
    (``Model.adapter_ids``; 0 = none), on backends with LoRA slots."""
    if config.num_beams != 1:
        raise Gpt2EdgeError("iter_decode is the num_beams=1 loop; beam search lives in runtime.beam")
    prompts = fit_context(prompts, config, n_ctx)
    if config.ignore_eos:
        eos_token_id = None
    B = len(prompts)
    rows = [SequenceState(p, config, eos_token_id, detokenize, constraint) for p in prompts]
    # One chooser for the batch (HF semantics: the rows of a seeded batch draw from one generator).
    chooser = TokenChooser(config, eos_token_id)

    t0 = time.perf_counter()
    # One cache per call, sized once for the longest continuation: never reallocated.
    cache = backend.new_cache(B, min(n_ctx, max(len(p) for p in prompts) + config.max_new_tokens))
    slots = list(range(B))
    for b, adapter_id in enumerate(adapters or ()):
        cache.set_adapter(b, adapter_id)
    # Stored prefixes hold keys and values of the base model: rows with an adapter compute their own.
    reusing = prefix_cache is not None and hasattr(cache, "read_prefix") and not any(adapters or ())
    reused = 0
    if reusing:
        logits, reused = _prefill_reusing(cache, prompts, prefix_cache)
    else:
        logits = cache.prefill(slots, prompts)
    t_first = time.perf_counter()
    spec = None
    if (config.prompt_lookup or draft is not None) and can_verify(cache):
        spec = Speculator(cache, draft)
    steps = 0
    ahead: Future[list[np.ndarray | None]] | None = None
    for step in range(config.max_new_tokens):
        allowed = None
        if ahead is not None:
            allowed = ahead.result()
        elif constraint is not None:
            allowed = [rows[b].allowed() for b in slots]
        nxt = chooser(logits, [rows[b].seen for b in slots], step, allowed)
        for i, b in enumerate(slots):
            rows[b].append(int(nxt[i]))
        steps += 1
        yield rows
        slots = [b for b in slots if not rows[b].finished]  # finished rows leave the batch
        if not slots or spec is not None:
            break
        if constraint is not None and mask_ahead:  # the next masks while the model runs
            ahead = mask_worker().submit(masks_of, [rows[b] for b in slots])
        logits = cache.decode(slots, [rows[b].generated[-1] for b in slots])
    while spec is not None and slots:  # the first token came from the prefill, as above
        states = [rows[b] for b in slots]
        for b, r in zip(slots, spec.step(slots, states, [chooser] * len(slots)), strict=True):
            rows[b].extend(r.tokens)
        steps = max(len(r.generated) for r in rows)
        yield rows
        slots = [b for b in slots if not rows[b].finished]
    t_end = time.perf_counter()

    timings = step_timings(t_first - t0, t_end - t_first, steps)
    if spec is not None:
        timings.update(spec.stats.as_timings())
    if reusing:
        timings["prefix_reused_tokens"] = float(reused)
        # A prompt graph (int4) wrote the prompt's positions, the main graph the generated ones: a
        # later prompt that goes on past this one must run those tokens as a prompt, so only the
        # prompt is stored (then reuse gives the logits of a fresh prefill, bitwise).
        prompt_only = backend.capabilities.prompt_graph
        for b, (r, p) in enumerate(zip(rows, prompts, strict=True)):
            held = (list(p) + ([] if prompt_only else r.generated))[: cache.length(b)]
            prefix_cache.store(held, lambda b=b, n=len(held): cache.read_prefix(b, n))
    return [
        GenerationResult(r.text, r.generated, r.finish_reason or "length", len(p), dict(timings))
        for r, p in zip(rows, prompts, strict=True)
    ]


def _prefill_reusing(cache: Any, prompts: Sequence[Sequence[int]], store: KVStore) -> tuple[np.ndarray, int]:
    """Prefill every prompt into slot = its index, starting from the longest stored prefix where
    there is one (copied in, then only the rest is run): the last-position logits ``(B, V)`` and the
    tokens reused. The same logits as ``cache.prefill`` (in-place bundles are causal and
    batch-invariant, bitwise)."""
    found = [store.lookup(p) for p in prompts]
    fresh = [b for b, f in enumerate(found) if f is None]
    reused = [b for b, f in enumerate(found) if f is not None]
    parts: dict[int, np.ndarray] = {}
    if fresh:
        for b, row in zip(fresh, cache.prefill(fresh, [prompts[b] for b in fresh]), strict=True):
            parts[b] = row
    if reused:
        for b in reused:
            n, arrays = found[b]
            cache.write_prefix(b, arrays, n)
        rests = [prompts[b][found[b][0] :] for b in reused]
        for b, row in zip(reused, cache.extend(reused, rests), strict=True):
            parts[b] = row
    return np.stack([parts[b] for b in range(len(prompts))]), sum(found[b][0] for b in reused)


def decode(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    eos_token_id: int | None,
    n_ctx: int,
    detokenize: Callable[[Sequence[int]], str],
    draft: DraftModel | None = None,
    prefix_cache: KVStore | None = None,
    constraint: CompiledConstraint | None = None,
    mask_ahead: bool = True,
    adapters: Sequence[int] | None = None,
) -> list[GenerationResult]:
    """Continue every prompt: greedy / sampled (``num_beams=1``, speculative with
    ``config.prompt_lookup`` or a ``draft`` model) or beam search (never speculative).
    ``adapters``: each prompt's LoRA adapter id (0 = none; not with beam search)."""
    if config.num_beams > 1:
        if any(adapters or ()):
            raise Gpt2EdgeError("beam search runs without LoRA adapters; use num_beams=1 with an adapter")
        if config.ignore_eos:
            eos_token_id = None

        fitted = fit_context(prompts, config, n_ctx)  # refuses empty and overflowing prompts first
        return [
            beam_search(backend, p, config, eos_token_id=eos_token_id, n_ctx=n_ctx, detokenize=detokenize)
            for p in fitted
        ]
    it = iter_decode(
        backend,
        prompts,
        config,
        eos_token_id=eos_token_id,
        n_ctx=n_ctx,
        detokenize=detokenize,
        draft=draft,
        prefix_cache=prefix_cache,
        constraint=constraint,
        mask_ahead=mask_ahead,
        adapters=adapters,
    )
    while True:
        try:
            next(it)
        except StopIteration as done:
            return done.value


Prompt = str | Sequence[int]


class Generator:
    """Text generation from a bundle, torch-free. One Generator serves many threads at once:
    every call owns its KV cache, and the model (one ONNX Runtime session) is shared.

    >>> from gpt2_edge import Generator, GenerationConfig
    >>> gen = Generator.from_bundle("out/bundle", provider="cpu", threads=2)
    >>> gen.generate("ROMEO:", GenerationConfig(max_new_tokens=20))[0].text

    Speculative decoding (same greedy text, more tokens/s where the continuation repeats the
    prompt or a draft model guesses it): ``GenerationConfig(prompt_lookup=8)`` per call, and/or a
    draft model for every call, ``Generator.from_bundle(path, draft="out/small-bundle")``.
    """

    def __init__(self, model: Model) -> None:
        """Generate with ``model`` (``runtime.load_model``); ``from_bundle`` loads one for you."""
        self.model = model
        self.last_result: GenerationResult | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, path: str | Path, provider: str = "cpu", **options: Any) -> Generator:
        """Load and verify a bundle (``runtime.load_model``: ``provider`` cpu, cuda, tensorrt or auto
        for ONNX Runtime, or trt-engine for the bundle's TensorRT engine on this GPU; ``threads``,
        ``verify``, ``draft``, ``draft_tokens``, ``prefix_cache``, ``step_invariant`` and the
        backend's options) and generate with it."""
        return cls(load_model(path, provider, **options))

    # what the model is: read from it, for callers of the Generator
    @property
    def backend(self) -> Backend:
        return self.model.backend

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def eos_token_id(self) -> int | None:
        return self.model.eos_token_id

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    @property
    def draft(self) -> DraftModel | None:
        return self.model.draft

    @property
    def prefix_cache(self) -> KVStore | None:
        """The prefix store (``load_model(prefix_cache=N)``); ``hits`` counts reuse."""
        return self.model.prefix_store

    @property
    def load_s(self) -> float:
        return self.model.load_s

    @property
    def provider(self) -> str:
        return self.model.capabilities.provider

    def compile(self, config: GenerationConfig) -> CompiledConstraint | None:
        """Check ``config`` against this model's vocabulary (``logit_bias`` ids) and compile its
        constraint for this tokenizer (cached), or None without one. ``generate`` and ``stream``
        call it; a caller may call it first to refuse a bad schema before any work."""
        check_logit_bias_vocab(config, self.model.vocab_size)
        if config.constraint is None:
            return None
        return compile_constraint(self.tokenizer, config.constraint, self.model.vocab_size)

    def encode(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids: text is tokenized, a sequence of ints is taken as ids (checked)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        vocab = self.model.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise Gpt2EdgeTypeError(
                    f"a prompt is a string or a list of token ids (ints); got an item {t!r}"
                )
            if not 0 <= t < vocab:
                raise Gpt2EdgeError(f"token id {t} is outside the vocabulary (0..{vocab - 1})")
        return [int(t) for t in ids]

    def _batch(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        if isinstance(prompts, str):
            return [self.encode(prompts)]
        items = list(prompts)
        if not items:
            raise Gpt2EdgeError("no prompts given")
        if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in items):
            return [self.encode(items)]  # one prompt of token ids
        return [self.encode(p) for p in items]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        config: GenerationConfig | None = None,
        adapter: str | Sequence[str | None] | None = None,
    ) -> list[GenerationResult]:
        """Continue one prompt or a batch; one result per prompt. A prompt is text or a list of
        token ids (``[[464, 3290], [40]]`` is a batch of two). ``adapter``: the LoRA adapter (a name
        given to ``load_model(lora=...)``) for every prompt, or one per prompt (None = the base
        model); rows of different adapters decode in one batch."""
        config = config or GenerationConfig()
        constraint = self.compile(config)
        batch = self._batch(prompts)
        return decode(
            self.backend,
            batch,
            config,
            eos_token_id=self.eos_token_id,
            n_ctx=self.n_ctx,
            detokenize=self.tokenizer.decode,
            draft=self.draft,
            prefix_cache=self.prefix_cache,
            constraint=constraint,
            adapters=self._adapter_ids(adapter, len(batch)),
        )

    def _adapter_ids(self, adapter: str | Sequence[str | None] | None, n: int) -> list[int] | None:
        if adapter is None:
            return None
        names = [adapter] * n if isinstance(adapter, str) else list(adapter)
        if len(names) != n:
            raise Gpt2EdgeError(f"{len(names)} adapters given for {n} prompts")
        return [self.model.adapter_id(a) for a in names]

    def stream(
        self, prompt: Prompt, config: GenerationConfig | None = None, adapter: str | None = None
    ) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces while it is decoded.

        The pieces join to exactly ``generate(prompt, config)[0].text``; a multi-byte character
        is never split across pieces. ``self.last_result`` holds the full result of the stream
        that finished last.
        """
        config = config or GenerationConfig()
        if config.num_beams != 1:
            raise Gpt2EdgeError("streaming needs num_beams=1 (beam search only knows its text at the end)")
        if not isinstance(prompt, str) and (
            isinstance(prompt, Sequence) and prompt and not isinstance(prompt[0], (int, np.integer))
        ):
            raise Gpt2EdgeError("stream takes one prompt (text or token ids), not a batch")
        ids = self.encode(prompt)
        if not ids:
            raise Gpt2EdgeError("stream takes one non-empty prompt")
        constraint = self.compile(config)
        it = iter_decode(
            self.backend,
            [ids],
            config,
            eos_token_id=self.eos_token_id,
            n_ctx=self.n_ctx,
            detokenize=self.tokenizer.decode,
            draft=self.draft,
            prefix_cache=self.prefix_cache,
            constraint=constraint,
            adapters=self._adapter_ids(adapter, 1),
        )

        while True:
            try:
                (row,) = next(it)
            except StopIteration as done:
                with self._lock:
                    self.last_result = done.value[0]
                return
            if row.piece:
                yield row.piece
