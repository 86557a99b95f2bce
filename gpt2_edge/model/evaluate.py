"""Perplexity with a sliding window over long text; backend-agnostic (numpy in, numpy out).

Each window holds up to ``max_length`` tokens and advances by ``stride``; only the tokens not
scored by an earlier window count, so every token after the first is scored exactly once with
at least ``max_length - stride`` tokens of left context (the method of the Hugging Face
perplexity guide, without its gap of one unscored token per window when stride = max_length).
Quantized bundles are judged by this same function.

Torch-free but for the checkpoint side (``checkpoint_perplexity``, ``torch_logits_fn``), which
imports torch when called: ``gpt2-edge eval`` of a bundle runs where torch is not installed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import Gpt2EdgeError
from ..progress import Progress
from ..runtime.bundle import Bundle
from ..runtime.sampling import log_softmax
from ..runtime.session import OrtBackend

if TYPE_CHECKING:
    from ..runtime.tokenizer import Tokenizer

LogitsFn = Callable[[np.ndarray], np.ndarray]  # (1, T) int64 -> (1, T, V) float


@dataclass
class PerplexityReport:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, float]:
        return {
            "perplexity": self.perplexity,
            "nll": self.nll,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
        }


def read_text(path: str | Path, min_chars: int = 1) -> str:
    """Read a UTF-8 text file with errors a user can act on."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise Gpt2EdgeError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if len(text) < min_chars:
        raise Gpt2EdgeError(f"{p} has {len(text)} characters; at least {min_chars} are needed")
    return text


def read_tail(path: str | Path, tail: float = 1.0) -> str:
    """The last ``tail`` fraction (0 < tail <= 1, in characters) of a UTF-8 text file; 0.1 is the
    held-out part of the trainer's split (``TrainConfig.val_fraction``)."""
    if not 0 < tail <= 1:
        raise Gpt2EdgeError(f"the tail of the text to evaluate must be in (0, 1], got {tail}")
    text = read_text(path)
    return text[int(len(text) * (1 - tail)) :]


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_target)`` windows: the last ``n_target`` tokens of ``[begin, end)`` are scored.

    The first window scores all of its tokens but the first (which has no context); each later
    window scores the next ``stride`` tokens (at most ``max_length - 1``, so that every scored
    token keeps at least one token of context inside its window).
    """
    if max_length < 2:
        raise Gpt2EdgeError(f"max_length must be >= 2, got {max_length}")
    if not 0 < stride <= max_length:
        raise Gpt2EdgeError(f"stride must be in [1, max_length={max_length}], got {stride}")
    step = min(stride, max_length - 1)
    end = min(max_length, n_tokens)
    out = [(0, end, end - 1)] if end > 1 else []
    while end < n_tokens:
        new_end = min(end + step, n_tokens)
        out.append((max(0, new_end - max_length), new_end, new_end - end))
        end = new_end
    return out


def perplexity(
    logits_fn: LogitsFn,
    ids: Sequence[int],
    max_length: int,
    stride: int | None = None,
    progress: bool = False,
) -> PerplexityReport:
    """Sliding-window perplexity of ``ids`` under ``logits_fn``."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        raise Gpt2EdgeError(f"need at least 2 tokens to measure perplexity, got {len(ids)}")
    stride = stride or max_length // 2
    windows = sliding_windows(len(ids), max_length, stride)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    with Progress(windows, enabled=progress, desc="eval", unit="window") as it:
        for begin, end, n_target in it:
            window = ids[begin:end][None, :]
            logp = log_softmax(np.asarray(logits_fn(window)[0], dtype=np.float64))  # (T, V)
            targets = window[0, -n_target:]
            preds = logp[-n_target - 1 : -1]  # position t predicts token t+1
            total -= float(preds[np.arange(n_target), targets].sum())
            count += n_target
    nll = total / count
    return PerplexityReport(math.exp(nll), nll, count, time.perf_counter() - t0)


def bundle_perplexity(
    bundle_dir: str | Path,
    text: str,
    max_length: int | None = None,
    stride: int | None = None,
    *,
    threads: int | None = None,
    progress: bool = False,
) -> PerplexityReport:
    """Sliding-window perplexity of a bundle on ``text`` (ONNX Runtime, CPU). Torch-free.

    ``max_length`` defaults to the model's context and ``stride`` to half of it.
    """
    bundle = Bundle.load(bundle_dir)
    fn = OrtBackend(bundle, threads=threads).logits
    return _text_perplexity(fn, bundle.tokenizer(), bundle.context_length, text, max_length, stride, progress)


def checkpoint_perplexity(
    model_spec: str | Path | None,
    text: str,
    max_length: int | None = None,
    stride: int | None = None,
    *,
    progress: bool = False,
) -> PerplexityReport:
    """Sliding-window perplexity of a checkpoint (dir, hub id, or None for the shipped model) on
    ``text``, with the PyTorch reference. Imports torch."""
    from .checkpoint import load_checkpoint, load_tokenizer  # imports torch: a bundle's eval must not

    model, tok = load_checkpoint(model_spec), load_tokenizer(model_spec)
    fn = torch_logits_fn(model)
    return _text_perplexity(fn, tok, model.config.n_positions, text, max_length, stride, progress)


def _text_perplexity(
    fn: LogitsFn,
    tokenizer: Tokenizer,
    n_ctx: int,
    text: str,
    max_length: int | None,
    stride: int | None,
    progress: bool,
) -> PerplexityReport:
    max_length = max_length or n_ctx
    if max_length > n_ctx:
        raise Gpt2EdgeError(f"max_length {max_length} exceeds the model's context {n_ctx}")
    return perplexity(fn, tokenizer.encode(text), max_length, stride, progress=progress)


def torch_logits_fn(model: object) -> LogitsFn:
    """Adapter: the reference PyTorch model as a ``LogitsFn``."""
    import torch

    @torch.no_grad()
    def fn(window: np.ndarray) -> np.ndarray:
        logits, _ = model(torch.from_numpy(window))  # type: ignore[operator]
        return logits.float().numpy()

    return fn
