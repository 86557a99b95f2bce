"""What this machine has, for ``gpt2-edge doctor``: NVIDIA driver, CUDA runtime, ONNX Runtime,
Jetson module and L4T release, CPU features, memory. No torch.

The GPU and TensorRT probes that engines and cache keys need at run time (``current_gpu``,
``tensorrt_version``, ``cuda_or_none``) are ``gpt2_edge.runtime.trt.system``. Every probe returns
None (or an empty value) when the thing is absent, never raises: ``doctor`` reports on any machine.
"""

from __future__ import annotations

import os
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..runtime.trt.cuda import Cuda, CudaError
from ..runtime.trt.system import cuda_or_none, nvidia_smi


def driver_version(cuda: Cuda | None = None) -> str | None:
    """The NVIDIA driver's release (``nvidia-smi``) or, failing that, the CUDA version it supports."""
    rows = nvidia_smi("driver_version")
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


def onnxruntime_info() -> dict[str, Any] | None:
    """onnxruntime's version, package (``onnxruntime`` / ``onnxruntime-gpu``) and providers."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
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
