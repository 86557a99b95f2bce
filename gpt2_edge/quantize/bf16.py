"""BF16: the weight matrices stored as bfloat16, each followed by a ``Cast`` to float.

The graph stays a standard-op fp32 graph around the weights (activations, KV cache and logits are
float32 at its edges), so every reader takes it: OpenVINO's CPU plugin folds the ``Cast`` into its
bf16 kernels and computes in bf16 where the CPU has the instructions (``runtime.openvino``);
ONNX Runtime, which has no bf16 MatMul on x86 CPUs, folds each ``Cast`` once at load and computes in
fp32 from the rounded weights (the fallback). Only tensors of two or more dimensions (matrices,
embeddings) are rounded: biases and LayerNorm parameters are a few KiB and stay float32.

Rounding is to nearest, ties to even (what ``torch.bfloat16`` and OpenVINO do).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .. import contract
from ..export.fusions import add_logits_to_keep
from ..export.graph import save_model
from ..runtime.openvino.system import import_openvino, openvino_installed


def to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_bf16(src: Path, dst: Path, external_data: bool, logits_to_keep: bool = False) -> dict:
    """Convert ``src`` (fp32, concatenating form) to ``dst``: float32 initializers of rank >= 2
    become bfloat16 ones read through a ``Cast`` to float. ``logits_to_keep``: add that input (the
    ``tensorrt`` target's graph has none), so prefill runs the LM head on the last position only."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    model = onnx.load(str(src))  # with its external data: one model's fp32 weights in memory
    graph = model.graph
    casts = []
    kept = []
    rounded = 0
    for t in graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) < 2:
            kept.append(t)
            continue
        bits = to_bfloat16_bits(numpy_helper.to_array(t))
        name = t.name
        stored = onnx.TensorProto()
        stored.name = f"{name}.bf16"
        stored.data_type = onnx.TensorProto.BFLOAT16
        stored.dims.extend(t.dims)
        stored.raw_data = bits.tobytes()
        kept.append(stored)
        casts.append(
            onnx.helper.make_node(
                "Cast", [stored.name], [name], name=f"/bf16/{name}/Cast", to=onnx.TensorProto.FLOAT
            )
        )
        rounded += bits.size
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)  # before every reader: the graph stays topologically sorted
    if logits_to_keep:
        add_logits_to_keep(model, inplace=False)
        logits = next(o for o in graph.output if o.name == "logits")
        logits.type.tensor_type.shape.dim[1].dim_param = contract.KEPT
    save_model(model, dst, external_data)
    return {
        "method": "bfloat16 weights (round to nearest even), Cast to float in the graph",
        "weights": f"{len(casts)} tensors of rank >= 2 in bfloat16 ({rounded} values); biases and "
        "LayerNorm in float32",
        "activations": "float32 at the graph's edges; bf16 compute where the runtime has it "
        "(OpenVINO on CPUs with AVX512-BF16 / AMX), fp32 on ONNX Runtime",
        "kv_dtype": "float32",
        "logits_to_keep_added": logits_to_keep,
    }


def write_openvino_ir(onnx_file: Path, xml: Path) -> bool:
    """The bundle's graph as OpenVINO IR at ``xml`` (weights beside it in ``.bin``, bfloat16 kept):
    what the ``openvino`` provider reads, in 0.1 s instead of 2-3 s and without the protobuf's copy
    of the weights. False (nothing written) where OpenVINO is not installed."""
    if not openvino_installed():
        return False
    ov = import_openvino()
    ov.save_model(ov.Core().read_model(str(onnx_file)), str(xml), compress_to_fp16=False)
    return True
