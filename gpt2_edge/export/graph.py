"""Graph clean-up and the two targets: ``ort`` (ONNX Runtime fusions) and ``tensorrt`` (plain ONNX).

Everything here works on ``onnx.ModelProto`` or files; no torch.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import onnx

from .. import contract

# Ops the TensorRT 10 ONNX parser supports (onnx-tensorrt docs/operators.md), restricted to
# the standard domain; anything else in a ``tensorrt``-target graph is an export error.
TENSORRT_OPS = frozenset(
    """Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape CumSum
    DequantizeLinear Div Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm
    Greater GreaterOrEqual Identity LayerNormalization Less LessOrEqual Log LogSoftmax MatMul Max Min
    Mul Neg Not Or Pad Pow QuantizeLinear Range Reciprocal ReduceMax ReduceMean ReduceMin ReduceSum
    Relu Reshape ScatterElements ScatterND Shape Sigmoid Sign Sin Cos Slice Softmax Split Sqrt
    Squeeze Sub Sum Tanh Tile TopK Transpose Trilu Unsqueeze Where Xor""".split()
)
ORT_FUSED_OPS = (
    "SkipLayerNormalization",
    "FastGelu",
    "BiasGelu",
    "Gelu",
    "Attention",
    "MultiHeadAttention",
    "EmbedLayerNormalization",
    "LayerNormalization",
    "SkipSimplifiedLayerNormalization",
)


class GraphError(ValueError):
    """A graph breaks the contract or its target's rules."""


def producers_consumers(
    model: onnx.ModelProto,
) -> tuple[dict[str, onnx.NodeProto], collections.defaultdict[str, list[onnx.NodeProto]]]:
    """``{tensor: node that makes it}`` and ``{tensor: nodes that read it}`` of the main graph."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: collections.defaultdict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    return producers, consumers


def op_census(model: onnx.ModelProto) -> dict[str, int]:
    """``{"Op" or "domain:Op": count}`` over the main graph, most frequent first."""
    c = collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in model.graph.node
    )
    return dict(c.most_common())


def _dims(vi: onnx.ValueInfoProto) -> tuple[str | int, ...]:
    return tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)


def _dtype(vi: onnx.ValueInfoProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name


def name_dims(model: onnx.ModelProto, specs_out: list[contract.TensorSpec]) -> None:
    """Give outputs the contract's symbolic dim names (the exporter writes e.g. ``past + seq``)."""
    by_name = {s.name: s for s in specs_out}
    for vi in model.graph.output:
        spec = by_name.get(vi.name)
        if spec is None:
            continue
        for d, want in zip(vi.type.tensor_type.shape.dim, spec.shape, strict=False):
            if isinstance(want, str):
                d.dim_param = want


def check_contract(
    model: onnx.ModelProto, specs_in: list[contract.TensorSpec], specs_out: list[contract.TensorSpec]
) -> None:
    """Names, then dtypes, then shapes of every input and output; raises with expected vs got."""
    for kind, got, want in (
        ("input", model.graph.input, specs_in),
        ("output", model.graph.output, specs_out),
    ):
        got_names = [v.name for v in got]
        want_names = [s.name for s in want]
        if got_names != want_names:
            raise GraphError(f"{kind} names: expected {want_names}, got {got_names}")
        for v, s in zip(got, want, strict=True):
            if _dtype(v) != s.dtype:
                raise GraphError(f"{kind} {v.name}: expected dtype {s.dtype}, got {_dtype(v)}")
            if _dims(v) != tuple(s.shape):
                raise GraphError(f"{kind} {v.name}: expected shape {list(s.shape)}, got {list(_dims(v))}")


def check_no_if(model: onnx.ModelProto) -> None:
    ifs = [n.name for n in model.graph.node if n.op_type in ("If", "Loop", "Scan")]
    if ifs:
        raise GraphError(f"the graph has control-flow nodes TensorRT rejects: {ifs[:5]}")


def unsupported_by_tensorrt(census: dict[str, int]) -> dict[str, int]:
    """Ops of an ``op_census`` that TensorRT's ONNX parser does not take (contrib ops included)."""
    return {op: n for op, n in census.items() if ":" in op or op not in TENSORRT_OPS}


def checked_census(
    path: Path,
    specs_in: list[contract.TensorSpec],
    specs_out: list[contract.TensorSpec],
    tensorrt: bool = False,
) -> dict[str, int]:
    """Check a saved model's contract, control flow (and, for ``tensorrt``, its ops); return its
    op census. Loads the graph structure only."""
    model = onnx.load(str(path), load_external_data=False)
    check_contract(model, specs_in, specs_out)
    check_no_if(model)
    census = op_census(model)
    bad = unsupported_by_tensorrt(census)
    if tensorrt and bad:
        raise GraphError(f"ops TensorRT's ONNX parser does not take: {bad}")
    return census


