"""Run-time LoRA slots: each adapted projection of an exported graph gains a low-rank term chosen
per batch row, so rows of different adapters (or none) decode in one batch without a re-export.

For every block ``i`` and projection ``t`` (c_attn, attn c_proj, c_fc, mlp c_proj), beside the
base ``MatMul`` (found by its module-path name, ``/transformer/h.{i}/attn/c_attn/MatMul``)::

    x ──MatMul(W)──────────────────────────────────┐
    │                                              Add ──> the base MatMul's consumers (bias Add, ...)
    └──MatMul──MatMul─────────────────────────────┘
         │       │
         │       Gather(lora_b.{i}.{t}, adapter_ids)    [B, rank, out]
         Gather(lora_a.{i}.{t}, adapter_ids)            [B, in, rank]

Row 0 of the stacked weights is zeros (no adapter): such a row's term is exactly 0 and ``y + 0``
is ``y``, so its base path keeps every value of the plain graph. The scale (alpha / r) is folded
into ``lora_b`` by the runtime. Applied after the graph passes, so the fusions are the plain graph's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .. import contract
from ..errors import Gpt2EdgeError


def add_lora_slots(path: Path, n_layer: int, specs_in: list[contract.TensorSpec]) -> None:
    """Rewrite ``path`` (structure only: external weights stay where they are) with LoRA slots; the
    new inputs are those of ``specs_in`` after ``adapter_ids`` (``contract.inputs(lora_rank=...)``)."""
    proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph
    by_name = {n.name: n for n in g.node}
    new_inputs = [s for s in specs_in if s.name == "adapter_ids" or s.name.startswith("lora_")]
    for s in new_inputs:
        dtype = helper.np_dtype_to_tensor_dtype(np.dtype(s.dtype))
        g.input.append(helper.make_tensor_value_info(s.name, dtype, list(s.shape)))
    nodes = list(g.node)
    for a, b, t in contract.lora_names(n_layer):
        i = a.split(".")[1]
        base_name = f"/transformer/h.{i}/{t.replace('.', '/')}/MatMul"
        base = by_name.get(base_name)
        if base is None or base.op_type != "MatMul":
            raise Gpt2EdgeError(f"LoRA slots: the graph has no MatMul {base_name} to adapt")
        prefix = f"/transformer/h.{i}/{t.replace('.', '/')}/lora"
        out = base.output[0]
        summed = f"{prefix}/sum"
        for n in nodes:  # the consumers read the sum instead
            for k, name in enumerate(n.input):
                if name == out:
                    n.input[k] = summed
        for o in g.output:
            if o.name == out:
                raise Gpt2EdgeError(f"LoRA slots: {base_name}'s output is a graph output")
        added = [
            helper.make_node("Gather", [a, "adapter_ids"], [f"{prefix}/a"], name=f"{prefix}/GatherA", axis=0),
            helper.make_node("Gather", [b, "adapter_ids"], [f"{prefix}/b"], name=f"{prefix}/GatherB", axis=0),
            helper.make_node(
                "MatMul", [base.input[0], f"{prefix}/a"], [f"{prefix}/xa"], name=f"{prefix}/MatMulA"
            ),
            helper.make_node(
                "MatMul", [f"{prefix}/xa", f"{prefix}/b"], [f"{prefix}/delta"], name=f"{prefix}/MatMulB"
            ),
            helper.make_node("Add", [out, f"{prefix}/delta"], [summed], name=f"{prefix}/Add"),
        ]
        at = nodes.index(base) + 1
        nodes[at:at] = added
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(proto, str(path))
