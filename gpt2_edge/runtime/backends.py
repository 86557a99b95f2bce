"""The one place that knows which backend serves which provider.

``load_backend(path, provider)`` gives a ready backend (``types.Backend``) for a bundle: ONNX
Runtime on the CPU, CUDA or TensorRT execution provider (``cpu``, ``cuda``, ``tensorrt``, ``auto``),
the native TensorRT engine built for this GPU (``trt-engine``), or OpenVINO computing a bf16 bundle
in bf16 (``openvino``; ``auto`` picks it for bf16 bundles where it can). ``runtime.load_model`` (what
``Generator``, the server, ``gpt2-edge bench`` and the CLI load through) and ``DraftModel`` ask it;
none of them names a backend class.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..errors import Gpt2EdgeError
from .bundle import Bundle
from .openvino import system as ov_system
from .openvino.backend import PROVIDER as OPENVINO_PROVIDER
from .openvino.backend import OvBackend, check_bundle  # openvino loads when a backend is made
from .session import OrtBackend
from .trt.backend import TrtEngineBackend  # tensorrt and cuda-python load when one is made
from .types import Backend

ORT_PROVIDERS = ("cpu", "cuda", "tensorrt", "auto")  # ONNX Runtime execution providers
ENGINE_PROVIDER = "trt-engine"  # a prebuilt TensorRT engine (`gpt2-edge build-engine`)
PROVIDERS = (*ORT_PROVIDERS, ENGINE_PROVIDER, OPENVINO_PROVIDER)


def load_backend(
    path: str | Path | Bundle,
    provider: str = "cpu",
    *,
    threads: int | None = None,
    verify: bool = True,
    **options: Any,
) -> Backend:
    """Load and verify the bundle at ``path`` and return the backend that runs it on ``provider``.

    ``provider``: ``cpu`` | ``cuda`` | ``tensorrt`` | ``auto`` (ONNX Runtime; ``auto`` takes the
    best installed, and OpenVINO for a bf16 bundle where it is installed and the CPU has bf16),
    ``openvino`` (a bf16 bundle in bf16 on this CPU), or ``trt-engine`` (the bundle's TensorRT
    engine for this GPU; ``path`` may also be an engine directory). ``threads``: ONNX Runtime's (or
    OpenVINO's) inference threads (ignored by the engine). ``options`` go to the backend:
    ``OrtBackend``'s ``session_config``, ``trt_fp16``, ``trt_cache_dir``, ``trt_workspace_mib``,
    ``trt_max_batch``, ``trt_max_context``; the engine's ``lane_timeout_s`` (the openvino provider
    takes none). Every backend declares ``bundle``, ``n_ctx`` and ``capabilities``
    (``types.Backend``). ``path`` may be a ``Bundle`` already loaded (ONNX Runtime providers).
    """
    if provider == ENGINE_PROVIDER:
        return TrtEngineBackend(path.path if isinstance(path, Bundle) else path, verify=verify, **options)
    if provider not in (*ORT_PROVIDERS, OPENVINO_PROVIDER):
        raise Gpt2EdgeError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
    bundle = path if isinstance(path, Bundle) else Bundle.load(path, verify=verify)
    if bundle.precision == "bf16":
        why_not = None if provider == OPENVINO_PROVIDER else bf16_fallback_reason(provider)
        if why_not is None:
            if options:
                raise Gpt2EdgeError(f"the openvino provider takes no options: {', '.join(sorted(options))}")
            return OvBackend(bundle, threads=threads)
        warnings.warn(
            f"{bundle.path} is bf16: {why_not}, so ONNX Runtime runs it, computing in fp32 from the bf16 "
            "weights (as fast as the fp32 bundle, not faster)",
            stacklevel=2,
        )
    elif provider == OPENVINO_PROVIDER:
        check_bundle(bundle)  # refuses: it is not bf16
    return OrtBackend(bundle, provider=provider, threads=threads, **options)


def bf16_fallback_reason(provider: str) -> str | None:
    """Why ``provider`` does not run a bf16 bundle in bf16 (None: ``auto`` picks OpenVINO here)."""
    if provider != "auto":
        return f"--provider {provider} is ONNX Runtime, which has no bf16 kernels (--provider openvino has)"
    if not ov_system.openvino_installed():
        return f"OpenVINO is not installed ({ov_system.INSTALL_HINT})"
    core = ov_system.import_openvino().Core()
    if not ov_system.cpu_has_bf16(core):
        return "this CPU has no bf16 arithmetic (AVX512-BF16 or AMX)"
    return None
