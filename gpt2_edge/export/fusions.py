"""The ``ort`` target: fusions ONNX Runtime runs faster, built by hand where its optimizer does not
(``GroupQueryAttention`` over an in-place KV buffer, ``MultiHeadAttention``, the tied LM head as
``FusedMatMul``, ``logits_to_keep``), then its GPT-2 transformer optimizer at ``opt_level=2``.
Works on ``onnx.ModelProto`` or files; no torch. One file a little past 400 lines: the rewrites
share their pattern matching (attention sites, the head's producers) and read in pipeline order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.transformers import optimizer

from .. import contract
from ..errors import Gpt2EdgeError
from .graph import (
    KV_FORMS,
    ORT_FUSED_OPS,
    GraphError,
    name_dims,
    op_census,
    producers_consumers,
    save_model,
)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run with ``path`` as the working directory: ONNX's ``numpy_helper.to_array`` and shape
    inference resolve a tensor's external data against it when the caller passes no base
    directory, as ONNX Runtime's fusions and quantizers do; so they read the few tensors they
    need from disk, one at a time, instead of a model with every weight loaded. Process-wide:
    export and quantize run it on their one thread."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


# optimize_model's list at opt_level 2: ConstantSharing changes the graph from run to run; the
# others break the Python fusions' patterns.
ORT_DISABLED_OPTIMIZERS = [
    "ConstantSharing",
    "MatMulScaleFusion",
    "MatMulAddFusion",
    "MatmulTransposeFusion",
    "GemmActivationFusion",
    "BiasSoftmaxFusion",
]


def optimize_for_ort(
    src: Path,
    dst: Path,
    n_head: int,
    n_embd: int,
    n_layer: int,
    external_data: bool,
    kv_cache: str = "inplace",
    fuse_mha: bool = True,
    specs: list[contract.TensorSpec] = (),
) -> dict[str, int]:
    """The ``ort`` target: attention fusion, ONNX Runtime's GPT-2 transformer optimizer at
    ``opt_level=2``, the re-tied LM head and ``logits_to_keep``; returns the fused-op census.

    ``kv_cache="inplace"`` fuses every layer into ``GroupQueryAttention`` over a shared KV
    buffer; ``"concat"`` into ``MultiHeadAttention`` (or, without ``fuse_mha``, keeps plain ops).
    ``opt_level`` 0/1 (the gpt2 default) replaces the tanh GELU with the erf one (BiasGelu): a
    silent accuracy change. Level 2 makes FastGelu, which keeps tanh.
    """
    if kv_cache not in KV_FORMS:
        raise Gpt2EdgeError(f"kv_cache must be one of {KV_FORMS}, got {kv_cache!r}")
    if kv_cache == "inplace" or fuse_mha:
        # Structure only: with external weights the rewrite never touches tensor data, and the
        # fused graph saved beside ``src`` still points at the same ``.data`` file.
        model = onnx.load(str(src), load_external_data=False)
        done = (
            fuse_attention_inplace(model, n_head, n_layer)
            if kv_cache == "inplace"
            else fuse_attention(model, n_head)
        )
        if done:
            src = src.with_name("fused_" + src.name)
            onnx.save(model, str(src))  # its weights: still the .data file beside it
        del model
    # What optimizer.optimize_model(opt_level=2) does, in two steps that keep the weights on disk:
    # ONNX Runtime's own passes write their graph with external data, then the Python fusions run
    # on its structure alone. optimize_model would load every weight into the proto and its shape
    # inference copies it again (gpt2-medium peaked at 8x its weights).
    ort_graph = src.with_name("ort_" + src.name)
    optimizer.optimize_by_onnxruntime(
        str(src),
        use_gpu=False,
        optimized_model_path=str(ort_graph),
        opt_level=2,
        disabled_optimizers=ORT_DISABLED_OPTIMIZERS,
        save_as_external_data=True,
    )
    model = onnx.load(str(ort_graph), load_external_data=False)
    with working_directory(src.parent):
        model = optimizer.optimize_by_fusion(model, "gpt2", num_heads=n_head, hidden_size=n_embd).model
    retie_head(model, base_dir=src.parent)
    fuse_head_transpose(model)
    add_logits_to_keep(model, inplace=kv_cache == "inplace")
    if kv_cache == "inplace":
        add_step_invariance(model)
    name_dims(model, list(specs))
    save_model(model, dst, external_data, base_dir=src.parent)
    census = op_census(onnx.load(str(dst), load_external_data=False))
    return {op: n for op, n in census.items() if op.split(":")[-1] in ORT_FUSED_OPS}


def retie_head(model: onnx.ModelProto, base_dir: Path | None = None) -> bool:
    """Undo constant folding of ``Transpose(wte)`` into a second ``[n_embd, vocab]`` copy.

    ORT's optimizer folds it (124M: +148 MiB on disk); the runtime folds it again in memory
    at load, so a file with the Transpose is smaller and runs the same. Returns whether it changed.
    ``base_dir``: where the graph's external data lies (only the two tensors are read).
    """
    where = str(base_dir) if base_dir is not None else ""
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
                numpy_helper.to_array(w, where).T, numpy_helper.to_array(b, where)
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


def fuse_head_transpose(model: onnx.ModelProto) -> bool:
    """The tied head ``MatMul(x, Transpose(wte))`` as ``com.microsoft.FusedMatMul(x, wte, transB=1)``.

    ONNX Runtime constant-folds the Transpose at load into a second ``[n_embd, vocab]`` copy of
    the embedding (124M: 147 MiB); FusedMatMul reads ``wte`` transposed in place. Measured on
    the 124M shape: peak RSS 1042 -> 931 MiB, load 2.6 -> 2.0 s, decode speed unchanged.
    """
    producers, consumers = producers_consumers(model)
    head = producers.get("logits")
    inits = {t.name for t in model.graph.initializer}
    if head is None or head.op_type != "MatMul":
        return False
    tr = producers.get(head.input[1])
    perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), [1, 0]) if tr else None
    if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits or perm != [1, 0]:
        return False
    fused = onnx.helper.make_node(
        "FusedMatMul",
        [head.input[0], tr.input[0]],
        list(head.output),
        name="/lm_head/FusedMatMul",
        domain="com.microsoft",
        transB=1,
        alpha=1.0,
    )
    model.graph.node.insert(list(model.graph.node).index(head), fused)
    model.graph.node.remove(head)
    if consumers[tr.output[0]] == [head]:
        model.graph.node.remove(tr)
    return True


def untie_head(model: onnx.ModelProto) -> bool:
    """Give the LM head its own constant ``[n_embd, vocab]`` weight instead of ``Transpose(wte)``.

    ONNX Runtime's quantizers skip a MatMul whose weight is not a constant, which leaves a
    quantized model's largest MatMul in fp32 (notes/export-facts.md: 32 vs 6 ms/step at 124M).
    Returns whether the graph changed. Works on graphs with external data loaded.
    """
    producers, _ = producers_consumers(model)
    inits = {t.name: t for t in model.graph.initializer}
    head = producers.get("logits")
    while head is not None and head.op_type not in ("MatMul", "FusedMatMul"):  # e.g. a Cast after it
        head = producers.get(head.input[0])
    if head is not None and head.op_type == "FusedMatMul":  # x @ wte^T, from fuse_head_transpose
        if head.input[1] not in inits:
            return False
        w = numpy_helper.to_array(inits[head.input[1]])
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "lm_head.weight"))
        matmul = onnx.helper.make_node(
            "MatMul",
            [head.input[0], "lm_head.weight"],
            list(head.output),
            name=head.name.replace("FusedMatMul", "MatMul"),
        )
        model.graph.node.insert(list(model.graph.node).index(head), matmul)
        model.graph.node.remove(head)
        return True
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


def _attention_sites(model: onnx.ModelProto) -> list[dict]:
    """Each layer's attention subgraph of the exported graph, where it matches::

    c_attn -> Split -> q, k, v (B, S, E) -> Reshape -> Transpose -> (B, H, S, D)
    past_key_values.i.key -> Concat(past, k) = present.i.key -> Transpose -> MatMul(q, .)
    past_key_values.i.value -> Concat(past, v) = present.i.value -> MatMul(softmax, .)
    -> Transpose -> Reshape = output (B, S, E) -> c_proj
    """
    producers, consumers = producers_consumers(model)

    def src_3d(t: str) -> str | None:
        """The (B, S, E) tensor behind Transpose(Reshape(x)) -> (B, H, S, D)."""
        tr = producers.get(t)
        rs = producers.get(tr.input[0]) if tr is not None and tr.op_type == "Transpose" else None
        return rs.input[0] if rs is not None and rs.op_type == "Reshape" else None

    sites = []
    i = 0
    while f"present.{i}.key" in producers:
        cat_k, cat_v = producers[f"present.{i}.key"], producers.get(f"present.{i}.value")
        i += 1
        if cat_k.op_type != "Concat" or cat_v is None or cat_v.op_type != "Concat":
            continue
        k3, v3 = src_3d(cat_k.input[1]), src_3d(cat_v.input[1])
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
        sites.append(
            dict(
                layer=cat_k.name.rsplit("/", 1)[0],
                q=q3,
                k=k3,
                v=v3,
                past_key=cat_k.input[0],
                past_value=cat_v.input[0],
                output=out_rs.output[0],
                present_key=cat_k.output[0],
                present_value=cat_v.output[0],
                replaced=(cat_k, cat_v, out_rs),  # their outputs now come from the fused node
            )
        )
    return sites


def _replace_attention(
    model: onnx.ModelProto, sites: list[dict], fused: list[onnx.NodeProto], prologue: list[onnx.NodeProto]
) -> None:
    for site in sites:
        for old in site["replaced"]:
            model.graph.node.remove(old)
    for i, n in enumerate(prologue):
        model.graph.node.insert(i, n)
    model.graph.node.extend(fused)
    _remove_dead_nodes(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _topological_sort(model)


def fuse_attention(model: onnx.ModelProto, n_head: int) -> int:
    r"""Replace each layer's attention subgraph with ONNX Runtime's ``MultiHeadAttention``
    (the concatenating KV form: past in, past + new out).

    ORT's GPT-2 fusion only matches the legacy stacked-past graph, so it is built here::

        q, k, v (B, S, E)   attention_mask -> Cast(int32)   past_key, past_value
                \  |  /             |                            |
          MultiHeadAttention(num_heads, unidirectional=1, key_padding_mask)
                /              |                  \
        output (B, S, E)   present.i.key      present.i.value

    Returns the number of layers fused. Leaves the graph unchanged where a layer does not match.
    """
    sites = _attention_sites(model)
    if not sites:
        return 0
    mask_i32 = "attention_mask_int32"
    fused = [
        onnx.helper.make_node(
            "MultiHeadAttention",
            [s["q"], s["k"], s["v"], "", mask_i32, "", s["past_key"], s["past_value"]],
            [s["output"], s["present_key"], s["present_value"]],
            name=f"{s['layer']}/MultiHeadAttention",
            domain="com.microsoft",
            num_heads=n_head,
            unidirectional=1,
        )
        for s in sites
    ]
    cast = onnx.helper.make_node(
        "Cast", ["attention_mask"], [mask_i32], name="/attention_mask/Cast", to=onnx.TensorProto.INT32
    )
    _replace_attention(model, sites, fused, [cast])
    return len(sites)


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return onnx.helper.make_node(
        "Constant", [], [name], name=f"/{name}", value=numpy_helper.from_array(value)
    )


def fuse_attention_inplace(model: onnx.ModelProto, n_head: int, n_layer: int) -> int:
    """Replace every layer's attention with ``GroupQueryAttention`` (kv heads = heads) over a KV
    buffer that is both past and present: the in-place form (``runtime/kv_cache.py``)::

        attention_mask (B, T) -> ReduceSum = T_b ----------> seqlens_k = T_b - 1 (int32)
        position_ids[:, 0] = P_b (first new position) ---> query_seqlens = T_b - P_b (int32)
        Shape(attention_mask)[1] -------------------------> total_sequence_length (int32)
        q, k, v (B, S, E), past_key_values.i.* (B, H, C, D) -> GroupQueryAttention
            -> output (B, S, E), present.i.* (the same buffers when bound as such)

    Rows of a step are right-padded chunks; a row with ``T_b == P_b`` is idle. All layers must
    match (a half-fused graph has no consistent cache); raises ``GraphError`` otherwise.
    """
    sites = _attention_sites(model)
    if len(sites) != n_layer:
        raise GraphError(f"in-place KV: matched the attention of {len(sites)} of {n_layer} layers")
    i64, i32 = onnx.TensorProto.INT64, onnx.TensorProto.INT32
    mk = onnx.helper.make_node
    prologue = [
        _const("kv/one", np.array(1, np.int64)),
        _const("kv/axis1", np.array([1], np.int64)),
        _const("kv/zero", np.array(0, np.int64)),
        mk("ReduceSum", ["attention_mask", "kv/axis1"], ["kv/total_len"], name="/kv/ReduceSum", keepdims=0),
        mk("Sub", ["kv/total_len", "kv/one"], ["kv/seqlens_k64"], name="/kv/Sub"),
        mk("Cast", ["kv/seqlens_k64"], ["kv/seqlens_k"], name="/kv/Cast", to=i32),
        mk("Gather", ["position_ids", "kv/zero"], ["kv/first_pos"], name="/kv/Gather", axis=1),
        mk("Sub", ["kv/total_len", "kv/first_pos"], ["kv/query_len"], name="/kv/Sub_1"),
        mk("Cast", ["kv/query_len"], ["kv/query_seqlens"], name="/kv/Cast_1", to=i32),
        mk("Shape", ["attention_mask"], ["kv/mask_width"], name="/kv/Shape", start=1, end=2),
        mk("Squeeze", ["kv/mask_width"], ["kv/mask_width0"], name="/kv/Squeeze"),
        mk("Cast", ["kv/mask_width0"], ["kv/total_sequence_length"], name="/kv/Cast_2", to=i32),
    ]
    del i64
    fused = [
        mk(
            "GroupQueryAttention",
            [
                s["q"],
                s["k"],
                s["v"],
                s["past_key"],
                s["past_value"],
                "kv/seqlens_k",
                "kv/total_sequence_length",
                *[""] * 9,
                "kv/query_seqlens",
            ],
            [s["output"], s["present_key"], s["present_value"]],
            name=f"{s['layer']}/GroupQueryAttention",
            domain="com.microsoft",
            num_heads=n_head,
            kv_num_heads=n_head,
        )
        for s in sites
    ]
    _replace_attention(model, sites, fused, prologue)
    return len(sites)


STEP_INVARIANT = "step_invariant"  # the optional input add_step_invariance makes


def add_step_invariance(model: onnx.ModelProto) -> int:
    """A ``step_invariant`` input (int64 scalar; 0 keeps the graph's behaviour) for in-place
    graphs: when 1, every active row gives each ``GroupQueryAttention`` one more query row than it has
    tokens (a copy of its last one: ``Pad``, mode ``edge``), and the extra row's output is
    sliced off. The extra row's key/value land one position past the row's tokens, where
    nothing reads them (the runtime makes the cache buffers one position longer).

    Why: ONNX Runtime's CPU attention multiplies probabilities by V with MLAS's one-row kernel
    when a row has one query and with its GEMM for two or more, and the two sum in another
    order. With the extra row a position's logits are bitwise the same whether it is decoded
    alone, verified in a speculative chunk or beside other rows' chunks; it costs a few percent
    at short contexts and more at long ones (docs/measured.md). Returns the number of layers changed.
    """
    mk = onnx.helper.make_node
    i32, i64 = onnx.TensorProto.INT32, onnx.TensorProto.INT64
    producers, consumers = producers_consumers(model)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if not gqa:
        return 0
    x = STEP_INVARIANT
    prologue = [
        _const("si/zero", np.array(0, np.int64)),
        _const("si/zeros4", np.zeros(4, np.int64)),
        _const("si/zeros1", np.zeros(1, np.int64)),
        _const("si/shape1", np.array([1], np.int64)),
        _const("si/axis1", np.array([1], np.int64)),
        mk("Greater", [x, "si/zero"], ["si/on_b"], name="/si/Greater"),
        mk("Cast", ["si/on_b"], ["si/on"], name="/si/Cast", to=i64),
        mk("Greater", ["kv/query_len", "si/zero"], ["si/active_b"], name="/si/Greater_1"),
        mk("Cast", ["si/active_b"], ["si/active"], name="/si/Cast_1", to=i64),
        mk("Mul", ["si/active", "si/on"], ["si/extra64"], name="/si/Mul"),
        mk("Cast", ["si/extra64"], ["si/extra"], name="/si/Cast_2", to=i32),
        mk("Add", ["kv/seqlens_k", "si/extra"], ["si/seqlens_k"], name="/si/Add"),
        mk("Add", ["kv/query_seqlens", "si/extra"], ["si/query_seqlens"], name="/si/Add_1"),
        mk("Cast", ["si/on"], ["si/on32"], name="/si/Cast_3", to=i32),
        mk("Add", ["kv/total_sequence_length", "si/on32"], ["si/total"], name="/si/Add_2"),
        mk("Reshape", ["si/on", "si/shape1"], ["si/on1"], name="/si/Reshape"),
        # Pad's pads for (B, S, E): [0, 0, 0, 0, on, 0]
        mk("Concat", ["si/zeros4", "si/on1", "si/zeros1"], ["si/pads"], name="/si/Concat", axis=0),
        mk("Shape", ["input_ids"], ["si/S1"], name="/si/Shape", start=1, end=2),
    ]
    nodes = list(model.graph.node)
    added: list[onnx.NodeProto] = list(prologue)
    for n in gqa:
        sources = [producers.get(n.input[i]) for i in range(3)]
        split = sources[0]
        if (
            split is not None
            and split.op_type == "Split"
            and all(s is split for s in sources)
            and list(split.output) == list(n.input[:3])
        ):
            padded = f"{split.input[0]}/si_padded"
            added.append(
                mk("Pad", [split.input[0], "si/pads"], [padded], name=f"{split.name}/si_Pad", mode="edge")
            )
            split.input[0] = padded
        else:
            for i in range(3):
                padded = f"{n.input[i]}/si_padded"
                added.append(
                    mk("Pad", [n.input[i], "si/pads"], [padded], name=f"{n.name}/si_Pad_{i}", mode="edge")
                )
                n.input[i] = padded
        n.input[5], n.input[6], n.input[16] = "si/seqlens_k", "si/total", "si/query_seqlens"
        out = n.output[0]
        n.output[0] = f"{out}/si_full"
        added.append(
            mk("Slice", [n.output[0], "si/zeros1", "si/S1", "si/axis1"], [out], name=f"{n.name}/si_Slice")
        )
    del consumers
    model.graph.node.extend(added)
    model.graph.input.append(onnx.helper.make_tensor_value_info(x, i64, []))
    _topological_sort(model)
    # shapes recorded for the padded tensors no longer hold (S + 1 rows): let ORT infer them
    stale = {t for n in nodes if n.op_type in ("Split", "GroupQueryAttention") for t in (*n.input, *n.output)}
    kept = [v for v in model.graph.value_info if v.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return len(gqa)


def add_logits_to_keep(model: onnx.ModelProto, inplace: bool) -> None:
    """A ``logits_to_keep`` input (int64 scalar) in the style of transformers: the LM head runs
    only on the last ``N`` positions of each row (0 = every position, for perplexity and parity).

    Concatenating form: rows are left-padded, so their last positions are the chunk's last ones.
    In-place form: rows are right-padded chunks of ``query_seqlens`` tokens, so each row keeps
    its own last ``N`` (a per-row GatherElements)::

        hidden (B, S, E) -> Gather(axis 1, idx) -> LM head MatMul -> logits (B, N, V)
    """
    producers, _ = producers_consumers(model)
    head = producers["logits"]
    while head.op_type not in ("MatMul", "FusedMatMul"):  # e.g. a Cast after the head
        head = producers[head.input[0]]
    hidden = head.input[0]
    mk = onnx.helper.make_node
    nodes = [
        _const("keep/zero", np.array(0, np.int64)),
        _const("keep/one", np.array(1, np.int64)),
        mk("Shape", ["input_ids"], ["keep/S1"], name="/keep/Shape", start=1, end=2),
        mk("Squeeze", ["keep/S1"], ["keep/S"], name="/keep/Squeeze"),
        mk("Equal", ["logits_to_keep", "keep/zero"], ["keep/all"], name="/keep/Equal"),
        mk("Where", ["keep/all", "keep/S", "logits_to_keep"], ["keep/N"], name="/keep/Where"),
        mk("Range", ["keep/zero", "keep/N", "keep/one"], ["keep/range"], name="/keep/Range"),
        mk("Sub", ["keep/range", "keep/N"], ["keep/offsets"], name="/keep/Sub"),  # -N .. -1
    ]
    if inplace:
        nodes += [
            _const("keep/axis1", np.array([1], np.int64)),
            _const("keep/axis2", np.array([2], np.int64)),
            mk("Where", ["keep/all", "keep/S", "kv/query_len"], ["keep/end"], name="/keep/Where_1"),
            mk("Unsqueeze", ["keep/end", "keep/axis1"], ["keep/end2"], name="/keep/Unsqueeze"),
            mk("Add", ["keep/end2", "keep/offsets"], ["keep/idx_raw"], name="/keep/Add"),  # (B, N)
            mk("Max", ["keep/idx_raw", "keep/zero"], ["keep/idx"], name="/keep/Max"),
            mk("Unsqueeze", ["keep/idx", "keep/axis2"], ["keep/idx3"], name="/keep/Unsqueeze_1"),
            mk("Shape", [hidden], ["keep/hshape"], name="/keep/Shape_1", start=2, end=3),
            mk("Shape", ["keep/idx"], ["keep/ishape"], name="/keep/Shape_2"),
            mk("Concat", ["keep/ishape", "keep/hshape"], ["keep/eshape"], name="/keep/Concat", axis=0),
            mk("Expand", ["keep/idx3", "keep/eshape"], ["keep/index"], name="/keep/Expand"),
            mk(
                "GatherElements", [hidden, "keep/index"], ["keep/hidden"], name="/keep/GatherElements", axis=1
            ),
        ]
    else:
        nodes += [
            mk("Add", ["keep/S", "keep/offsets"], ["keep/idx"], name="/keep/Add"),
            mk("Gather", [hidden, "keep/idx"], ["keep/hidden"], name="/keep/Gather", axis=1),
        ]
    at = list(model.graph.node).index(head)
    for i, n in enumerate(nodes):
        model.graph.node.insert(at + i, n)
    head.input[0] = "keep/hidden"
    model.graph.input.append(onnx.helper.make_tensor_value_info("logits_to_keep", onnx.TensorProto.INT64, []))


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
