"""A bundle's weights memory-mapped by ONNX Runtime instead of parsed and copied (CPU provider).

``mapped_model`` reads ``model.onnx``'s protobuf structure (never its weights) and writes a graph
whose large initializers are ONNX external data pointing at their own bytes inside ``model.onnx``
itself. ONNX Runtime then maps them (file-backed pages, shared with the page cache; only those
touched are resident) and frees each mapping once its consumers have prepacked it, instead of
holding the protobuf and a copy of every tensor while loading. The bundle format is unchanged.

Why a protobuf walker of its own: the runtime is torch- and onnx-free (numpy, onnxruntime,
tokenizers), and ONNX Runtime's documented alternatives keep more: an ORT-format model with
``session.use_ort_model_bytes_for_initializers`` keeps the whole file in memory next to the
prepacked copies (the Python API takes bytes), and an external-data bundle would still keep a
tied embedding resident beside its head's packed copy. Two rewrites do what those cannot:

- a tied LM head (an fp32 table read by a Gather and by a MatMul/FusedMatMul/Gemm that ONNX
  Runtime prepacks) reads a second mapping of the same bytes, which the prepacking frees; the
  Gather touches only the rows it reads (147 MiB at 124M fp32);
- the node that reads the largest prepacked weight (the LM head) comes first in the graph:
  ONNX Runtime prepacks in node order and each weight's pages are resident until it is packed,
  so packing the head last held it twice on top of everything else (a +147 MiB load peak at
  fp32, +37 at int8). ONNX Runtime sorts the nodes itself for running them.

Anything this reader does not understand returns None, and the backend loads the file by path.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAP_MIN_BYTES = 4096  # initializers at least this large are mapped from the file, not copied

# ONNX protobuf field numbers: ModelProto.graph; GraphProto.node, .initializer; NodeProto.input,
# .op_type; TensorProto.data_type, .name, .raw_data, .external_data, .data_location.
_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INIT = 7, 1, 5
_NODE_INPUT, _NODE_OP = 1, 4
_T_TYPE, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 2, 8, 9, 13, 14
_FLOAT = 1  # TensorProto.FLOAT: the CPU provider prepacks float MatMul/Gemm weights (MLAS SGEMM)
_PREPACKED_B = ("MatMul", "FusedMatMul", "Gemm")  # float CPU kernels that prepack their input 1
PREPACKED_SUFFIX = "/prepacked"  # the tied head's own mapping of the embedding table


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; True when it
    ran). The backend calls it once its session is loaded and at its first KV cache (after the
    caller loaded its tokenizer): both parsers free tens of MiB in blocks glibc keeps for reuse.
    Later allocations are not affected. Skipped off glibc and with ``GPT2_EDGE_MALLOC_TRIM=0``."""
    if os.environ.get("GPT2_EDGE_MALLOC_TRIM", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS, Windows: other allocators
            return False
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        return False
    return True


@dataclass(frozen=True)
class MappedModel:
    """A model's graph with its weights left in the file: ``proto`` (bytes for ONNX Runtime)
    names ``bytes_mapped`` bytes of initializers as external data inside ``path`` itself."""

    proto: bytes
    path: Path
    bytes_mapped: int
    untied: tuple[str, ...]  # tables given a second mapping for a prepacked head
    first: tuple[str, ...]  # the weights whose consumers were moved to the front (packed first)


def mapped_model(path: str | Path, min_bytes: int = MAP_MIN_BYTES, untie: bool = True) -> MappedModel | None:
    """``path`` (an ONNX file with its weights inline) rewritten so that every initializer of
    ``min_bytes`` or more is external data at its own offset in ``path`` (module docstring).
    ``untie``: give a tied fp32 head its own mapping (only where prepacking is on: otherwise the
    two mappings would both stay resident). None when the file has no inline initializer that
    large, cannot be read, or is not an ONNX model this reader understands: load it by path."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return None
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None  # ONNX Runtime's own load says what is wrong with the file
    try:
        if hasattr(buf, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            buf.madvise(mmap.MADV_RANDOM)  # headers only: no read-ahead into the weights
        return _rewrite(buf, path, min_bytes, untie)
    except (ValueError, IndexError):  # UnicodeDecodeError is a ValueError
        return None
    finally:
        buf.close()


# protobuf wire format ----------------------------------------------------------------------------
def _varint(buf: Any, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError(f"protobuf varint longer than 10 bytes at byte {i}")


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _fields(buf: Any, start: int, end: int):
    """Protobuf fields of ``buf[start:end]``: (number, wire type, start, payload start, end)."""
    i = start
    while i < end:
        key, j = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            k = _varint(buf, j)[1]
            yield number, wire, i, j, k
        elif wire == 2:
            n, k = _varint(buf, j)
            yield number, wire, i, k, k + n
            k += n
        elif wire in (1, 5):
            k = j + (8 if wire == 1 else 4)
            yield number, wire, i, j, k
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")
        if k > end:
            raise ValueError(f"protobuf field at byte {i} runs past its message (truncated file?)")
        i = k


def _len_field(number: int, payload: bytes) -> bytes:
    return _uvarint(number << 3 | 2) + _uvarint(len(payload)) + payload


def _string(buf: Any, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode()


# the rewrite -----------------------------------------------------------------------------------
@dataclass
class _Node:
    span: tuple[int, int]  # the NodeProto's payload in the file
    op: str
    inputs: list[str]


@dataclass
class _Init:
    fields: bytes  # the TensorProto's fields but its data and data_location
    offset: int  # raw_data's payload in the file
    length: int
    dtype: int


def _read_node(buf: Any, start: int, end: int) -> _Node:
    op, inputs = "", []
    for number, wire, _, p, e in _fields(buf, start, end):
        if number == _NODE_OP and wire == 2:
            op = _string(buf, p, e)
        elif number == _NODE_INPUT and wire == 2:
            inputs.append(_string(buf, p, e))
    return _Node((start, end), op, inputs)


def _read_init(buf: Any, start: int, end: int) -> tuple[str | None, _Init | None]:
    """An inline initializer's name and layout; None for the layout when its data is not one
    ``raw_data`` field (typed fields, or already external)."""
    kept, raw, name, external, dtype = bytearray(), None, None, False, 0
    for number, wire, s, p, e in _fields(buf, start, end):
        if number == _T_RAW and wire == 2:
            raw = (p, e - p)
            continue
        if number == _T_EXTERNAL or (number == _T_LOCATION and _varint(buf, p)[0] != 0):
            external = True
        if number == _T_LOCATION:
            continue  # written again for a mapped tensor
        if number == _T_NAME and wire == 2:
            name = _string(buf, p, e)
        elif number == _T_TYPE and wire == 0:
            dtype = _varint(buf, p)[0]
        kept += buf[s:e]
    if raw is None or external:
        return name, None
    return name, _Init(bytes(kept), raw[0], raw[1], dtype)


def _external(number: int, name: str, init: _Init, path: Path) -> bytes:
    """The TensorProto of ``init`` named ``name``, its data external at its offset in ``path``."""
    fields = bytearray()
    for n, w, s, _, e in _fields(init.fields, 0, len(init.fields)):
        fields += _len_field(_T_NAME, name.encode()) if n == _T_NAME and w == 2 else init.fields[s:e]
    for key, value in (("location", path.name), ("offset", str(init.offset)), ("length", str(init.length))):
        fields += _len_field(_T_EXTERNAL, _len_field(1, key.encode()) + _len_field(2, value.encode()))
    fields += _uvarint(_T_LOCATION << 3) + _uvarint(1)  # DataLocation.EXTERNAL
    return _len_field(number, bytes(fields))


def _node_with(buf: Any, node: _Node, renamed: dict[str, str]) -> bytes:
    """``node``'s NodeProto with input 1 renamed per ``renamed`` (a tied head's own mapping)."""
    out, index = bytearray(), 0
    for number, wire, s, p, e in _fields(buf, *node.span):
        if number == _NODE_INPUT and wire == 2:
            value = _string(buf, p, e)
            out += (
                _len_field(_NODE_INPUT, renamed[value].encode())
                if index == 1 and value in renamed
                else buf[s:e]
            )
            index += 1
        else:
            out += buf[s:e]
    return _len_field(_GRAPH_NODE, bytes(out))


def _rewrite(buf: mmap.mmap, path: Path, min_bytes: int, untie: bool) -> MappedModel | None:
    graph_span = None
    for number, wire, _, p, e in _fields(buf, 0, len(buf)):
        if number == _MODEL_GRAPH and wire == 2:
            graph_span = (p, e)
    if graph_span is None:
        return None
    nodes: list[_Node] = []
    mapped: dict[str, _Init] = {}
    for number, wire, _, p, e in _fields(buf, *graph_span):
        if number == _GRAPH_NODE and wire == 2:
            nodes.append(_read_node(buf, p, e))
        elif number == _GRAPH_INIT and wire == 2:
            name, init = _read_init(buf, p, e)
            if name is not None and init is not None and init.length >= min_bytes:
                mapped[name] = init
    if not mapped:
        return None
    gathered = {n.inputs[0] for n in nodes if n.op == "Gather" and n.inputs}
    renamed: dict[str, str] = {}
    if untie:
        heads = {n.inputs[1] for n in nodes if n.op in _PREPACKED_B and len(n.inputs) > 1}
        renamed = {
            t: t + PREPACKED_SUFFIX
            for t in sorted(heads & gathered)
            if t in mapped and mapped[t].dtype == _FLOAT
        }
    # The largest weight read (as input 1+, not by a Gather) is packed first: see the docstring.
    weights = {i for n in nodes for i in n.inputs[1:] if i in mapped and i not in gathered}
    weights |= set(renamed)  # a tied table's head reads its own mapping
    largest = max(weights, key=lambda t: mapped[t].length, default=None)
    is_first = [largest is not None and largest in n.inputs[1:] for n in nodes]

    graph, nodes_written = bytearray(), False
    for number, wire, s, p, e in _fields(buf, *graph_span):
        if number == _GRAPH_NODE and wire == 2:
            if not nodes_written:  # at the first node: the first ones, then the rest in order
                order = [n for n, f in zip(nodes, is_first, strict=True) if f]
                order += [n for n, f in zip(nodes, is_first, strict=True) if not f]
                for n in order:
                    graph += _node_with(buf, n, renamed)
                nodes_written = True
            continue
        if number == _GRAPH_INIT and wire == 2:
            name, _ = _read_init(buf, p, e)
            if name in mapped:
                graph += _external(_GRAPH_INIT, name, mapped[name], path)
                if name in renamed:
                    graph += _external(_GRAPH_INIT, renamed[name], mapped[name], path)
                continue
        graph += buf[s:e]
    model = bytearray()
    for _, _, s, p, e in _fields(buf, 0, len(buf)):
        model += _len_field(_MODEL_GRAPH, bytes(graph)) if (p, e) == graph_span else buf[s:e]
    first = (renamed.get(largest, largest),) if largest is not None and any(is_first) else ()
    return MappedModel(
        bytes(model), path, sum(m.length for m in mapped.values()), tuple(sorted(renamed)), first
    )