_SEGMENT = re.compile(r"^model\.(?P<path>[\w.]+):")


def name_nodes_by_module(model: onnx.ModelProto) -> None:
    """Rename nodes after the module that produced them: ``/transformer/h.3/attn/c_attn/MatMul``.

    The dynamo exporter records the module stack in each node's ``namespace`` metadata.
    """
    used: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        ns = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        path = ""
        for seg in ns.split("/"):
            m = _SEGMENT.match(seg)
            if m:
                path = m.group("path")
        parts = re.sub(r"\.(\d+)(?=\.|$)", r"#\1", path).split(".") if path else []
        base = "/" + "/".join([p.replace("#", ".") for p in parts] + [node.op_type])
        used[base] += 1
        node.name = base if used[base] == 1 else f"{base}_{used[base] - 1}"


def optimize_for_ort(
    src: Path, dst: Path, n_head: int, n_embd: int, external_data: bool, fuse_mha: bool = True
) -> dict[str, int]:
    """ONNX Runtime's GPT-2 transformer optimizer at ``opt_level=2`` (+ our MultiHeadAttention
    fusion first, when ``fuse_mha``); returns the fused-op census.

    ``opt_level`` 0/1 (the gpt2 default) replaces the tanh GELU with the erf one (BiasGelu): a
    silent accuracy change. Level 2 makes FastGelu, which keeps tanh.
    """
    from onnxruntime.transformers import optimizer

    if fuse_mha:
        # Structure only: with external weights the rewrite never touches tensor data, and the
        # fused graph saved beside ``src`` still points at the same ``.data`` file.
        model = onnx.load(str(src), load_external_data=False)
        if fuse_attention(model, n_head):
            src = src.with_name("fused_" + src.name)
            if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
                onnx.save(model, str(src))
            else:
                save_model(model, src, external_data)
        del model
    opt = optimizer.optimize_model(
        str(src), model_type="gpt2", num_heads=n_head, hidden_size=n_embd, opt_level=2, use_gpu=False
    )
    model = opt.model
    retie_head(model)
    save_model(model, dst, external_data)
    census = op_census(onnx.load(str(dst), load_external_data=False))
    return {op: n for op, n in census.items() if op.split(":")[-1] in ORT_FUSED_OPS}


def save_model(model: onnx.ModelProto, dst: Path, external_data: bool) -> None:
    """Save, with all weights in ``<name>.data`` when ``external_data`` (past protobuf's 2 GB)."""
    if external_data:
        onnx.save_model(
            model,
            str(dst),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=dst.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(dst))


def retie_head(model: onnx.ModelProto) -> bool:
    """Undo constant folding of ``Transpose(wte)`` into a second ``[n_embd, vocab]`` copy.

    ORT's optimizer folds it (124M: +148 MiB on disk); the runtime folds it again in memory
    at load, so a file with the Transpose is smaller and runs the same. Returns whether it changed.
    """
    from onnx import numpy_helper

    producers, _ = producers_consumers(model)
    inits = {t.name: t for t in model.graph.initializer}
    head = producers.get("logits")
    if head is None or head.op_type != "MatMul" or head.input[1] not in inits:
        return False
    b = inits[head.input[1]]
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[0] in inits and n.input[0] != b.name:
            w = inits[n.input[0]]
            if list(w.dims) == list(b.dims)[::-1] and np.array_equal(
                numpy_helper.to_array(w).T, numpy_helper.to_array(b)
            ):
                out = f"{w.name}_transposed"
                tr = onnx.helper.make_node(
                    "Transpose", [w.name], [out], name="/lm_head/Transpose", perm=[1, 0]
                )
                model.graph.node.insert(list(model.graph.node).index(head), tr)
                head.input[1] = out
                model.graph.initializer.remove(b)
                return True
    return False


def untie_head(model: onnx.ModelProto) -> bool:
    """Give the LM head its own constant ``[n_embd, vocab]`` weight instead of ``Transpose(wte)``.

    ONNX Runtime's quantizers skip a MatMul whose weight is not a constant, which leaves a
    quantized model's largest MatMul in fp32 (notes/export-facts.md: 32 vs 6 ms/step at 124M).
    Returns whether the graph changed. Works on graphs with external data loaded.
    """
    from onnx import numpy_helper

    producers, _ = producers_consumers(model)
    inits = {t.name: t for t in model.graph.initializer}
    head = producers.get("logits")
    while head is not None and head.op_type != "MatMul":  # e.g. a Cast after the head
        head = producers.get(head.input[0])
    if head is None or head.input[1] in inits:
        return False
    tr = producers.get(head.input[1])
    if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
        return False
    w = numpy_helper.to_array(inits[tr.input[0]])
    perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)  # default: reverse
    t = numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), name="lm_head.weight")
    model.graph.initializer.append(t)
    head.input[1] = "lm_head.weight"
    if not any(tr.output[0] in n.input for n in model.graph.node):
        model.graph.node.remove(tr)
    return True


