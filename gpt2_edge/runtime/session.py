"""ONNX Runtime backend: one session shared by every caller, execution-provider choice.

The backend holds no per-sequence state: each caller gets its own KV cache from
``new_cache`` (in place or concatenating, as the bundle's graph was built), so one backend
serves concurrent ``generate`` calls (``InferenceSession.run`` is thread-safe). KV tensors are
bound with IO binding and never travel through Python lists; only logits come back to the host.

Memory (docs/runtime.md, "Memory"; ``python -m benchmarks.bench_memory`` measures each choice): on the
CPU the weights are memory-mapped from the bundle's file instead of parsed and copied
(``runtime.mapped``: a tied LM head gets a mapping of its own, packed first), and the heap's
free pages go back to the system after loading (``release_free_memory``). ONNX Runtime's
prepacking stays on: it pays in decode speed in every precision.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import lora_names
from ..errors import Gpt2EdgeError
from .bundle import Bundle
from .kv_cache import ConcatCache, InPlaceCache
from .lora import load_adapter
from .mapped import MappedModel, mapped_model, release_free_memory
from .trt import system as trt_system
from .trt.api import major
from .trt.plan import digest, gpu_key
from .trt.shapes import Limits, ShapeRange, ort_profile_options, shape_ranges
from .types import Capabilities

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ProviderError(Gpt2EdgeError):
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


def tensorrt_options(
    cache_dir: Path,
    fp16: bool,
    workspace_mib: int | None,
    profile: dict[str, ShapeRange] | None = None,
    timing_cache_dir: Path | None = None,
) -> dict[str, object]:
    """TensorRT execution-provider options: engine and timing caches (an engine is built for the
    GPU and TensorRT version it runs on), explicit shape ranges for every input (``profile``:
    name -> ``trt.shapes.ShapeRange``; without them the provider rebuilds its engine each time
    the past outgrows the shapes it has seen, i.e. during generation), fp16 for fp32 graphs
    (TensorRT 10 only), and an optional cap on the builder's workspace."""
    options: dict[str, object] = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_engine_cache_prefix": "gpt2edge",
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(timing_cache_dir or cache_dir),
        "trt_fp16_enable": fp16,
    }
    if workspace_mib:
        options["trt_max_workspace_size"] = workspace_mib * 2**20
    if profile:
        options.update(ort_profile_options(profile))
    return options


def tensorrt_provider_options(
    bundle: Bundle,
    cache_root: Path,
    fp16: bool = False,
    workspace_mib: int | None = None,
    max_batch: int = 8,
    max_context: int | None = None,
) -> dict[str, object]:
    """The TensorRT provider's options for ``bundle`` on this machine: one shape range (batch
    1..max_batch, past 0..context-1) and caches under ``cache_root/<gpu>-sm<cc>-trt<version>-ort
    <version>-<hash of ranges, graph and fp16>``, so a change of GPU, TensorRT, ONNX Runtime,
    limits or model never loads a stale engine."""
    import onnxruntime as ort

    trt_version = trt_system.tensorrt_version()
    if fp16 and bundle.precision != "fp32":
        raise ProviderError(
            f"trt_fp16 converts an fp32 graph; {bundle.path} is already {bundle.precision}: drop trt_fp16"
        )
    if fp16 and trt_version and major(trt_version) >= 11:
        raise ProviderError(
            f"TensorRT {trt_version} builds strongly typed networks only (no fp16 flag): run an fp16 bundle "
            f"instead (`gpt2-edge quantize {bundle.path} --precision fp16 -o DIR`) without trt_fp16"
        )
    limits = Limits(max_batch=max_batch, max_context=max_context).resolve(bundle.context_length)
    ranges = shape_ranges(bundle.inputs, limits)
    model = {n: f.sha256 for n, f in bundle.manifest.model_files().items()}
    key = gpu_key(trt_system.current_gpu(), trt_version)
    shapes = {n: r.as_dict() for n, r in ranges.items()}
    fingerprint = digest({"ranges": shapes, "model": model, "fp16": fp16})
    cache_dir = cache_root / f"{key}-ort{ort.__version__}-{fingerprint}"
    timing_dir = cache_root / f"timing-{key}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    timing_dir.mkdir(parents=True, exist_ok=True)
    return tensorrt_options(cache_dir, fp16, workspace_mib, ranges, timing_dir)


