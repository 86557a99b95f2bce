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
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from ..export.fusions import untie_head, working_directory
from ..export.graph import save_model


def to_nbits(
    src: Path, dst: Path, bits: int, external_data: bool, block_size: int = 32, accuracy_level: int | None = 4
) -> dict:
    """``bits``-bit ``MatMulNBits`` weights. The fp32 weights are read from ``src``'s external
    data one at a time (the graph is loaded without them), so the peak is about the quantized
    model plus one fp32 weight."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

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
    save_model(q.model.model, dst, external_data, base_dir=src.parent)
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
    }
