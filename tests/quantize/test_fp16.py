"""fp16 conversion details that do not need a model: the repeated Casts of older converters."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from gpt2_edge.quantize.fp16 import _unique_node_names


def test_repeated_identical_casts_are_dropped_and_names_made_unique():
    # onnxruntime <= 1.31's float16 converter casts a tensor once per reader: two identical Casts
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    cast = dict(inputs=["x"], outputs=["x_cast_to_fp32"], to=TensorProto.FLOAT, name="x_cast_to_fp32_node")
    nodes = [
        helper.make_node("Cast", **cast),
        helper.make_node("Cast", **cast),
        helper.make_node("Add", ["x_cast_to_fp32", "x_cast_to_fp32"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="add"),  # a repeated name on another node
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    _unique_node_names(model)
    assert [n.op_type for n in model.graph.node] == ["Cast", "Add", "Relu"]
    assert len({n.name for n in model.graph.node}) == 3
    onnx.checker.check_model(model)
