"""Graph checks and clean-up both targets share: the contract's dim and node names, the op census
and the ops TensorRT takes, saving with external data. The ``ort`` target's fusions are in
``fusions``. Everything here works on ``onnx.ModelProto`` or files; no torch.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import onnx

from .. import contract
from ..errors import Gpt2EdgeError

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
KV_FORMS = ("inplace", "concat")
ORT_FUSED_OPS = (
    "GroupQueryAttention",
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


class GraphError(Gpt2EdgeError):
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


def name_dims(model: onnx.ModelProto, specs: list[contract.TensorSpec]) -> None:
    """Give inputs/outputs the contract's symbolic dim names (the exporter writes e.g. ``past + seq``)."""
    by_name = {s.name: s for s in specs}
    for vi in [*model.graph.input, *model.graph.output]:
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


DATA_ALIGNMENT = 4096  # tensors start on page boundaries in .data files, so they can be mapped
INLINE_MAX_BYTES = 1024  # smaller tensors stay inside model.onnx (onnx.save's own threshold)


def save_model(model: onnx.ModelProto, dst: Path, external_data: bool, base_dir: Path | None = None) -> None:
    """Save, with all weights in ``<name>.data`` when ``external_data`` (past protobuf's 2 GB).

    ``model`` may name external data under ``base_dir`` (a graph loaded with
    ``load_external_data=False``): its tensors are copied one at a time, never all loaded, so
    saving a multi-GB model takes memory for its largest tensor only.
    """
    dst = Path(dst)
    external = [t for t in _initializers(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external and base_dir is None:
        raise GraphError(f"{len(external)} tensors name external data, but no base_dir to read it from")
    if not external_data:
        for t in external:  # a model under the threshold: its weights go inline
            t.raw_data = _read_external(t, Path(base_dir))
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
        onnx.save_model(model, str(dst))
        return
    data = dst.with_name(dst.name + ".data")
    for t in external:
        if (Path(base_dir) / _external_info(t)["location"]).resolve() == data.resolve():
            raise GraphError(f"{data} would overwrite the external data it is read from")
    with open(data, "wb") as out:
        for t in _initializers(model):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                blob = _read_external(t, Path(base_dir))
            elif t.HasField("raw_data") and len(t.raw_data) >= INLINE_MAX_BYTES:
                blob = t.raw_data
            else:
                continue
            offset = -out.tell() % DATA_ALIGNMENT + out.tell()
            out.seek(offset)
            out.write(blob)
            del blob
            t.ClearField("raw_data")
            _point_at(t, data.name, offset, out.tell() - offset)
    onnx.save_model(model, str(dst))


def _initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return list(model.graph.initializer)


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _read_external(t: onnx.TensorProto, base_dir: Path) -> bytes:
    info = _external_info(t)
    with open(base_dir / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read()


def _point_at(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = onnx.TensorProto.EXTERNAL
