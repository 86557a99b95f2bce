"""ONNX Runtime backend: one session, execution-provider choice, KV cache kept as bound OrtValues.

Each decode step binds the previous step's ``present`` OrtValues directly as the next
``past`` inputs (IO binding), so the cache never travels through numpy or Python lists; only the
logits come back to the host. The same code serves the CPU, CUDA and TensorRT providers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .bundle import Bundle

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ProviderError(ValueError):
    """An execution provider was asked for that this onnxruntime build does not have."""


def resolve_provider(provider: str) -> str:
    """``cpu`` | ``cuda`` | ``tensorrt`` | ``auto`` (TensorRT, then CUDA, then CPU by what is installed)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "auto":
        for name in ("tensorrt", "cuda", "cpu"):
            if PROVIDERS[name] in available:
                return name
    if provider not in PROVIDERS:
        raise ProviderError(f"provider must be one of cpu, cuda, tensorrt, auto; got {provider!r}")
    if PROVIDERS[provider] not in available:
        hint = (
            "install onnxruntime-gpu (and not onnxruntime) on a machine with CUDA"
            if provider != "cpu"
            else ""
        )
        raise ProviderError(
            f"execution provider {PROVIDERS[provider]} is not available in this onnxruntime "
            f"(available: {', '.join(available)}); {hint}".rstrip("; ")
        )
    return provider


def tensorrt_options(cache_dir: Path, fp16: bool, workspace_mib: int | None) -> dict[str, object]:
    """TensorRT execution-provider options: engine and timing caches (an engine is built for the
    GPU and TensorRT version it runs on), fp16, and an optional cap on the builder's workspace."""
    options: dict[str, object] = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_fp16_enable": fp16,
    }
    if workspace_mib:
        options["trt_max_workspace_size"] = workspace_mib * 2**20
    return options


class OrtBackend:
    """Runs a bundle's ``model.onnx`` step by step; implements the decode loop's Backend protocol."""

    def __init__(
        self,
        bundle: Bundle,
        provider: str = "cpu",
        threads: int | None = None,
        trt_cache_dir: str | Path | None = None,
        trt_fp16: bool = False,
        trt_workspace_mib: int | None = None,
    ) -> None:
        """``provider``: cpu | cuda | tensorrt | auto. TensorRT engines are cached under
        ``trt_cache_dir`` (default ``BUNDLE/engines/ort-trt-cache``) because they are built for
        the GPU they run on; ``trt_workspace_mib`` caps the builder's scratch memory (use a
        few hundred MiB on Jetsons with 8 GB or less)."""
        import onnxruntime as ort

        self.bundle = bundle
        self.provider = resolve_provider(provider)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        providers: list = []
        if self.provider == "tensorrt":
            cache = Path(trt_cache_dir or bundle.path / "engines" / "ort-trt-cache")
            providers.append((PROVIDERS["tensorrt"], tensorrt_options(cache, trt_fp16, trt_workspace_mib)))
        if self.provider in ("tensorrt", "cuda"):
            providers.append(PROVIDERS["cuda"])
        providers.append(PROVIDERS["cpu"])
        try:
            self.session = ort.InferenceSession(str(bundle.model_file), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ValueError(
                f"onnxruntime cannot load {bundle.model_file}: {str(e).splitlines()[0]}; re-export the bundle"
            ) from None
        self.device = "cuda" if self.provider in ("cuda", "tensorrt") else "cpu"
        if bundle.precision == "fp16" and self.device == "cpu":
            warnings.warn(
                "an fp16 bundle on ONNX Runtime's CPU provider runs slower than the fp32 one (it casts "
                "around most kernels; 0.9x at 124M): use fp32, int8-dynamic or int4 bundles on CPUs",
                stacklevel=2,
            )
        ins = bundle.inputs
        self.past_names = [s.name for s in ins if s.name.startswith("past_key_values.")]
        self.present_names = [s.name for s in bundle.outputs if s.name.startswith("present.")]
        self.kv_dtype = np.dtype(next(s.dtype for s in ins if s.name in self.past_names))
        self.n_head = bundle.dims["n_head"]
        self.head_size = bundle.dims["head_size"]
        self.past: list = []

    def start(self, batch_size: int) -> None:
        import onnxruntime as ort

        empty = np.zeros((batch_size, self.n_head, 0, self.head_size), dtype=self.kv_dtype)
        self.past = [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in self.past_names]

    def reorder(self, rows: np.ndarray) -> None:
        """Gather batch rows of the cache (beam search). Goes through host memory on a GPU."""
        import onnxruntime as ort

        self.past = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[rows]), self.device, 0)
            for v in self.past
        ]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Last-position logits ``(B, V)``; the presents become the next step's past."""
        return self.run(input_ids, attention_mask, position_ids)[:, -1]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """All logits ``(B, T, V)`` of one forward pass over the current past."""
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.past_names, self.past, strict=True):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, self.device)
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        self.past = list(outs[1:])
        return outs[0].numpy()

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits ``(B, T, V)`` from an empty past (perplexity's ``LogitsFn``)."""
        self.start(input_ids.shape[0])
        pos = np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int64), input_ids.shape)
        return self.run(input_ids, np.ones_like(input_ids, dtype=np.int64), pos)
