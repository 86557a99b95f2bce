"""FP16: weights and KV cache in fp16, logits in fp32, and the overflow-prone parts kept in fp32.

GPT-2 overflows fp16 (NaN) unless LayerNorm (its variance sums squares of large activations),
the residual adds (the residual stream carries outliers in the hundreds to thousands), the
attention-score path (QK^T, scale, mask, softmax: the mask constant is finfo(fp32).min, which is
-inf in fp16 and turns fully masked pad rows into NaN) and the LM head stay in fp32. Converter:
``onnxruntime.transformers.float16`` (onnxconverter-common's produced an invalid graph here).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from ..export.graph import producers_consumers, save_model

# Op types kept in fp32 wherever they occur.
FP32_OPS = [
    "LayerNormalization",
    "SkipLayerNormalization",
    "Softmax",
    "Where",
    "Pow",
    "Range",
    "LessOrEqual",
    "And",
    "Not",
]


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that must stay fp32 beyond ``FP32_OPS``: residual adds, QK^T and its
    scale, and the LM head."""
    producers, consumers = producers_consumers(model)
    keep: set[str] = set()
    inits = {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        # residual adds: both operands computed (no weight), and a LayerNorm or the graph output follows
        if n.op_type == "Add" and all(i not in inits and i in producers for i in n.input):
            nxt = consumers.get(n.output[0], [])
            if any(c.op_type in ("LayerNormalization", "Add", "SkipLayerNormalization") for c in nxt):
                keep.add(n.name)
        # QK^T: a MatMul of two computed tensors that feeds the softmax path
        if n.op_type == "MatMul" and all(i not in inits for i in n.input):
            path = [n]
            nxt = consumers.get(n.output[0], [])
            while nxt and nxt[0].op_type in ("Mul", "Div", "Where", "Add") and len(path) < 5:
                path.append(nxt[0])
                nxt = consumers.get(nxt[0].output[0], [])
            if nxt and nxt[0].op_type == "Softmax":
                keep.update(p.name for p in path)
    head = producers.get("logits")
    if head is not None:
        keep.add(head.name)
    return sorted(keep)


def to_fp16(src: Path, dst: Path, external_data: bool) -> dict:
    """Convert ``src`` (fp32) to ``dst`` (fp16 weights and KV, fp32 logits)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    blocked = fp32_nodes(model)
    model = convert_float_to_float16(
        model,
        keep_io_types=["logits"],
        op_block_list=FP32_OPS,
        node_block_list=blocked,
        disable_shape_infer=external_data,  # shape inference serializes the proto (2 GB limit)
    )
    _unique_node_names(model)
    save_model(model, dst, external_data)
    return {
        "converter": "onnxruntime.transformers.float16",
        "fp32_op_types": FP32_OPS,
        "fp32_nodes": len(blocked),
        "kv_dtype": "float16",
    }


def _unique_node_names(model: onnx.ModelProto) -> None:
    """Drop the repeated Casts of onnxruntime <= 1.31's float16 converter.

    It inserts one ``x -> x_cast_to_fp32`` Cast per (blocked node, input) rather than per tensor, so
    a tensor read by two fp32 nodes gets two identical Casts with the same names, which onnxruntime
    refuses to load ("Duplicate definition of name"; seen with onnxruntime-gpu 1.31 on an H100).
    Identical Casts compute the same tensor: keep the first. Any other repeated node name is renamed.
    """
    seen_casts: set[tuple] = set()
    seen_names: set[str] = set()
    for i, n in enumerate(list(model.graph.node)):
        if n.op_type == "Cast":
            key = (tuple(n.input), tuple(n.output), tuple(a.i for a in n.attribute if a.name == "to"))
            if key in seen_casts:
                model.graph.node.remove(n)
                continue
            seen_casts.add(key)
        if n.name in seen_names:
            n.name = f"{n.name}_{i}"
        seen_names.add(n.name)
    infos: set[str] = set()
    for vi in list(model.graph.value_info):
        if vi.name in infos:
            model.graph.value_info.remove(vi)
        infos.add(vi.name)
