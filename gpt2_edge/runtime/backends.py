"""The one place that knows which backend serves which provider.

``load_backend(path, provider)`` gives a ready backend (``types.Backend``) for a bundle: ONNX
Runtime on the CPU, CUDA or TensorRT execution provider (``cpu``, ``cuda``, ``tensorrt``, ``auto``),
or the native TensorRT engine built for this GPU (``trt-engine``). ``runtime.load_model`` (what
``Generator``, the server, ``gpt2-edge bench`` and the CLI load through) and ``DraftModel`` ask it;
none of them names a backend class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import Gpt2EdgeError
from .bundle import Bundle
from .session import OrtBackend
from .trt.backend import TrtEngineBackend  # tensorrt and cuda-python load when one is made
from .types import Backend

ORT_PROVIDERS = ("cpu", "cuda", "tensorrt", "auto")  # ONNX Runtime execution providers
ENGINE_PROVIDER = "trt-engine"  # a prebuilt TensorRT engine (`gpt2-edge build-engine`)
PROVIDERS = (*ORT_PROVIDERS, ENGINE_PROVIDER)


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
    best installed), or ``trt-engine`` (the bundle's TensorRT engine for this GPU; ``path`` may
    also be an engine directory). ``threads``: ONNX Runtime's intra-op threads (ignored by the
    engine). ``options`` go to the backend: ``OrtBackend``'s ``session_config``, ``trt_fp16``,
    ``trt_cache_dir``, ``trt_workspace_mib``, ``trt_max_batch``, ``trt_max_context``; the engine's
    ``lane_timeout_s``. Every backend declares ``bundle``, ``n_ctx`` and ``capabilities``
    (``types.Backend``). ``path`` may be a ``Bundle`` already loaded (ONNX Runtime providers).
    """
    if provider == ENGINE_PROVIDER:
        return TrtEngineBackend(path.path if isinstance(path, Bundle) else path, verify=verify, **options)
    if provider not in ORT_PROVIDERS:
        raise Gpt2EdgeError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
    bundle = path if isinstance(path, Bundle) else Bundle.load(path, verify=verify)
    return OrtBackend(bundle, provider=provider, threads=threads, **options)
