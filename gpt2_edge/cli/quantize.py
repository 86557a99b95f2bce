"""``gpt2-edge quantize``: an fp32 bundle to an fp16 / int8 / int4 bundle, behind an accuracy gate."""

from __future__ import annotations

import argparse

from ..runtime.manifest import PRECISIONS  # not quantize.pipeline: it imports onnx


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``quantize``."""
    p = sub.add_parser("quantize", help="fp32 bundle -> fp16 / int8 / int4 bundle, behind an accuracy gate")
    p.add_argument("bundle", help="an fp32 bundle (from gpt2-edge export)")
    p.add_argument("--precision", required=True, choices=[name for name in PRECISIONS if name != "fp32"])
    p.add_argument("-o", "--output", required=True, help="bundle directory to write")
    p.add_argument(
        "--calib",
        help="UTF-8 calibration text (needed by int8-qdq; default-model bundles: its shipped sample)",
    )
    p.add_argument(
        "--eval",
        help="held-out UTF-8 text for the accuracy gate (default-model bundles: its shipped sample)",
    )
    p.add_argument("--force", action="store_true", help="write the variant even if it misses its gate")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--smooth-alpha", type=float, default=0.5, help="int8-qdq: SmoothQuant migration strength")
    p.add_argument("--no-smooth", action="store_true", help="int8-qdq: no SmoothQuant (naive static int8)")
    p.add_argument("--per-tensor", action="store_true", help="int8-qdq: per-tensor weight scales")
    p.add_argument(
        "--calibration",
        choices=["percentile", "minmax"],
        default="percentile",
        help="int8-qdq: activation range estimator",
    )
    p.add_argument(
        "--quantize-head",
        action="store_true",
        help="int8-qdq: quantize the LM head too (its most sensitive MatMul)",
    )
    p.add_argument("--exclude", action="append", default=[], help="int8-qdq: MatMul node to keep in float")
    p.add_argument(
        "--no-prompt-graph",
        action="store_true",
        help="int4: no int8 graph for prompt chunks (less memory, about twice the time to first token)",
    )
    p.add_argument("--threads", type=int, help="CPU threads for calibration and the gate")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..quantize.int8 import QdqOptions  # imports onnx
    from ..quantize.pipeline import quantize_bundle  # imports onnx

    qdq = QdqOptions(
        smooth_alpha=None if args.no_smooth else args.smooth_alpha,
        per_channel=not args.per_tensor,
        exclude=tuple(args.exclude),
        quantize_head=args.quantize_head,
        calibrate_method=args.calibration,
    )
    out, _ = quantize_bundle(
        args.bundle,
        args.precision,
        args.output,
        calib_text=args.calib,
        eval_text=args.eval,
        force=args.force,
        overwrite=args.overwrite,
        qdq=qdq,
        threads=args.threads,
        progress=not args.quiet,
        prompt_graph=not args.no_prompt_graph,
    )
    print(f"bundle written: {out}")
    return 0