def _provider_hint(provider: str) -> str:
    return {
        "tensorrt": "TensorRT's libnvinfer must be on the library path; "
        "`gpt2-edge doctor` shows what is found",
        "cuda": "the CUDA runtime, cuBLAS and cuDNN for this onnxruntime-gpu build must be on the library "
        "path; `gpt2-edge doctor` shows what is found",
    }.get(provider, "see `gpt2-edge doctor`")


# Precisions whose rows stay within 1.1e-5 of each other with the concatenating cache's left padding
# (fp32: the attention sums only run in another order); the others move by up to a quantization
# step (docs: "Batch invariance and causality").
CONCAT_BATCH_SAFE = ("fp32",)


def batch_variance(bundle: Bundle) -> str | None:
    """Why rows decoded together on ONNX Runtime's CPU provider could change each other's tokens, or
    ``None``. Measured there: the in-place cache is bitwise batch-invariant for every precision except
    int8-dynamic bundles made with ONNX Runtime's per-tensor activation scale
    (``DynamicQuantizeLinear``, before per-row scales); the concatenating cache only for fp32. GPU
    providers are not judged here (``scripts/gpu-check`` compares the served output with
    ``Generator`` alone on them)."""
    q = bundle.manifest.quantization
    if bundle.precision == "int8-dynamic" and not (q is not None and q.batch_invariant):
        return (
            f"{bundle.path} is an int8-dynamic bundle with one activation scale per tensor (made before "
            "per-row scales), so rows change each other's logits; quantize it again"
        )
    if bundle.kv_form == "concat" and bundle.precision not in CONCAT_BATCH_SAFE:
        return (
            f"{bundle.path} is a {bundle.precision} bundle with the concatenating KV cache, whose padded "
            "rows can move a quantized activation by a step; use the in-place cache (the ort target)"
        )
    return None


# ONNX Runtime session config entries per bundle precision (measured: docs/measured.md, memory). None
# is set: ``session.disable_prepacking=1`` saves 147 MiB at fp32 (the tied head's packed copy)
# and nothing in the int8/int4 precisions, and costs decode speed in all of them (MatMulNBits
# without its packed weights runs ~20x slower); pass it as ``session_config`` where memory
# matters more than speed at batch > 1.
SESSION_DEFAULTS: dict[str, dict[str, str]] = {}


