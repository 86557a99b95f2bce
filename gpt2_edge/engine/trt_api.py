"""The TensorRT Python calls that differ between versions, or need care, in one small module.

Everything else calls TensorRT's documented API directly on the module this returns, so a test
hands in a fake module with the same names (``tests/engine_fakes.py``). Targets TensorRT 10.x
(JetPack 6, x86-64) and 11.x (x86-64): both build strongly typed networks, the only kind 11 has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import Gpt2EdgeError, Gpt2EdgeTypeError


class TensorRTMissingError(Gpt2EdgeError, ImportError):
    """TensorRT's Python package is not installed."""


def import_tensorrt() -> Any:
    try:
        import tensorrt

        return tensorrt
    except ImportError:
        raise TensorRTMissingError(
            "TensorRT's Python package is not installed: `pip install tensorrt` (x86-64, TensorRT 10 or "
            "11); on a Jetson it comes with JetPack 6 (`sudo apt install python3-libnvinfer`), and a "
            "virtual environment needs `--system-site-packages` to see it"
        ) from None


def version(trt: Any) -> str:
    return str(trt.__version__)


def major(version_string: str) -> int:
    try:
        return int(version_string.split(".")[0])
    except ValueError:
        return 0


def network_flags(trt: Any) -> int:
    """Strongly typed: precision comes from the graph (fp16 tensors, Q/DQ int8). Required for
    that on 10.x; 11.x is always strongly typed and ignores the flag (kept for compatibility),
    so it is set wherever it exists."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


def make_logger(trt: Any, verbose: bool = False) -> Any:
    """A logger that keeps every warning and error, so a failed build can print them."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            level = str(severity).rsplit(".", 1)[-1]
            if level in ("INTERNAL_ERROR", "ERROR", "WARNING") or verbose:
                self.messages.append((level, str(msg)))

    return _Logger()


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


_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


def np_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of a TensorRT ``DataType`` (the I/O tensors this kit uses have one)."""
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in _DTYPES:
        raise Gpt2EdgeTypeError(f"TensorRT data type {name} has no numpy equivalent here")
    return np.dtype(_DTYPES[name])


@dataclass(frozen=True)
class IoTensor:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 = dynamic


def io_tensors(trt: Any, engine: Any) -> list[IoTensor]:
    """The engine's inputs and outputs, by name (TensorRT 10's name-based I/O API)."""
    out = []
    for i in range(int(engine.num_io_tensors)):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = np_dtype(engine.get_tensor_dtype(name))
        out.append(IoTensor(name, is_input, dtype, tuple(int(d) for d in engine.get_tensor_shape(name))))
    return out


def profile_shapes(engine: Any, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) of input ``name`` in optimization profile ``profile``."""
    return tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, profile))
