"""The shapes a TensorRT engine accepts: limits, per-input ranges and optimization profiles.

Both sides use them: the builder (``gpt2_edge.engine.builder``) gives TensorRT the profiles, the
engine manifest records them, the engine backend picks one per step, and ONNX Runtime's TensorRT
provider gets one range per input (``ort_profile_options``).

The decoder's past grows every step, so every dynamic input gets an explicit range: batch
1..max_batch, new tokens 1..max_context, past 0..max_context-1, total 1..max_context. By default
each *lane* has two profiles over those ranges, one tuned (``opt``) for prefill chunks and one for
single-token decode. TensorRT lets each execution context in concurrent use hold a different
profile only, so a lane is one context: ``--lanes N`` caches decode at the same time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ... import contract
from .errors import EngineError

PREFILL_CHUNK = 256  # prefill profile's opt length; the backend feeds longer prompts in chunks of it
DEFAULT_MAX_BATCH = 8


@dataclass(frozen=True)
class Limits:
    """The shapes an engine accepts (and ONNX Runtime's TensorRT provider is told about)."""

    max_batch: int = DEFAULT_MAX_BATCH  # sequences decoded together (server slots, beams)
    max_context: int | None = None  # tokens per sequence; None = the model's context
    opt_batch: int = 1  # the batch TensorRT tunes its kernels for
    lanes: int = 1  # caches that can run at the same time (one execution context each)
    split_phases: bool = True  # separate prefill and decode profiles per lane

    def resolve(self, context_length: int) -> Limits:
        """Fill ``max_context`` and check every field against the model."""
        L = context_length if self.max_context is None else self.max_context
        for name, value, low in (("max_batch", self.max_batch, 1), ("lanes", self.lanes, 1)):
            if not isinstance(value, int) or value < low:
                raise EngineError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(L, int) or not 2 <= L <= context_length:
            raise EngineError(f"max_context must be in 2..{context_length} (the model's context), got {L!r}")
        if not isinstance(self.opt_batch, int) or not 1 <= self.opt_batch <= self.max_batch:
            raise EngineError(f"opt_batch must be in 1..max_batch ({self.max_batch}), got {self.opt_batch!r}")
        return Limits(self.max_batch, L, self.opt_batch, self.lanes, self.split_phases)


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def admits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max, strict=True)
        )

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict[str, list[int]]) -> ShapeRange:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


@dataclass(frozen=True)
class Profile:
    """One optimization profile: a shape range for every input."""

    phase: str  # "prefill", "decode" or "any"
    lane: int
    shapes: dict[str, ShapeRange]

    def admits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return all(self.shapes[n].admits(s) for n, s in shapes.items())

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "lane": self.lane,
            "shapes": {n: r.as_dict() for n, r in self.shapes.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(d["phase"], int(d["lane"]), {n: ShapeRange.from_dict(r) for n, r in d["shapes"].items()})


def _dim_ranges(limits: Limits, phase: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each symbolic dim of the contract, for one phase."""
    L = limits.max_context
    assert L is not None, "resolve() the limits first"
    b = (1, limits.opt_batch, limits.max_batch)
    if phase == "decode":  # one new token after a past of any length: the hot loop
        past_opt = L // 2
        return {
            contract.BATCH: b,
            contract.SEQ: (1, 1, 1),
            contract.PAST: (0, past_opt, L - 1),
            contract.TOTAL: (1, past_opt + 1, L),
        }
    chunk = min(PREFILL_CHUNK, L)
    if phase == "prefill":  # a prompt (or a chunk of one) after a past of any length, opt = a chunk
        return {
            contract.BATCH: b,
            contract.SEQ: (1, chunk, L),
            contract.PAST: (0, 0, L - 1),
            contract.TOTAL: (1, chunk, L),
        }
    # one range for both (ONNX Runtime's provider, or --single-profile): tuned for decode
    return {
        contract.BATCH: b,
        contract.SEQ: (1, 1, L),
        contract.PAST: (0, L // 2, L - 1),
        contract.TOTAL: (1, L // 2 + 1, L),
    }


def shape_ranges(
    inputs: list[contract.TensorSpec], limits: Limits, phase: str = "any"
) -> dict[str, ShapeRange]:
    """Each input's range from its symbolic dims (read from the bundle's ``io``, never assumed)."""
    dims = _dim_ranges(limits, phase)
    out = {}
    for spec in inputs:
        lo, opt, hi = [], [], []
        for d in spec.shape:
            if isinstance(d, int):
                r = (d, d, d)
            elif d in dims:
                r = dims[d]
            else:
                raise EngineError(
                    f"input {spec.name} has a dimension {d!r} this builder has no range for (the contract's "
                    f"are {', '.join(dims)}); is the bundle's graph from another exporter?"
                )
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        out[spec.name] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
    return out


def decoder_profiles(inputs: list[contract.TensorSpec], limits: Limits) -> list[Profile]:
    """The engine's profiles: per lane, prefill + decode (or one range with ``split_phases=False``)."""
    phases = ("prefill", "decode") if limits.split_phases else ("any",)
    return [
        Profile(phase, lane, shape_ranges(inputs, limits, phase))
        for lane in range(limits.lanes)
        for phase in phases
    ]


def ort_profile_options(ranges: dict[str, ShapeRange]) -> dict[str, str]:
    """ONNX Runtime's ``trt_profile_{min,opt,max}_shapes``: ``name:1x12x0x64,name2:...``."""

    def fmt(pick: Callable[[ShapeRange], tuple[int, ...]]) -> str:
        return ",".join(f"{n}:{'x'.join(str(d) for d in pick(r))}" for n, r in ranges.items())

    return {
        "trt_profile_min_shapes": fmt(lambda r: r.min),
        "trt_profile_opt_shapes": fmt(lambda r: r.opt),
        "trt_profile_max_shapes": fmt(lambda r: r.max),
    }
