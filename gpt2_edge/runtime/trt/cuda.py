"""The few CUDA runtime calls the TensorRT engine path makes, through cuda-python, behind one class.

cuda-python 12.8 and newer (and 13.x, which removed the old name) expose the runtime API as
``cuda.bindings.runtime``; older 12.x releases as ``cuda.cudart``. Both return a tuple
``(status, *values)`` from every call; ``Cuda`` checks the status and raises ``CudaError``
naming the call, so the callers read like plain Python. Pointers are plain ``int`` device
addresses. Tests substitute a fake with the same methods (``tests/engine/engine_fakes.py``), and
``scripts/device-smoke.py`` runs this class on a real GPU. No torch.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import Gpt2EdgeError


class CudaError(Gpt2EdgeError, RuntimeError):
    """A CUDA runtime call failed, or cuda-python is not installed."""


@dataclass(frozen=True)
class DeviceInfo:
    """One GPU as the CUDA runtime reports it."""

    name: str
    major: int
    minor: int
    total_memory: int  # bytes
    index: int = 0

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"


def import_runtime() -> Any:
    """cuda-python's runtime module under either of its names (13.x dropped ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # cuda-python < 12.8

        return cudart
    except ImportError:
        raise CudaError(
            "cuda-python is not installed: `pip install cuda-python` (its major version must match your "
            "CUDA: 12.x for CUDA 12, as on JetPack 6; 13.x for CUDA 13)"
        ) from None


def _version_string(v: int) -> str:
    """CUDA encodes versions as 1000 * major + 10 * minor (12040 = 12.4)."""
    return f"{v // 1000}.{(v % 1000) // 10}"


class Cuda:
    """Checked wrappers over the CUDA runtime calls the engine backend (and the builder) need."""

    def __init__(self, runtime: Any = None) -> None:
        self.rt = runtime if runtime is not None else import_runtime()
        self._success = self.rt.cudaError_t.cudaSuccess
        kinds = self.rt.cudaMemcpyKind
        self._h2d = kinds.cudaMemcpyHostToDevice
        self._d2h = kinds.cudaMemcpyDeviceToHost
        self._d2d = kinds.cudaMemcpyDeviceToDevice

    def _call(self, name: str, *args: Any) -> Any:
        result = getattr(self.rt, name)(*args)
        status, values = result[0], result[1:]
        if status != self._success:
            raise CudaError(f"{name} failed: {self._describe(status)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def _describe(self, status: Any) -> str:
        try:
            text = self.rt.cudaGetErrorString(status)[-1]
            text = text.decode() if isinstance(text, bytes) else str(text)
        except Exception:  # a failing error lookup must not hide the error itself
            text = ""
        return f"{status} {text}".strip()

    # devices ---------------------------------------------------------------------------------
    def device_count(self) -> int:
        return int(self._call("cudaGetDeviceCount"))

    def device(self, index: int = 0) -> DeviceInfo:
        prop = self._call("cudaGetDeviceProperties", index)
        name = prop.name
        if isinstance(name, bytes):
            name = name.split(b"\0", 1)[0].decode(errors="replace")
        return DeviceInfo(
            str(name).strip(), int(prop.major), int(prop.minor), int(prop.totalGlobalMem), index
        )

    def set_device(self, index: int) -> None:
        self._call("cudaSetDevice", index)

    def driver_version(self) -> str:
        """The newest CUDA version the installed driver supports (``12.4``)."""
        return _version_string(int(self._call("cudaDriverGetVersion")))

    def runtime_version(self) -> str:
        return _version_string(int(self._call("cudaRuntimeGetVersion")))

    def mem_info(self) -> tuple[int, int]:
        """Free and total device memory in bytes."""
        free, total = self._call("cudaMemGetInfo")
        return int(free), int(total)

    # memory ----------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        """Device memory; at least one byte, so an empty tensor still gets a valid address."""
        return int(self._call("cudaMalloc", max(int(nbytes), 1)))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, int]:
        """A page-locked host array (copies from and to it are truly asynchronous) and its pointer,
        for ``free_pinned``."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = max(count * dtype.itemsize, 1)
        ptr = int(self._call("cudaMallocHost", nbytes))
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        array = np.frombuffer(raw, dtype=np.uint8, count=count * dtype.itemsize).view(dtype).reshape(shape)
        return array, ptr

    def free_pinned(self, ptr: int) -> None:
        self._call("cudaFreeHost", ptr)

    # streams ---------------------------------------------------------------------------------
    def stream(self) -> Any:
        return self._call("cudaStreamCreate")

    def destroy_stream(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", stream)

    def synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", stream)

    def handle(self, stream: Any) -> int:
        """The stream's address as an int (what TensorRT's ``execute_async_v3`` takes)."""
        try:
            from cuda.bindings.utils import get_cuda_native_handle  # int(obj) is deprecated there

            return int(get_cuda_native_handle(stream))
        except ImportError:
            return int(stream)

    # copies (all on ``stream``; the host array must stay alive until the stream is synchronized) --
    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        if not src.flags.c_contiguous:
            raise CudaError("htod needs a C-contiguous host array")
        if src.nbytes:
            self._call("cudaMemcpyAsync", dst, src.ctypes.data, src.nbytes, self._h2d, stream)

    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        if not dst.flags.c_contiguous:
            raise CudaError("dtoh needs a C-contiguous host array")
        if dst.nbytes:
            self._call("cudaMemcpyAsync", dst.ctypes.data, src, dst.nbytes, self._d2h, stream)

    def dtod(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        if nbytes:
            self._call("cudaMemcpyAsync", dst, src, nbytes, self._d2d, stream)

    def dtoh_rows(self, dst: np.ndarray, src: int, src_pitch: int, stream: Any) -> None:
        """Rows of ``dst`` (``dst.shape[0]`` rows of ``dst[0].nbytes``) from device rows
        ``src_pitch`` bytes apart: one strided copy (the last position's logits of each row)."""
        if not dst.flags.c_contiguous:
            raise CudaError("dtoh_rows needs a C-contiguous host array")
        rows = dst.shape[0]
        if rows == 0 or dst.nbytes == 0:
            return
        width = dst.nbytes // rows
        self._call(
            "cudaMemcpy2DAsync", dst.ctypes.data, width, src, src_pitch, width, rows, self._d2h, stream
        )

    def memset(self, ptr: int, value: int, nbytes: int, stream: Any) -> None:
        if nbytes:
            self._call("cudaMemsetAsync", ptr, value, nbytes, stream)