def fuse_attention(model: onnx.ModelProto, n_head: int) -> int:
    """Replace each layer's attention subgraph with ONNX Runtime's ``MultiHeadAttention``.

    ORT's GPT-2 fusion only matches the legacy stacked-past graph, so it is built here::

        c_attn -> Split -> q, k, v (B, S, E)            attention_mask -> Cast(int32)
                     \\      |  |                               |
                      MultiHeadAttention(q, k, v, key_padding_mask, past_key, past_value,
                                         num_heads, unidirectional=1)
                     /              |                  \\
        output (B, S, E) -> c_proj   present.i.key      present.i.value

    Returns the number of layers fused. Leaves the graph unchanged where a layer does not match.
    """
    producers, consumers = producers_consumers(model)

    def src_3d(t: str) -> str | None:
        """The (B, S, E) tensor behind Transpose(Reshape(x)) -> (B, H, S, D)."""
        tr = producers.get(t)
        rs = producers.get(tr.input[0]) if tr is not None and tr.op_type == "Transpose" else None
        return rs.input[0] if rs is not None and rs.op_type == "Reshape" else None

    mask_i32 = "attention_mask_int32"
    fused, new_nodes = 0, []
    i = 0
    while f"present.{i}.key" in producers:
        cat_k, cat_v = producers[f"present.{i}.key"], producers.get(f"present.{i}.value")
        i += 1
        if cat_k.op_type != "Concat" or cat_v is None or cat_v.op_type != "Concat":
            continue
        k3, v3 = src_3d(cat_k.input[1]), src_3d(cat_v.input[1])
        # present.key -> Transpose -> MatMul(q, .) ; present.value -> MatMul(softmax, .)
        kt = next((c for c in consumers[cat_k.output[0]] if c.op_type == "Transpose"), None)
        qk = next((c for c in consumers[kt.output[0]] if c.op_type == "MatMul"), None) if kt else None
        av = next((c for c in consumers[cat_v.output[0]] if c.op_type == "MatMul"), None)
        q3 = src_3d(qk.input[0]) if qk is not None else None
        out_tr = consumers[av.output[0]][0] if av is not None and len(consumers[av.output[0]]) == 1 else None
        out_rs = (
            consumers[out_tr.output[0]][0] if out_tr is not None and out_tr.op_type == "Transpose" else None
        )
        if None in (k3, v3, q3, out_rs) or out_rs.op_type != "Reshape":
            continue
        layer = cat_k.name.rsplit("/", 1)[0]
        new_nodes.append(
            onnx.helper.make_node(
                "MultiHeadAttention",
                [q3, k3, v3, "", mask_i32, "", cat_k.input[0], cat_v.input[0]],
                [out_rs.output[0], cat_k.output[0], cat_v.output[0]],
                name=f"{layer}/MultiHeadAttention",
                domain="com.microsoft",
                num_heads=n_head,
                unidirectional=1,
            )
        )
        for old in (cat_k, cat_v, out_rs):  # their outputs now come from the fused node
            model.graph.node.remove(old)
        fused += 1
    if not fused:
        return 0
    cast = onnx.helper.make_node(
        "Cast", ["attention_mask"], [mask_i32], name="/attention_mask/Cast", to=onnx.TensorProto.INT32
    )
    model.graph.node.insert(0, cast)
    model.graph.node.extend(new_nodes)
    _remove_dead_nodes(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _topological_sort(model)
    return fused


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    needed = {o.name for o in model.graph.output}
    keep = []
    for n in reversed(model.graph.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    used_inits = {i for n in keep for i in n.input}
    dead_inits = [t for t in model.graph.initializer if t.name not in used_inits]
    for t in dead_inits:
        model.graph.initializer.remove(t)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))


def _topological_sort(model: onnx.ModelProto) -> None:
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered = []
    while pending:
        progress = [n for n in pending if all(i in ready for i in n.input)]
        if not progress:
            raise GraphError(f"graph has a cycle or dangling inputs near {pending[0].name}")
        for n in progress:
            ready.update(n.output)
        ordered.extend(progress)
        pending = [n for n in pending if n not in progress]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