class OrtBackend:
    """A bundle's ``model.onnx`` in one ONNX Runtime session; makes KV caches for its callers."""

    def __init__(
        self,
        bundle: Bundle,
        provider: str = "cpu",
        threads: int | None = None,
        trt_cache_dir: str | Path | None = None,
        trt_fp16: bool = False,
        trt_workspace_mib: int | None = None,
        trt_max_batch: int = 8,
        trt_max_context: int | None = None,
        session_config: dict[str, str] | None = None,
        map_weights: bool | None = None,
        step_invariant: bool | None = False,
        lora: dict[str, str | Path] | None = None,
        prompt_graph: bool | None = None,
    ) -> None:
        """``provider``: cpu | cuda | tensorrt | auto. ``session_config``: ONNX Runtime session
        config entries over this precision's defaults (``SESSION_DEFAULTS``), e.g.
        ``{"session.disable_prepacking": "1"}``. ``map_weights`` (CPU; default: yes unless the
        environment sets ``GPT2_EDGE_MAP_WEIGHTS=0``): map the weights from the bundle's file
        instead of copying them (``mapped_model``; the file must not be rewritten in place while
        the session lives: bundles are replaced whole, by rename). ``step_invariant``: every pass
        computes attention as a chunk does, so a position's logits are bitwise the same decoded
        alone, verified in a speculative chunk or beside other rows' chunks (in-place bundles with
        the ``step_invariant`` input; slower at long contexts: docs/measured.md); None: so where the bundle
        has the input. ``lora``: name -> PEFT LoRA adapter directory, served at run time (a bundle
        exported with ``--lora-slots``; ``runtime.lora`` checks each first). ``prompt_graph``: run
        prompt chunks (``prefill``/``extend``) through the bundle's prompt graph (int4 bundles: int8
        MatMuls, about half the prefill time; quantize/int4.py) and generated tokens through its
        main graph; None: so where the bundle has one and step invariance is off (a prompt position
        then computes otherwise than a generated one); False: the main graph for everything, and
        the prompt graph's weights never load.
        TensorRT engines are cached under
        ``trt_cache_dir`` (default ``BUNDLE/engines/ort-trt-cache``), keyed by GPU, TensorRT and
        ONNX Runtime versions and shape ranges, because they are built for the GPU they run on;
        the provider is given batch 1..``trt_max_batch`` and 1..``trt_max_context`` tokens (default:
        the model's context) so it builds once, not at every new past length. ``trt_workspace_mib``
        caps the builder's scratch memory (a few hundred MiB on Jetsons with 8 GB or less);
        ``trt_fp16`` lets TensorRT 10 run an fp32 bundle in fp16 (TensorRT 11: use an fp16 bundle)."""
        import onnxruntime as ort

        self.bundle = bundle
        self.provider = resolve_provider(provider)
        self.kv_form = bundle.kv_form
        if self.kv_form == "inplace" and self.provider != "cpu":
            raise ProviderError(
                f"{bundle.path} has the in-place KV cache (GroupQueryAttention), which gpt2-edge runs on "
                "the CPU provider only; for CUDA or TensorRT export with `--kv-cache concat` or "
                "`--target tensorrt`"
            )
        self.has_step_invariant = any(s.name == "step_invariant" for s in bundle.inputs)
        if step_invariant is None:
            step_invariant = self.has_step_invariant
        if step_invariant and not self.has_step_invariant:
            raise Gpt2EdgeError(
                f"{bundle.path} cannot decode step-invariantly: its graph has no `step_invariant` input "
                "(in-place bundles of the `ort` target exported since this release have it); re-export "
                "it, or leave step invariance off"
            )
        self.step_invariant = bool(step_invariant)
        self._invariant_feed = np.array(int(self.step_invariant), np.int64)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session_config = {**SESSION_DEFAULTS.get(bundle.precision, {}), **(session_config or {})}
        for key, value in self.session_config.items():
            so.add_session_config_entry(key, str(value))
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        providers: list = []
        if self.provider == "tensorrt":
            root = Path(trt_cache_dir or bundle.path / "engines" / "ort-trt-cache")
            options = tensorrt_provider_options(
                bundle, root, trt_fp16, trt_workspace_mib, trt_max_batch, trt_max_context
            )
            providers.append((PROVIDERS["tensorrt"], options))
        if self.provider in ("tensorrt", "cuda"):
            providers.append(PROVIDERS["cuda"])
        providers.append(PROVIDERS["cpu"])
        model: str | bytes = str(bundle.model_file)
        self.mapped: MappedModel | None = None
        self.prompt_mapped: MappedModel | None = None
        if map_weights is None:
            map_weights = os.environ.get("GPT2_EDGE_MAP_WEIGHTS", "1") != "0"
        if self.provider == "cpu" and map_weights:
            # A tied head gets its own mapping only where prepacking then releases it.
            prepacking = self.session_config.get("session.disable_prepacking", "0") != "1"
            self.mapped = mapped_model(bundle.model_file, untie=prepacking)
            if self.mapped is not None:
                model = self.mapped.proto
                so.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", str(bundle.model_file.parent)
                )
        try:
            try:
                self.session = ort.InferenceSession(model, so, providers=providers)
            except Exception:
                if self.mapped is None:
                    raise
                self.mapped = None  # the rewritten graph was refused: load the file as it is
                self.session = ort.InferenceSession(str(bundle.model_file), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise Gpt2EdgeError(
                f"onnxruntime cannot load {bundle.model_file}: {str(e).splitlines()[0]}; re-export the bundle"
            ) from None
        release_free_memory()  # what parsing the graph (and copying weights, if not mapped) freed
        self._trimmed = False  # until the first cache: callers load a tokenizer after the backend
        bundle.check_session(self.session)
        self.prompt_session = self._prompt_session(bundle, prompt_graph, so, providers)
        active = self.session.get_providers()
        if PROVIDERS[self.provider] not in active:
            # onnxruntime's Python API retries without a provider that fails to load (TensorRT
            # without libnvinfer, CUDA without cuDNN) and only prints: never run elsewhere silently.
            raise ProviderError(
                f"{PROVIDERS[self.provider]} is installed but failed to load (the session fell back to "
                f"{', '.join(active)}): its libraries are missing or mismatched "
                f"({_provider_hint(self.provider)})"
            )
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
        self.has_logits_to_keep = any(s.name == "logits_to_keep" for s in ins)
        self.n_head = bundle.dims.n_head
        self.head_size = bundle.dims.head_size
        self.n_positions = bundle.context_length
        self.n_ctx = bundle.context_length
        self.pad_id = bundle.eos_token_id if bundle.eos_token_id is not None else 0
        self.lora_feeds, adapters = self._load_adapters(bundle, lora or {})
        self.capabilities = Capabilities(
            provider=self.provider,
            device=self.device,
            can_roll_back=self.kv_form == "inplace",
            step_invariant=self.step_invariant,
            batch_variance=batch_variance(bundle) if self.device == "cpu" else None,
            adapters=adapters,
            prompt_graph=self.prompt_session is not None,
        )

    def _prompt_session(self, bundle: Bundle, wanted: bool | None, so: Any, providers: list) -> Any:
        """The prompt graph's session where ``wanted`` (None: where the bundle has one and step
        invariance is off), or None."""
        import onnxruntime as ort

        path = bundle.prompt_model_file
        usable = path is not None and self.kv_form == "inplace" and self.provider == "cpu"
        if wanted and not usable:
            raise Gpt2EdgeError(
                f"{bundle.path} has no prompt graph for the CPU provider (int4 bundles with the in-place KV "
                "cache quantized since this release carry one): quantize it again, or leave prompt_graph off"
            )
        if wanted and self.step_invariant:
            raise Gpt2EdgeError(
                "step invariance needs every pass through one graph: leave prompt_graph off with "
                "step_invariant"
            )
        if not usable or wanted is False or self.step_invariant:
            return None
        assert path is not None
        if "session.intra_op.allow_spinning" not in self.session_config:
            # Its own thread pool: spinning after a prompt pass would take the cores from the decode
            # steps that follow (measured: decode 10-20% slower under it); a pass of many tokens does
            # not need the spin to start fast.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        mapped = mapped_model(path, untie=False) if self.mapped is not None else None
        try:
            session = ort.InferenceSession(mapped.proto if mapped else str(path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise Gpt2EdgeError(
                f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}; quantize the bundle again"
            ) from None
        self.prompt_mapped = mapped
        release_free_memory()
        bundle.check_session(session, path)
        return session

    def _load_adapters(
        self, bundle: Bundle, lora: dict[str, str | Path]
    ) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The stacked adapter inputs of a graph with LoRA slots, as OrtValues bound once into every
        binding (row 0 zeros: no adapter; row k: the k-th adapter, zero-padded to the slots' rank,
        its scale folded into B), and the adapters' names."""
        import onnxruntime as ort

        slots = bundle.manifest.lora_slots
        if slots is None:
            if lora:
                raise Gpt2EdgeError(
                    f"{bundle.path} takes no LoRA adapters at run time: export it with --lora-slots N, "
                    "or merge an adapter with `export --lora`"
                )
            return {}, ()
        if len(lora) > slots.slots:
            raise Gpt2EdgeError(f"{len(lora)} LoRA adapters given; {bundle.path} has {slots.slots} slots")
        d = bundle.dims
        adapters = [
            load_adapter(path, d.n_layer, d.n_embd, name=name, max_rank=slots.rank)
            for name, path in lora.items()
        ]
        feeds: dict[str, Any] = {}
        for a_name, b_name, target in lora_names(d.n_layer):
            spec_a = next(s for s in bundle.inputs if s.name == a_name)
            spec_b = next(s for s in bundle.inputs if s.name == b_name)
            a = np.zeros((len(adapters) + 1, *spec_a.shape[1:]), np.float32)  # [slots, in, rank]
            b = np.zeros((len(adapters) + 1, *spec_b.shape[1:]), np.float32)  # [slots, rank, out]
            module = f"h.{a_name.split('.')[1]}.{target}"
            for k, adapter in enumerate(adapters, start=1):
                m = adapter.modules.get(module)
                if m is not None:
                    a[k, :, : m.rank] = m.a.T
                    b[k, : m.rank, :] = m.b.T * np.float32(m.scale)
            feeds[a_name] = ort.OrtValue.ortvalue_from_numpy(a)
            feeds[b_name] = ort.OrtValue.ortvalue_from_numpy(b)
        return feeds, tuple(a.name for a in adapters)

    # caches -----------------------------------------------------------------------------------
    def new_cache(self, n_slots: int, capacity: int) -> ConcatCache | InPlaceCache:
        """A KV cache of ``n_slots`` sequences of up to ``capacity`` tokens, owned by the caller."""
        if not self._trimmed:  # the first cache: the tokenizer is loaded by now
            self._trimmed = True
            release_free_memory()
        lora = bool(self.lora_feeds)
        if self.kv_form == "inplace":
            return InPlaceCache(self, n_slots, capacity, lora=lora)
        return ConcatCache(self, n_slots, capacity, lora=lora)

    def _bind_and_run(
        self, feeds: dict[str, np.ndarray], past: list[Any], present: list[Any] | None, keep_all: bool
    ) -> tuple[np.ndarray, list[Any]]:
        io = self.session.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.int64))
        if self.has_logits_to_keep:
            io.bind_cpu_input("logits_to_keep", np.array(0 if keep_all else 1, np.int64))
        if self.has_step_invariant:
            io.bind_cpu_input("step_invariant", self._invariant_feed)
        for name, value in self.lora_feeds.items():
            io.bind_ortvalue_input(name, value)
        for name, value in zip(self.past_names, past, strict=True):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for i, name in enumerate(self.present_names):
            if present is None:
                io.bind_output(name, self.device)
            else:
                io.bind_ortvalue_output(name, present[i])
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy(), list(outs[1:])

    # the concatenating form (kv_cache.ConcatRunner) ----------------------------------------------
    def run(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        pos: np.ndarray,
        past: list[Any] | None,
        adapter_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[Any]]:
        """Last-position logits ``(B, V)`` and the presents (OrtValues) of one pass. ``adapter_ids``:
        each row's LoRA adapter (graphs with LoRA slots; None = none)."""
        if past is None:
            past = [self.from_numpy(self._empty_past(ids.shape[0])) for _ in self.past_names]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        if self.lora_feeds:
            feeds["adapter_ids"] = adapter_ids if adapter_ids is not None else np.zeros(len(ids), np.int64)
        logits, presents = self._bind_and_run(feeds, past, None, keep_all=False)
        return logits[:, -1], presents

    def _empty_past(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.n_head, 0, self.head_size), dtype=self.kv_dtype)

    def to_numpy(self, value: Any) -> np.ndarray:
        return value.numpy()

    def from_numpy(self, array: np.ndarray) -> Any:
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    # the in-place form (kv_cache.InPlaceRunner) --------------------------------------------------
    def cache_arrays(self, n_slots: int, capacity: int) -> list[np.ndarray]:
        # step invariance writes one (never read) position past a row's tokens: room for it
        shape = (n_slots, self.n_head, capacity + int(self.step_invariant), self.head_size)
        return [np.zeros(shape, self.kv_dtype) for _ in self.past_names]

    def inplace_binding(self, cache: list[np.ndarray]) -> _InPlaceBinding:
        return _InPlaceBinding(self, cache)

    # whole sequences ----------------------------------------------------------------------------
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits ``(B, T, V)`` from an empty cache (perplexity's ``LogitsFn``)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        B, T = input_ids.shape
        if self.kv_form == "inplace":
            return InPlaceCache(self, B, T, lora=bool(self.lora_feeds)).full_logits(input_ids)
        past = [self.from_numpy(self._empty_past(B)) for _ in self.past_names]
        pos = np.broadcast_to(np.arange(T, dtype=np.int64), input_ids.shape)
        feeds = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), "position_ids": pos}
        if self.lora_feeds:
            feeds["adapter_ids"] = np.zeros(B, np.int64)
        return self._bind_and_run(feeds, past, None, keep_all=True)[0]


