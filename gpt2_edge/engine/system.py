"""What this machine has: GPU, driver, CUDA, TensorRT, ONNX Runtime, CPU features. No torch.

Every probe returns None (or an empty value) when the thing is absent, never raises: ``doctor``
reports on any machine, and the engine cache keys use whatever can be known.
"""

from __future__ import annotations

import ctypes
import platform
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from .cuda import Cuda, CudaError, DeviceInfo


def cuda_or_none() -> Cuda | None:
    """The cuda-python runtime wrapper, or None without cuda-python (or a CUDA driver)."""
    try:
        cuda = Cuda()
        cuda.device_count()  # fails without a driver or device
        return cuda
    except (CudaError, Exception):  # cuda-python raises its own types when the driver is absent
        return None


def _nvidia_smi(fields: str) -> list[list[str]]:
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
    rows = _nvidia_smi("name,compute_cap,memory.total")
    if rows and len(rows[0]) >= 3:
        name, cc, mib = rows[0][:3]
        try:
            major, minor = (int(x) for x in cc.split("."))
            return DeviceInfo(name, major, minor, int(float(mib)) * 2**20, 0)
        except ValueError:
            return None
    return None


def driver_version(cuda: Cuda | None = None) -> str | None:
    """The NVIDIA driver's release (``nvidia-smi``) or, failing that, the CUDA version it supports."""
    rows = _nvidia_smi("driver_version")
    if rows and rows[0]:
        return rows[0][0]
    cuda = cuda or cuda_or_none()
    if cuda is not None:
        try:
            return f"CUDA {cuda.driver_version()}"
        except CudaError:
            return None
    return None


def cuda_runtime_version(cuda: Cuda | None = None) -> str | None:
    cuda = cuda or cuda_or_none()
    if cuda is None:
        return None
    try:
        return cuda.runtime_version()
    except CudaError:
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
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-libs", "tensorrt-cu13-libs"):
        try:
            return version(pkg)
        except PackageNotFoundError:
            continue
    for major in (11, 10):
        try:
            lib = ctypes.CDLL(f"libnvinfer.so.{major}")
            return _decode_nvinfer_version(int(lib.getInferLibVersion()))
        except (OSError, AttributeError):
            continue
    return None


def onnxruntime_info() -> dict[str, Any] | None:
    """onnxruntime's version, package (``onnxruntime`` / ``onnxruntime-gpu``) and providers."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    package = None
    for pkg in ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            version(pkg)
            package = pkg
            break
        except PackageNotFoundError:
            continue
    return {
        "version": ort.__version__,
        "package": package,
        "device": ort.get_device(),
        "providers": list(ort.get_available_providers()),
    }


def jetson_model() -> str | None:
    """The Jetson module (``NVIDIA Jetson Orin Nano ...``), or None off a Jetson."""
    for f in (Path("/proc/device-tree/model"), Path("/sys/firmware/devicetree/base/model")):
        try:
            text = f.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
        except OSError:
            continue
        if "jetson" in text.lower() or "nvidia" in text.lower():
            return text
    return None


def l4t_release() -> str | None:
    """``R36 (release), REVISION: 4.0`` from ``/etc/nv_tegra_release`` (JetPack 6 = L4T R36)."""
    try:
        first = Path("/etc/nv_tegra_release").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    m = re.search(r"R(\d+).*REVISION:\s*([\d.]+)", first)
    return f"R{m.group(1)}.{m.group(2)}" if m else first.strip("# ").strip()


# The CPU features that decide which bundle runs fast (ONNX Runtime's MLAS kernels).
SIMD_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "asimd",
    "asimddp",
    "asimdhp",
    "fphp",
    "i8mm",
    "sve",
    "sve2",
    "bf16",
)


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """Model, core count and the SIMD flags above, from ``/proc/cpuinfo`` (Linux)."""
    import os

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return {
        "machine": platform.machine(),
        "model": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "simd": [f for f in SIMD_FLAGS if f in flags],
    }


def memory_total() -> int | None:
    """Physical memory in bytes (on a Jetson, shared by the CPU and the GPU)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
