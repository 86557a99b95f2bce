"""The bundle's ONNX graph rewritten, at load, into the form OpenVINO's CPU plugin runs fastest.

The plugin has a fused attention kernel that also appends the new K/V to the cache in place
(``ScaledDotProductAttentionWithKVCache``, made by its ``StatefulSDPAFusion`` pass), but it only
forms it from this exact shape, which optimum-intel's IR has and an ONNX graph does not::

    ReadValue(init: zeros [B,H,0,D]) -> Gather(beam_idx, axis 0) -> Concat(past, new, axis 2) -+-> SDPA
                                                                                               +-> Assign

so three things are done here, in order (each measured necessary on OpenVINO 2026.4):

1. ``fuse_attention``: each layer's ``MatMul(Q, Transpose(K)) * scale -> Where(not allowed, fill)
   -> Softmax -> MatMul(., V)`` becomes one ``ScaledDotProductAttention(Q, K, V, mask, scale)``
   (opset 13), the mask additive: 0 where allowed, the graph's own fill value (-65504) elsewhere,
   as optimum-intel's is. Left as MatMul/Softmax, the plugin never fuses it (its ``SDPAFusion``
   does not match the ``Where`` form).
2. ``add_beam_idx``: a ``beam_idx`` input (int32 ``[B]``) and a ``Gather`` of each past by it.
   Without it ``StatefulSDPAFusion`` does not match, and the plugin decomposes the SDPA again. The
   runner feeds ``arange(B)`` (rows stay in place).
3. ``make_stateful``: each ``past_key_values.*`` / ``present.*`` pair becomes one variable, and each
   ``ReadValue`` gets an initializer (zeros ``[B,H,0,D]``, B from ``input_ids``): the plugin's
   in-place cache memory refuses a ``ReadValue`` without one (compile error "less parent edges").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .system import OpenVinoError

BEAM_IDX = "beam_idx"


def _one(node: Any, kind: str, what: str) -> Any:
    if node.get_type_name() != kind:
        raise OpenVinoError(
            f"the bundle's attention is not in the form the openvino provider rewrites ({what}: expected "
            f"{kind}, got {node.get_type_name()} {node.get_friendly_name()!r}); quantize the bundle again"
        )
    return node


def fuse_attention(model: Any, n_layer: int) -> None:
    """Replace each layer's MatMul/Where/Softmax/MatMul attention by one ScaledDotProductAttention."""
    import openvino.opset13 as ops

    fused = 0
    for softmax in [n for n in model.get_ordered_ops() if n.get_type_name() == "Softmax"]:
        where = _one(softmax.input_value(0).get_node(), "Select", "before Softmax")
        masked = _one(where.input_value(0).get_node(), "LogicalNot", "Where's condition")
        allowed, fill = masked.input_value(0), where.input_value(1)
        mul = _one(where.input_value(2).get_node(), "Multiply", "the scaled scores")
        qk = _one(mul.input_value(0).get_node(), "MatMul", "Q @ K^T")
        scale = mul.input_value(1)
        k_t = _one(qk.input_value(1).get_node(), "Transpose", "K^T")
        (pv,) = [t.get_node() for t in softmax.output(0).get_target_inputs()]
        _one(pv, "MatMul", "probabilities @ V")
        q, k, v = qk.input_value(0), k_t.input_value(0), pv.input_value(1)  # (B, H, T, D), K/V (B, H, S, D)
        # additive (B, 1, T, S): what optimum-intel's IR feeds; the plugin's kernel takes it as is
        mask = ops.select(allowed, ops.constant(np.float32(0.0)), fill)
        sdpa = ops.scaled_dot_product_attention(q, k, v, mask, scale, causal=False)
        sdpa.set_friendly_name(softmax.get_friendly_name().rsplit("/", 1)[0] + "/SDPA")
        pv.output(0).replace(sdpa.output(0))
        fused += 1
    if fused != n_layer:
        raise OpenVinoError(
            f"found {fused} attention blocks in the bundle's graph, expected {n_layer}; "
            "quantize the bundle again"
        )


def add_beam_idx(model: Any, past_names: list[str]) -> None:
    """Read each past through ``Gather(past, beam_idx, 0)`` (the form ``StatefulSDPAFusion`` matches)."""
    import openvino.opset13 as ops

    beam = ops.parameter([-1], np.int32, name=BEAM_IDX)
    beam.output(0).set_names({BEAM_IDX})
    by_name = {n: p for p in model.get_parameters() for n in p.output(0).get_names()}
    for name in past_names:
        past = by_name[name]
        readers = list(past.output(0).get_target_inputs())
        rows = ops.gather(past, beam, ops.constant(np.int64(0)))
        for r in readers:
            r.replace_source_output(rows.output(0))
    model.add_parameters([beam])


def make_stateful(
    model: Any, past_names: list[str], present_names: list[str], n_head: int, head_size: int
) -> None:
    """Each past/present pair -> one variable (id ``past + present``), read with an empty initializer."""
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    apply_make_stateful_transformation(model, dict(zip(past_names, present_names, strict=True)))
    (ids,) = [p for p in model.get_parameters() if "input_ids" in p.output(0).get_names()]
    batch = ops.gather(ops.shape_of(ids), ops.constant(np.array([0], np.int64)), ops.constant(np.int64(0)))
    empty = ops.constant(np.array([n_head, 0, head_size], np.int64))  # (H, 0, D)
    for read in [n for n in model.get_ordered_ops() if n.get_type_name() == "ReadValue"]:
        zeros = ops.broadcast(ops.constant(np.float32(0.0)), ops.concat([batch, empty], 0))
        read.set_arguments([zeros])
    model.validate_nodes_and_infer_types()


def prepare(
    model: Any, past_names: list[str], present_names: list[str], n_layer: int, n_head: int, head_size: int
) -> None:
    """All three rewrites, in place (see the module's docstring)."""
    fuse_attention(model, n_layer)
    add_beam_idx(model, past_names)
    make_stateful(model, past_names, present_names, n_head, head_size)


def fused_attention_count(compiled: Any) -> int:
    """How many attention nodes the compiled model runs as the plugin's fused kernel."""
    return sum(
        1
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "ScaledDotProductAttention"
    )
