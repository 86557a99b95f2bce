"""Types the decode loops (``generator``, ``beam``), the KV caches and the backends share.

A **backend** owns the weights (one ONNX Runtime session, one TensorRT engine or the PyTorch
reference) and is safe to share between threads. A **KV cache** belongs to one caller (a
``generate`` call, or the server's scheduler): ``backend.new_cache(n_slots, capacity)`` gives one
with ``n_slots`` independent sequences of up to ``capacity`` tokens each. Every batch row of the
model is one slot; a slot is prefilled, decoded one token per step together with the other
active slots, and released, so sequences join and leave a running batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import Gpt2EdgeError
from .sampling import GenerationConfig

if TYPE_CHECKING:
    from .bundle import Bundle


class KVCache(Protocol):
    """Per-sequence state of one caller; never shared between threads."""

    n_slots: int
    capacity: int  # tokens one slot can hold
    # ``verify`` and ``truncate`` work (the in-place cache); a cache without the attribute, or with
    # it False (the concatenating one), refuses them and speculative decoding runs plain steps.
    can_verify: bool

    def length(self, slot: int) -> int:
        """Tokens held by ``slot`` (0 = free)."""
        ...

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Run each prompt into its empty slot; the next-token logits ``(len(slots), V)``."""
        ...

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Append one token to each of ``slots`` (the others wait); logits ``(len(slots), V)``."""
        ...

    def extend(self, slots: Sequence[int], chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """Append a chunk of tokens to each of ``slots``, which hold sequences already (the others
        wait): the logits of each slot's last new position ``(len(slots), V)``. Prefilling a prompt
        as ``prefill`` of its first chunk and ``extend`` of the rest gives the logits of a
        one-shot prefill (the server's chunked prefill)."""
        ...

    def verify(self, slots: Sequence[int], chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """Append a chunk to each of ``slots`` as ``extend`` does, and return the logits at every new
        position ``(len(slots), S, V)``, ``S`` the longest chunk (speculative decoding's one pass
        over ``[pending token, *drafted tokens]``)."""
        ...

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``slot`` (roll back rejected drafted tokens)."""
        ...

    def release(self, slot: int) -> None:
        """Forget ``slot``'s sequence; the slot can be prefilled again."""
        ...

    def reorder(self, sources: Sequence[int]) -> None:
        """Slot ``i`` takes a copy of slot ``sources[i]``'s sequence, for ``i < len(sources)``
        (beam search)."""
        ...


def can_verify(cache: object) -> bool:
    """Whether ``cache`` takes ``verify`` and ``truncate`` (speculative decoding)."""
    return bool(getattr(cache, "can_verify", False))


def is_resizable(cache: object) -> bool:
    """Whether ``cache``'s memory can follow its work (the in-place one): ``reserve(capacity,
    n_slots=None, keep=None)`` reallocates it to other row and token counts (row ``r`` keeps its
    first ``keep[r]`` positions), ``copy_prefix(source, slot, length)`` starts a free slot from
    positions another slot still holds (the server's prefix cache), ``bytes_per_token`` is one
    position of one slot, every layer's K and V."""
    return callable(getattr(cache, "reserve", None)) and callable(getattr(cache, "copy_prefix", None))


@dataclass(frozen=True)
class Capabilities:
    """What a backend is, declared by the backend itself: callers (``Generator``, the server, bench)
    read these fields and never probe a backend's attributes."""

    provider: str  # cpu | cuda | tensorrt (ONNX Runtime), trt-engine (native TensorRT), torch (reference)
    device: str = "cpu"  # where its KV cache lives: cpu | cuda
    # Its caches take ``verify`` and ``truncate`` (the in-place cache): speculative decoding's rollback.
    can_roll_back: bool = False
    # A position's logits are bitwise the same decoded alone, verified in a chunk or beside other
    # rows' chunks (``OrtBackend(step_invariant=True)``).
    step_invariant: bool = False
    # Why rows decoded together could change each other's tokens (then the server decodes one
    # sequence at a time); None: they cannot, or nobody measured it on this device.
    batch_variance: str | None = None
    # The LoRA adapters it serves at run time, by name; adapter id = position + 1 (0 = none).
    adapters: tuple[str, ...] = ()
    # Prompt chunks run through a second graph (int4 bundles' int8 prompt graph, quantize/int4.py),
    # generated tokens through the main one: a prompt position's logits are not a generated one's.
    prompt_graph: bool = False


class Backend(Protocol):
    """What the decode loops need from a model: shareable, stateless between calls. Implemented by
    ``session.OrtBackend``, ``trt.backend.TrtEngineBackend`` and the PyTorch reference."""

    n_ctx: int  # tokens one sequence can hold (the model's context, or less for an engine)
    capabilities: Capabilities
    bundle: Bundle | None  # the bundle it runs (None: not read from one, as the PyTorch reference)

    def new_cache(self, n_slots: int, capacity: int) -> KVCache: ...

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits ``(B, T, V)`` from an empty cache (perplexity, prompt scoring)."""
        ...


class ContextOverflowError(Gpt2EdgeError):
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
        raise Gpt2EdgeError("no prompts given")
    room = n_ctx - config.max_new_tokens
    out = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise Gpt2EdgeError(f"prompt {i} is empty (0 tokens)")
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


def step_timings(prefill_s: float, decode_s: float, steps: int) -> dict[str, float]:
    """Prefill (= time to first token) and per-step decode time; the first token comes from prefill."""
    decode_steps = max(steps - 1, 0)
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "ms_per_token": 1000 * decode_s / decode_steps if decode_steps else 0.0,
        "steps": float(steps),
    }


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
