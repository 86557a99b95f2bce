"""The TensorRT Python calls the engine *run* needs that differ between versions, or need care.

Importing TensorRT (with an install hint when it is missing), its version, a logger that keeps
warnings and errors, and the engine's I/O tensors by name. Everything else
calls TensorRT's documented API directly on the module ``import_tensorrt`` returns, so a test
hands in a fake module with the same names (``tests/engine/engine_fakes.py``). Targets TensorRT 10.x
(JetPack 6, x86-64) and 11.x (x86-64). The build's calls are in ``gpt2_edge.engine.trt_api``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import Gpt2EdgeError, Gpt2EdgeTypeError


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


def make_logger(trt: Any, verbose: bool = False) -> Any:
    """A logger that keeps every warning and error, so a failed build or load can print them."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            level = str(severity).rsplit(".", 1)[-1]
            if level in ("INTERNAL_ERROR", "ERROR", "WARNING") or verbose:
                self.messages.append((level, str(msg)))

    return _Logger()


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
