"""Which GPU and which TensorRT this process sees: what an engine, and ONNX Runtime's TensorRT
provider cache, are keyed by. No torch; ``tensorrt`` and cuda-python are optional.

Every probe returns None when the thing is absent, never raises, so cache keys use whatever can
be known. The rest of the machine survey (driver, CUDA runtime, ONNX Runtime, Jetson, CPU
features, memory) is ``gpt2_edge.engine.system``, for ``gpt2-edge doctor``.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from .cuda import Cuda, CudaError, DeviceInfo


def cuda_or_none() -> Cuda | None:
    """The cuda-python runtime wrapper, or None without cuda-python (or a CUDA driver)."""
    try:
        cuda = Cuda()
        cuda.device_count()  # fails without a driver or device
        return cuda
    except (CudaError, Exception):  # cuda-python raises its own types when the driver is absent
        return None


def nvidia_smi(fields: str) -> list[list[str]]:
    """``nvidia-smi --query-gpu=FIELDS`` as rows of strings; [] without it or on any failure."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]


def current_gpu(cuda: Cuda | None = None) -> DeviceInfo | None:
    """Device 0 as CUDA numbers it (``CUDA_VISIBLE_DEVICES`` applies); cuda-python first, then
    ``nvidia-smi`` (which sees every device: it is asked for the first)."""
    cuda = cuda or cuda_or_none()
    if cuda is not None:
        try:
            if cuda.device_count() > 0:
                return cuda.device(0)
        except CudaError:
            pass
    rows = nvidia_smi("name,compute_cap,memory.total")
    if rows and len(rows[0]) >= 3:
        name, cc, mib = rows[0][:3]
        try:
            major, minor = (int(x) for x in cc.split("."))
            return DeviceInfo(name, major, minor, int(float(mib)) * 2**20, 0)
        except ValueError:
            return None
    return None


def _decode_nvinfer_version(v: int) -> str:
    # TensorRT 10+ encodes major * 10000 + minor * 100 + patch; 8.x used major * 1000 + ...
    if v >= 100000:
        return f"{v // 10000}.{(v // 100) % 100}.{v % 100}"
    return f"{v // 1000}.{(v // 100) % 10}.{v % 100}"


@lru_cache(maxsize=1)
def tensorrt_version() -> str | None:
    """The TensorRT this process would use: the Python package, else its pip libraries, else the
    ``libnvinfer`` ONNX Runtime's TensorRT provider loads (asked directly for its version)."""
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        pass
    for pkg in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-libs", "tensorrt-cu13-libs"):
        try:
            return package_version(pkg)
        except PackageNotFoundError:
            continue
    for major in (11, 10):
        try:
            lib = ctypes.CDLL(f"libnvinfer.so.{major}")
            return _decode_nvinfer_version(int(lib.getInferLibVersion()))
        except (OSError, AttributeError):
            continue
    return None
