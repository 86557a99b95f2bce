"""The one tolerance table every check uses (DESIGN.md, "Tolerances").

Why these numbers: fp32 kernels in different libraries reorder sums, which moves logits of
magnitude ~10 by ~1e-6..1e-5; 1e-4 (vs transformers) and 1e-3 (vs ONNX Runtime, whose fused
kernels reorder more) leave one to two orders of margin while still catching any real
mistake (a wrong GELU variant alone moves logits by ~5e-4 on a trained model).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    max_abs_logits: float | None  # None = report only
    min_top1_agreement: float | None  # fraction in [0, 1]; None = report only
    greedy_identical: bool  # greedy tokens must be identical
    max_ppl_increase: float | None = None  # relative perplexity gate vs fp32, e.g. 0.02 = +2%


TOLERANCES: dict[str, Tolerance] = {
    "reference_vs_transformers": Tolerance(1e-4, 1.0, True),
    "fp32": Tolerance(1e-3, 1.0, True),  # ONNX fp32 vs the PyTorch reference
    "fp16": Tolerance(None, 0.99, False, 0.005),
    "bf16": Tolerance(None, 0.99, False, 0.005),  # the half-width class: fp16's gate (issue 23)
    "int8": Tolerance(None, None, False, 0.02),
    "int4": Tolerance(None, None, False, 0.10),
}
