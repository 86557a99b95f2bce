"""INT4 (and INT8) block-wise weight-only quantization with ONNX Runtime's ``MatMulNBits``.

Every MatMul with a constant weight (the untied LM head included) gets 4-bit (or 8-bit)
symmetric weights in blocks of ``block_size`` along K with one fp scale per block;
activations stay float in the graph. ``accuracy_level=4`` lets the CPU kernel compute in int8
internally, which measured 2x faster on the 124M shape (notes/export-facts.md): it quantizes the
activations per row and block of K, so no row or position sees another's values.

Batch invariance (a row's logits the same alone or in a batch) was measured bitwise with blocks of
32 on the tiny, default and 124M shapes; with blocks of 128 the CPU kernel takes another path for
one row than for several (8-bit at 124M: 0.03 apart). Measure again before changing ``block_size``
(tests/runtime/test_batch_invariance.py).

**The prompt graph** (``prompt.onnx``, int4 bundles): ``MatMulNBits`` is fast at one row (decode
reads half the bytes of int8) but slow at many: at 896 prompt tokens on a 2-core Zen 4 it took 69%
of the prefill, about 2x what MLAS's u8 x s8 GEMM (``MatMulIntegerToFloat``) takes for the same
MatMuls (profile: ``python -m benchmarks.profile_ops``). So an int4 bundle carries a second graph
with the same inputs and outputs for prompt chunks: the blocks' MatMuls in per-row dynamic int8
(``int8.per_row_int8``, from the same fp32 weights), the LM head and the embedding tables the int4
graph's own. The runtime runs prompt chunks (``prefill``/``extend``) through it and every generated
token (``decode``/``verify``) through the int4 graph, both over one KV cache; the accuracy gate
measures that mix (``accuracy.served_perplexity``). It costs the int8 weights in memory beside the
int4 ones (+85 MiB at 124M); ``quantize --no-prompt-graph`` leaves it out, and
``OrtBackend(prompt_graph=False)`` ignores it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from ..export.fusions import untie_head, working_directory
from ..export.graph import producers_consumers, save_model
from .int8 import per_row_int8

PROMPT_FILE = "prompt.onnx"


def _nbits_quantizer() -> type:
    """ONNX Runtime's ``MatMulNBitsQuantizer``, imported without what its module does at import:
    ``logging.basicConfig(level=INFO)``, a root handler on the ``sys.stderr`` of that moment and
    every library's INFO messages printed from then on (in an app, and in a test whose captured
    stream is closed later: "Logging error ... I/O operation on closed file")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    return MatMulNBitsQuantizer


def to_nbits(
    src: Path,
    dst: Path,
    bits: int,
    external_data: bool,
    block_size: int = 32,
    accuracy_level: int | None = 4,
    prompt_graph: bool = False,
) -> dict:
    """``bits``-bit ``MatMulNBits`` weights. The fp32 weights are read from ``src``'s external
    data one at a time (the graph is loaded without them), so the peak is about the quantized
    model plus one fp32 weight. ``prompt_graph``: also write ``PROMPT_FILE`` beside ``dst``
    (module docstring)."""
    MatMulNBitsQuantizer = _nbits_quantizer()

    src, dst = Path(src).resolve(), Path(dst).resolve()
    model = onnx.load(str(src), load_external_data=False)
    # 4-bit also quantizes the embedding tables (GatherBlockQuantized); ORT does that at 4 bits only.
    ops = ("MatMul", "Gather") if bits == 4 else ("MatMul",)
    # ERROR: it warns that the opset is raised to 21 "but may not be a valid model"; the result is
    # checked by running it (contract, accuracy gate), which that warning cannot know.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    with working_directory(src.parent):  # where ORT's quantizer finds each weight's data
        untied = untie_head(model)
        q = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=accuracy_level,
            op_types_to_quantize=ops,
        )
        q.process()
        prompt = None
        if prompt_graph:
            prompt = prompt_model(q.model.model, onnx.load(str(src), load_external_data=False), bits)
            replaced = per_row_int8(prompt)  # reads the fp32 weights from src's directory
    save_model(q.model.model, dst, external_data, base_dir=src.parent)
    extra = {}
    if prompt is not None:
        save_model(prompt, dst.parent / PROMPT_FILE, external_data, base_dir=src.parent)
        extra = {
            "prompt_graph": {
                "file": PROMPT_FILE,
                "matmuls": f"{replaced} per-row dynamic int8 (MatMulIntegerToFloat) from the fp32 weights",
                "kept": "the LM head and embedding tables of the int4 graph",
                "runs": "prompt chunks (prefill, extend); generated tokens run the int4 graph",
            }
        }
    return {
        "method": "onnxruntime MatMulNBitsQuantizer",
        "bits": bits,
        "block_size": block_size,
        "symmetric": True,
        "accuracy_level": accuracy_level,
        "head_untied": untied,
        "op_types": list(ops),
        "weights": f"int{bits} symmetric, blocks of {block_size} along K",
        "activations": (
            "float in the graph; the CPU kernel quantizes them to int8 per row and block (accuracy_level 4)"
            if accuracy_level == 4
            else "float"
        ),
        **extra,
    }


def prompt_model(nbits: onnx.ModelProto, fp32: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    """A copy of the quantized graph ``nbits`` whose ``MatMulNBits`` nodes, the LM head's (the one
    that makes ``logits``) excepted, are plain MatMuls again over their fp32 weights from ``fp32``
    (external data left unread), ready for ``per_row_int8``."""
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(nbits)
    producers, _ = producers_consumers(model)
    head = producers.get("logits")
    while head is not None and head.op_type != "MatMulNBits":  # e.g. a Cast or Reshape after it
        head = producers.get(head.input[0])
    head_name = head.name if head is not None else None
    weights = {t.name: t for t in fp32.graph.initializer}
    suffix = f"_Q{bits}"
    nodes = []
    for n in model.graph.node:
        if n.op_type != "MatMulNBits" or n.name == head_name or not n.input[1].endswith(suffix):
            nodes.append(n)
            continue
        name = n.input[1][: -len(suffix)]
        if name not in weights:
            nodes.append(n)
            continue
        model.graph.initializer.append(weights[name])
        nodes.append(
            helper.make_node("MatMul", [n.input[0], name], list(n.output), name=n.name[: -len(suffix)])
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model
