"""The ONNX IO contract (names as in optimum and onnxruntime-genai), in one place.

The exporter builds graphs to it and writes it into ``bundle.json``; the runtime reads names
and dims from the bundle, never from these constants. Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

BATCH = "batch_size"
SEQ = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"
CACHE = "cache_sequence_length"  # in-place form: a slot's capacity (past and present are one buffer)
KEPT = "kept_sequence_length"  # positions whose logits are computed (``logits_to_keep``)
ADAPTER_SLOTS = "adapter_slots"  # rows of the stacked LoRA weights: row 0 is "no adapter" (zeros)
# The projections a run-time LoRA slot adapts, by their path in a block: (in, out) in units of n_embd.
LORA_TARGETS = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16"
    shape: tuple[str | int, ...]  # symbolic names or fixed sizes

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def lora_names(n_layer: int) -> list[tuple[str, str, str]]:
    """``(lora_a, lora_b, target)`` input names of a graph with LoRA slots, in graph order."""
    return [(f"lora_a.{i}.{t}", f"lora_b.{i}.{t}", t) for i in range(n_layer) for t in LORA_TARGETS]


def inputs(
    n_layer: int,
    n_head: int,
    head_size: int,
    kv_dtype: str = "float32",
    kv_cache: str = "concat",
    logits_to_keep: bool = False,
    step_invariant: bool = False,
    lora_rank: int = 0,
) -> list[TensorSpec]:
    """The graph's inputs. ``kv_cache``: ``concat`` (past of any length) or ``inplace`` (past
    and present are the same ``[batch, heads, capacity, head_size]`` buffer). ``step_invariant``
    (in-place graphs of the ``ort`` target): an int64 scalar, 1 = a position's logits do not
    depend on how many tokens its pass carries (``export.fusions.add_step_invariance``).
    ``lora_rank`` (graphs exported with LoRA slots): ``adapter_ids`` (int64 ``[batch]``, each
    row's adapter, 0 = none), then per layer and projection the stacked adapters' ``lora_a``
    ``[adapter_slots, in, rank]`` and ``lora_b`` ``[adapter_slots, rank, out]`` (scale folded in):
    the projection computes ``x W + (x A[id]) B[id]``."""
    past = CACHE if kv_cache == "inplace" else PAST
    specs = [
        TensorSpec("input_ids", "int64", (BATCH, SEQ)),
        TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
        TensorSpec("position_ids", "int64", (BATCH, SEQ)),
    ]
    specs += [TensorSpec(n, kv_dtype, (BATCH, n_head, past, head_size)) for n in past_names(n_layer)]
    if logits_to_keep:
        specs.append(TensorSpec("logits_to_keep", "int64", ()))
    if step_invariant:
        specs.append(TensorSpec("step_invariant", "int64", ()))
    if lora_rank:
        n_embd = n_head * head_size
        specs.append(TensorSpec("adapter_ids", "int64", (BATCH,)))
        for a, b, t in lora_names(n_layer):
            fan_in, fan_out = (k * n_embd for k in LORA_TARGETS[t])
            specs.append(TensorSpec(a, "float32", (ADAPTER_SLOTS, fan_in, lora_rank)))
            specs.append(TensorSpec(b, "float32", (ADAPTER_SLOTS, lora_rank, fan_out)))
    return specs


def outputs(
    n_layer: int,
    n_head: int,
    head_size: int,
    vocab_size: int,
    kv_dtype: str = "float32",
    kv_cache: str = "concat",
    logits_to_keep: bool = False,
) -> list[TensorSpec]:
    present = CACHE if kv_cache == "inplace" else TOTAL
    specs = [TensorSpec("logits", "float32", (BATCH, KEPT if logits_to_keep else SEQ, vocab_size))]
    specs += [TensorSpec(n, kv_dtype, (BATCH, n_head, present, head_size)) for n in present_names(n_layer)]
    return specs
