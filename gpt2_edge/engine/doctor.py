"""``gpt2-edge doctor``: what this machine can run, and which bundle and provider to use here.

Facts first (ONNX Runtime build and providers; GPU, driver, CUDA, TensorRT; Jetson module;
CPU features and memory), then one recommendation derived from them by ``recommend`` alone, so
the rule is unit-tested on facts from machines this project does not have. No torch.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..runtime.trt import system as trt_system
from . import system

JETSON_SMALL_MEMORY = 9 * 2**30  # boards with 8 GB or less share it between CPU and GPU
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


@dataclass
class Facts:
    python: str
    platform: str
    gpt2_edge: str
    onnxruntime: dict[str, Any] | None
    gpu: dict[str, Any] | None
    nvidia_driver: str | None
    cuda_runtime: str | None
    cuda_python: str | None
    tensorrt: str | None
    jetson: dict[str, Any] | None
    cpu: dict[str, Any]
    memory_bytes: int | None


@dataclass
class Recommendation:
    provider: str  # cpu | cuda | tensorrt | trt-engine
    precision: str  # the bundle to make
    target: str  # the export target
    why: str
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def gather() -> Facts:
    """Probe this machine (each probe tolerates a missing library or device)."""
    cuda = trt_system.cuda_or_none()
    gpu = trt_system.current_gpu(cuda)
    jetson = system.jetson_model()
    return Facts(
        python=sys.version.split()[0],
        platform=f"{platform.system()} {platform.release()} {platform.machine()}",
        gpt2_edge=_version("gpt2-edge") or "unknown",
        onnxruntime=system.onnxruntime_info(),
        gpu=None
        if gpu is None
        else {
            "name": gpu.name,
            "compute_capability": gpu.compute_capability,
            "memory_bytes": gpu.total_memory,
        },
        nvidia_driver=system.driver_version(cuda),
        cuda_runtime=system.cuda_runtime_version(cuda),
        cuda_python=_version("cuda-python") or _version("cuda-bindings"),
        tensorrt=trt_system.tensorrt_version(),
        jetson=None if jetson is None else {"model": jetson, "l4t": system.l4t_release()},
        cpu=system.cpu_info(),
        memory_bytes=system.memory_total(),
    )


def recommend(f: Facts) -> Recommendation:
    """The provider and bundle to use, from the facts alone."""
    providers = (f.onnxruntime or {}).get("providers", [])
    small = f.jetson is not None and (f.memory_bytes or 0) <= JETSON_SMALL_MEMORY
    build = "gpt2-edge build-engine out/fp16"
    notes: list[str] = []
    if small:
        build += " --max-batch 2 --max-context 512 --workspace-mib 512"
        notes.append(
            "8 GB or less shared by CPU and GPU: keep the engine's shapes small (above), close other GPU "
            "programs while building, and prefer fp16 or int8-qdq bundles (half or a quarter of fp32's "
            "weights)"
        )
    export = [
        "gpt2-edge export MODEL --target tensorrt -o out/fp32",
        "gpt2-edge quantize out/fp32 --precision fp16 --eval HELD_OUT.txt -o out/fp16",
    ]
    if f.gpu is not None:
        cc = float(f.gpu["compute_capability"])
        if cc >= 7.5:
            notes.append(
                "int8-qdq bundles (`--precision int8-qdq --calib TEXT`) run on this GPU's int8 tensor cores; "
                "use one where it passes its accuracy gate"
            )
        if f.tensorrt and f.cuda_python:
            return Recommendation(
                "trt-engine",
                "fp16",
                "tensorrt",
                f"TensorRT {f.tensorrt} and cuda-python are installed: a native engine built on this "
                f"{f.gpu['name']} runs without ONNX Runtime",
                [*export, build, "Generator.from_bundle('out/fp16', provider='trt-engine')"],
                notes,
            )
        if "TensorrtExecutionProvider" in providers and f.tensorrt:
            return Recommendation(
                "tensorrt",
                "fp16",
                "tensorrt",
                "onnxruntime-gpu with TensorRT: ONNX Runtime builds and caches the engine on first use",
                [*export, "gpt2-edge generate out/fp16 --provider tensorrt --prompt ..."],
                [*notes, "install cuda-python too for the native engine (`gpt2-edge build-engine`)"],
            )
        if "CUDAExecutionProvider" in providers:
            return Recommendation(
                "cuda",
                "fp16",
                "tensorrt",
                "onnxruntime-gpu without TensorRT: the CUDA provider (concatenating KV cache)",
                [*export, "gpt2-edge generate out/fp16 --provider cuda --prompt ..."],
                [*notes, "install TensorRT (and cuda-python) for the faster TensorRT paths"],
            )
        notes.append(
            f"{f.gpu['name']} is idle: install onnxruntime-gpu (instead of onnxruntime), or tensorrt + "
            "cuda-python, to use it"
        )
    simd = set(f.cpu.get("simd", []))
    if simd & set(INT8_CPU_FLAGS) or "avx2" in simd:
        fast = sorted(simd & set(INT8_CPU_FLAGS)) or ["avx2"]
        return Recommendation(
            "cpu",
            "int4",
            "ort",
            f"ONNX Runtime's CPU provider; this CPU has {', '.join(fast)} for the quantized kernels: int4 "
            "decodes fastest within its gate, int8-dynamic where accuracy matters most "
            "(docs/measured.md: speed and perplexity per precision)",
            [
                "gpt2-edge export MODEL -o out/fp32",
                "gpt2-edge quantize out/fp32 --precision int4 --eval HELD_OUT.txt -o out/int4",
                "gpt2-edge generate out/int4 --prompt ...",
            ],
            notes,
        )
    return Recommendation(
        "cpu",
        "fp32",
        "ort",
        "ONNX Runtime's CPU provider; no int8 dot-product instructions here, so fp32 is the safe choice",
        ["gpt2-edge export MODEL -o out/fp32", "gpt2-edge generate out/fp32 --prompt ..."],
        notes,
    )


def report(f: Facts, r: Recommendation) -> dict[str, Any]:
    return {"facts": asdict(f), "recommendation": asdict(r)}


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "?"


def render(f: Facts, r: Recommendation) -> str:
    """The human-readable report."""
    ort = f.onnxruntime
    rows = [
        ("gpt2-edge", f"{f.gpt2_edge} (Python {f.python}, {f.platform})"),
        (
            "onnxruntime",
            f"{ort['version']} ({ort['package']}, {ort['device']}): {', '.join(ort['providers'])}"
            if ort
            else "not installed",
        ),
        (
            "GPU",
            f"{f.gpu['name']}, compute capability {f.gpu['compute_capability']}, "
            f"{_gib(f.gpu['memory_bytes'])}"
            if f.gpu
            else "none found",
        ),
        ("NVIDIA driver", f.nvidia_driver or "-"),
        ("CUDA runtime", f.cuda_runtime or "-"),
        ("cuda-python", f.cuda_python or "not installed"),
        ("TensorRT", f.tensorrt or "not installed"),
    ]
    if f.jetson:
        rows.append(("Jetson", f"{f.jetson['model']} (L4T {f.jetson['l4t'] or '?'})"))
    cpu = f.cpu
    rows.append(("CPU", f"{cpu['model']} ({cpu['machine']}, {cpu['cores']} logical cores)"))
    rows.append(("CPU SIMD", ", ".join(cpu["simd"]) or "none of the ones that matter"))
    rows.append(("memory", _gib(f.memory_bytes)))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [
        "",
        f"use here: provider {r.provider} with the {r.precision} bundle ({r.target} target)",
        f"  why: {r.why}",
    ]
    lines += [f"  $ {c}" for c in r.commands]
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)
