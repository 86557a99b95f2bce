"""The ``openvino`` provider: a bf16 bundle's ONNX graph compiled by OpenVINO's CPU plugin in bf16.

The bundle's graph is the concatenating form with standard ops (``gpt2-edge quantize B --precision
bf16`` of a ``tensorrt``-target bundle). At load it is rewritten (``graph.prepare``) into the form
the CPU plugin fuses into its attention kernel with the cache appended in place, and made
*stateful*: each ``past_key_values.*`` input and its ``present.*`` output become one variable held
inside the infer request, so a decode step passes four small integer inputs and reads the logits,
and the cache never crosses to the host.

Slots follow ``kv_cache.ConcatCache``'s rules unchanged: ``OvRunner`` implements its
``ConcatRunner`` protocol with opaque tensors. The presents a run returns are *handles* to the
request's variables; fed back as the next past they cost nothing. A batch that changes shape (a
sequence joining, leaving, or a re-pad) goes through the host as with ONNX Runtime: the cache reads
the handles (``to_numpy``), re-pads, and the next run writes the variables from its arrays.

One compiled model is shared by every caller; each cache gets its own infer request (its variables).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..bundle import Bundle
from ..kv_cache import CacheError, ConcatCache
from ..types import Capabilities
from . import graph, system
from .system import OpenVinoError, import_openvino

# The provider's name (``load_model(provider=...)``, ``--provider``).
PROVIDER = "openvino"

# Batch invariance (``Capabilities.batch_variance`` None): measured bitwise on a 2-core Zen 4 with
# AVX512-BF16 (OpenVINO 2026.4, the fused attention kernel, KV cache in bf16), tiny and 124M shapes,
# prompts of 1 to 250 tokens: a row's logits decoded alone equal those beside left-padded rows of
# other lengths, and a position's logits do not see later tokens (tests/runtime/test_openvino.py).
# With the plugin's default u8 KV cache they do not (a 1-token prefill reads its K/V back
# quantized, a longer one does not). Measure again on another CPU family (AMX) before relying on it.


def check_bundle(bundle: Bundle) -> None:
    """Refuse, by name, a bundle this provider cannot run."""
    if bundle.precision != "bf16":
        raise OpenVinoError(
            f"the openvino provider runs bf16 bundles; {bundle.path} is {bundle.precision} (make one with "
            f"`gpt2-edge quantize BUNDLE --precision bf16 -o DIR` from a `--target tensorrt` fp32 bundle)"
        )
    if bundle.kv_form != "concat":
        raise OpenVinoError(
            f"{bundle.path} has the in-place KV cache (ONNX Runtime's GroupQueryAttention), which "
            "OpenVINO cannot read; make the bf16 bundle from a `--target tensorrt` export"
        )
    if bundle.manifest.lora_slots is not None:
        raise OpenVinoError(
            f"{bundle.path} has run-time LoRA slots, which the openvino provider does not serve"
        )


class OvBackend:
    """A bf16 bundle compiled once by OpenVINO's CPU plugin; makes KV caches for its callers.

    >>> model = load_model("out/bundle-bf16", provider="openvino", threads=2)
    """

    def __init__(self, bundle: Bundle, threads: int | None = None, core: Any = None) -> None:
        """``threads``: OpenVINO's inference threads (default: its own choice). ``core``: an
        ``openvino.Core`` (default: a new one). Refuses (``OpenVinoError``, one line) a bundle it
        cannot run and a CPU without bf16 arithmetic, naming the fallback."""
        check_bundle(bundle)
        ov = import_openvino()
        self.core = core if core is not None else ov.Core()
        if not system.cpu_has_bf16(self.core):
            raise OpenVinoError(
                "this CPU has no bf16 arithmetic (OpenVINO lists no BF16 capability: it needs AVX512-BF16 "
                f"or AMX); run {bundle.path} with --provider cpu (ONNX Runtime, fp32 compute from the bf16 "
                "weights) or use the fp32 bundle"
            )
        self.bundle = bundle
        self.past_names = [s.name for s in bundle.inputs if s.name.startswith("past_key_values.")]
        self.present_names = [s.name for s in bundle.outputs if s.name.startswith("present.")]
        self.has_logits_to_keep = any(s.name == "logits_to_keep" for s in bundle.inputs)
        # the IR quantize wrote beside the ONNX where it could (weights mapped, read in 0.1 s)
        has_ir = bundle.has_file(system.IR_FILE) and bundle.has_file(system.IR_WEIGHTS)
        self.source = bundle.path / system.IR_FILE if has_ir else bundle.model_file
        try:
            model = self.core.read_model(str(self.source))
        except Exception as e:  # openvino raises RuntimeError / its own types
            raise OpenVinoError(
                f"OpenVINO cannot read {self.source}: {str(e).strip().splitlines()[0]}; make the bf16 "
                "bundle from a `--target tensorrt` export"
            ) from None
        names = {n for i in model.inputs for n in i.get_names()}
        expected = {s.name for s in bundle.inputs}
        if names != expected:
            raise OpenVinoError(
                f"{self.source} takes inputs {sorted(names)}, bundle.json lists {sorted(expected)}; "
                "quantize the bundle again"
            )
        d = bundle.dims
        graph.prepare(model, self.past_names, self.present_names, d.n_layer, d.n_head, d.head_size)
        config = {
            "INFERENCE_PRECISION_HINT": "bf16",
            # The plugin's default (u8, quantized per token) makes a 1-token prefill differ from the
            # same token in a longer prefill (the kernel reads the quantized K/V back only for T=1):
            # rows would change with their neighbours. bf16 keeps them bitwise (measured) and 16 bits.
            "KV_CACHE_PRECISION": "bf16",
            # Threads free to move, as ONNX Runtime's: pinned (OpenVINO's default for LATENCY) they
            # wait on a core another process holds; measured on a shared 2-core machine, 6 rounds
            # interleaved: batch-8 decode 193 vs 158 tok/s unpinned vs pinned, batch 1 level.
            "ENABLE_CPU_PINNING": "NO",
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        self.compiled = self.core.compile_model(model, "CPU", config)
        self.config = config
        # the variables' ids, made by the transformation from each pair's names
        self.state_ids = [p + q for p, q in zip(self.past_names, self.present_names, strict=True)]
        self.n_head, self.head_size = d.n_head, d.head_size
        self.n_ctx = bundle.context_length
        self.pad_id = bundle.eos_token_id if bundle.eos_token_id is not None else 0
        self.capabilities = Capabilities(provider=PROVIDER, device="cpu")

    def new_cache(self, n_slots: int, capacity: int) -> ConcatCache:
        """A KV cache of ``n_slots`` sequences of up to ``capacity`` tokens, on its own infer request."""
        return ConcatCache(OvRunner(self), n_slots, capacity)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits ``(B, T, V)`` from an empty cache (perplexity, parity)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        T = input_ids.shape[1]
        pos = np.broadcast_to(np.arange(T, dtype=np.int64), input_ids.shape)
        return OvRunner(self).infer(input_ids, np.ones_like(input_ids), pos, None, keep_all=True)


class _State:
    """One layer's K or V: live in a runner's request (valid until its next run) or a host copy."""

    __slots__ = ("array", "generation", "index", "runner")

    def __init__(self, runner: OvRunner, index: int, generation: int) -> None:
        self.runner, self.index, self.generation = runner, index, generation
        self.array: np.ndarray | None = None

    def live(self, runner: OvRunner) -> bool:
        return self.array is None and self.runner is runner and self.generation == runner.generation


class OvRunner:
    """One cache's infer request over the shared compiled model (``kv_cache.ConcatRunner``)."""

    def __init__(self, backend: OvBackend) -> None:
        self.backend = backend
        self.pad_id = backend.pad_id
        self.request = backend.compiled.create_infer_request()
        by_id = {s.name: s for s in self.request.query_state()}
        missing = [i for i in backend.state_ids if i not in by_id]
        if missing:
            raise OpenVinoError(
                f"OpenVINO made no variable {missing[0]!r} of the KV cache; quantize the bundle again"
            )
        self.states = [by_id[i] for i in backend.state_ids]
        self.generation = 0
        self._live: list[_State] = []
        self._ov = import_openvino()

    def run(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        pos: np.ndarray,
        past: list[Any] | None,
        adapter_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[Any]]:
        """Last-position logits ``(B, V)`` and the presents (handles to the request's variables)."""
        if adapter_ids is not None and np.any(adapter_ids):
            raise CacheError("the openvino provider serves no LoRA adapters")
        logits = self.infer(ids, mask, pos, past, keep_all=False)
        self._live = [_State(self, i, self.generation) for i in range(len(self.states))]
        return logits[:, -1], list(self._live)

    def infer(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any] | None, keep_all: bool
    ) -> np.ndarray:
        """One pass; ``past``: None (empty), this runner's live handles (kept as they are), or
        arrays / host copies (written into the variables first). Logits: a copy."""
        if past is None:
            self._detach()  # a running batch's handles keep their values (a sequence joining)
            empty = np.zeros((ids.shape[0], self.backend.n_head, 0, self.backend.head_size), np.float32)
            arrays: list[np.ndarray] | None = [empty] * len(self.states)
        elif all(isinstance(p, _State) and p.live(self) for p in past):
            arrays = None
        else:
            arrays = [self.to_numpy(p) for p in past]
        if arrays is not None:
            for state, a in zip(self.states, arrays, strict=True):
                state.state = self._ov.Tensor(np.ascontiguousarray(a, dtype=np.float32))
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        if self.backend.has_logits_to_keep:
            feeds["logits_to_keep"] = np.array(0 if keep_all else 1, np.int64)
        feeds = {k: np.asarray(v, np.int64).copy(order="C") for k, v in feeds.items()}
        feeds[graph.BEAM_IDX] = np.arange(ids.shape[0], dtype=np.int32)  # every row stays in place
        self.generation += 1
        self.request.infer(feeds, share_inputs=True)
        return np.array(self.request.get_tensor("logits").data, dtype=np.float32)

    def _detach(self) -> None:
        """Copy the variables into the handles that still point at them."""
        for h in self._live:
            if h.live(self):
                h.array = self._read(h.index)
        self._live = []

    def _read(self, index: int) -> np.ndarray:
        value = self.states[index].state
        return np.array(value.data, dtype=np.float32)

    def to_numpy(self, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        if value.array is not None:
            return value.array
        if not value.live(self):
            raise CacheError("a KV tensor of an earlier step was read after the cache moved on")
        return self._read(value.index)

    def from_numpy(self, array: np.ndarray) -> Any:
        return array
