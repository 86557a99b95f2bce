"""``gpt2-edge export``: a checkpoint to an ONNX bundle, validated against PyTorch."""

from __future__ import annotations

import argparse

from ..export.writer import EXTERNAL_DATA_THRESHOLD
from ..runtime.manifest import TARGETS


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export``."""
    p = sub.add_parser("export", help="checkpoint -> ONNX bundle (validated against PyTorch)")
    p.add_argument("model", nargs="?", help="checkpoint dir or hub id (default: the shipped model)")
    p.add_argument("-o", "--output", required=True, help="bundle directory to write")
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="ort",
        help="ort = ONNX Runtime fusions; tensorrt = standard ONNX ops only",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default 18, at least 17)")
    p.add_argument(
        "--external-data-threshold",
        type=int,
        default=EXTERNAL_DATA_THRESHOLD,
        help="weights above this many bytes go to model.onnx.data (default: 1e9)",
    )
    p.add_argument(
        "--no-fuse-attention",
        action="store_true",
        help="ort target: keep attention as plain ops (no MultiHeadAttention)",
    )
    p.add_argument(
        "--lora",
        metavar="[NAME=]DIR",
        help="merge a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into the model",
    )
    p.add_argument(
        "--lora-slots",
        type=int,
        default=0,
        metavar="N",
        help="the graph takes up to N LoRA adapters at run time (load_model(lora=...), serve --lora)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=8,
        metavar="R",
        help="with --lora-slots: the largest adapter rank the slots take (default 8)",
    )
    p.add_argument("--no-validate", action="store_true", help="skip the parity check (not recommended)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.bundle import export_bundle  # torch: only when the command runs

    out = export_bundle(
        args.model,
        args.output,
        target=args.target,
        opset=args.opset,
        external_data_threshold=args.external_data_threshold,
        overwrite=args.overwrite,
        validate=not args.no_validate,
        fuse_attention=not args.no_fuse_attention,
        lora=args.lora,
        lora_slots=args.lora_slots,
        lora_rank=args.lora_rank,
        progress=not args.quiet,
    )
    print(f"bundle written: {out}")
    return 0
