"""The TensorRT Python calls the engine *build* makes that differ between versions, or need care.

Network flags, the ONNX parser's errors, workspace and TF32 settings, the timing cache and the
serialized plan. The run-time calls (importing TensorRT, its version, the logger, I/O tensors)
are in ``gpt2_edge.runtime.trt.api``, which the builder uses too. Everything else calls
TensorRT's documented API directly, so a test hands in a fake module with the same names
(``tests/engine/engine_fakes.py``). Targets TensorRT 10.x (JetPack 6, x86-64) and 11.x (x86-64): both
build strongly typed networks, the only kind 11 has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def network_flags(trt: Any) -> int:
    """Strongly typed: precision comes from the graph (fp16 tensors, Q/DQ int8). Required for
    that on 10.x; 11.x is always strongly typed and ignores the flag (kept for compatibility),
    so it is set wherever it exists."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


@dataclass(frozen=True)
class ParserIssue:
    """One error of TensorRT's ONNX parser."""

    desc: str
    node_index: int  # -1 = not tied to a node
    node_name: str
    op: str
    code: str


def parser_issues(parser: Any) -> list[ParserIssue]:
    """The parser's errors; node name and operator where this TensorRT reports them (10.x+)."""

    def field(err: Any, name: str, default: Any) -> Any:
        getter = getattr(err, name, None)
        try:
            return getter() if callable(getter) else default
        except Exception:  # an accessor missing from one TensorRT build must not hide the error
            return default

    out = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        out.append(
            ParserIssue(
                desc=str(field(err, "desc", err)),
                node_index=int(field(err, "node", -1)),
                node_name=str(field(err, "node_name", "") or ""),
                op=str(field(err, "node_operator", "") or ""),
                code=str(field(err, "code", "")),
            )
        )
    return out


def set_workspace(trt: Any, config: Any, nbytes: int) -> None:
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(nbytes))


def disable_tf32(trt: Any, config: Any) -> bool:
    """Plain fp32 math for fp32 networks (TF32 is on by default on Ampere and newer and moves
    logits by ~1e-3, enough to flip a greedy token against the CPU); False where the flag is gone."""
    flag = getattr(trt.BuilderFlag, "TF32", None)
    if flag is None:
        return False
    config.clear_flag(flag)
    return True


def attach_timing_cache(config: Any, data: bytes) -> Any:
    """A timing cache from ``data`` (empty = a new one), attached to ``config``; it collects the
    kernel timings of this build, so the next build on this GPU skips measuring them again."""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)  # False: refuse a cache from another GPU or version
    return cache


def serialize_timing_cache(config: Any) -> bytes:
    cache = config.get_timing_cache()
    return bytes(memoryview(cache.serialize())) if cache is not None else b""


def plan_bytes(serialized: Any) -> bytes:
    """``build_serialized_network`` returns an ``IHostMemory`` (buffer protocol)."""
    return bytes(memoryview(serialized))