class _InPlaceBinding:
    """IO binding of one range of in-place cache rows, made once and reused every step.

    On the CPU an OrtValue made from a numpy array wraps its memory, so past and present are the
    caller's buffer (GroupQueryAttention updates it in place), and the last-position logits land
    in a preallocated array: a step binds only its three small integer inputs.
    """

    def __init__(self, backend: OrtBackend, cache: list[np.ndarray]) -> None:
        import onnxruntime as ort

        self.backend = backend
        self.values = [ort.OrtValue.ortvalue_from_numpy(c) for c in cache]  # keeps the views alive
        rows = cache[0].shape[0]
        self.logits = np.zeros((rows, 1, backend.bundle.dims.vocab_size), np.float32)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.io = self._binding(backend.session)
        self._io_all: Any = None  # run_all's binding, made at its first call
        # the same buffers bound to the prompt graph (OrtBackend(prompt_graph=...)), or None
        self.io_prompt = None if backend.prompt_session is None else self._binding(backend.prompt_session)

    def _binding(self, session: Any) -> Any:
        """``session``'s IO binding of this range's cache (past = present, in place), the logits
        buffer and the inputs fixed for the backend's life."""
        backend = self.backend
        io = session.io_binding()
        for past, present, value in zip(backend.past_names, backend.present_names, self.values, strict=True):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        io.bind_ortvalue_output("logits", self._logits_value)
        if backend.has_logits_to_keep:
            io.bind_cpu_input("logits_to_keep", np.array(1, np.int64))
        if backend.has_step_invariant:
            io.bind_cpu_input("step_invariant", backend._invariant_feed)
        for name, value in backend.lora_feeds.items():
            io.bind_ortvalue_input(name, value)
        return io

    def run(self, feeds: dict[str, np.ndarray], prompt: bool = False) -> np.ndarray:
        """Last-position logits ``(rows, V)`` (a view of the binding's own buffer: copy to keep).
        ``prompt``: the rows bring prompt chunks (the prompt graph's pass, where the backend has one)."""
        io, session = self.io, self.backend.session
        if prompt and self.io_prompt is not None:
            io, session = self.io_prompt, self.backend.prompt_session
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        session.run_with_iobinding(io)
        return self.logits[:, 0]

    def run_all(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits at every position ``(rows, S, V)`` (perplexity, parity, speculative verification):
        a second binding, made once, whose logits ONNX Runtime allocates at each run's shape."""
        io = self._io_all
        if io is None:
            io = self._io_all = self.backend.session.io_binding()
            if self.backend.has_logits_to_keep:
                io.bind_cpu_input("logits_to_keep", np.array(0, np.int64))
            if self.backend.has_step_invariant:
                io.bind_cpu_input("step_invariant", self.backend._invariant_feed)
            for name, value in self.backend.lora_feeds.items():
                io.bind_ortvalue_input(name, value)
            io.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
            for past, present, value in zip(
                self.backend.past_names, self.backend.present_names, self.values, strict=True
            ):
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output("logits", "cpu")  # a fresh tensor each run (the last one's array keeps its own)
        self.backend.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()
