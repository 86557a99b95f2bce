"""``gpt2-edge build-engine`` and ``gpt2-edge doctor``: thin argparse layers over ``builder`` and
``doctor``. Registered by ``gpt2_edge.cli``; errors reach the user as one line (ValueError)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..runtime.trt.cuda import CudaError
from ..runtime.trt.errors import EngineError
from ..runtime.trt.shapes import DEFAULT_MAX_BATCH, Limits
from .builder import BuildOptions, build_engine
from .doctor import gather, recommend, render, report


def add_build_engine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-engine",
        help="build a TensorRT engine for this GPU from a tensorrt-target bundle (fp32, fp16, int8-qdq)",
        description="Parse the bundle's ONNX graph with TensorRT's parser and build a strongly typed engine "
        "for this GPU and TensorRT version, with explicit shape profiles. Run it on the machine that "
        "will run the engine (a Jetson builds its own).",
    )
    p.add_argument("bundle", help="a bundle of the tensorrt target (gpt2-edge export --target tensorrt)")
    p.add_argument(
        "-o", "--output", help="engine directory (default: BUNDLE/engines/<gpu>-sm<cc>-trt<version>)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help="most sequences decoded together: batch rows, beams, server slots "
        f"(default {DEFAULT_MAX_BATCH})",
    )
    p.add_argument("--max-context", type=int, help="most tokens per sequence (default: the model's context)")
    p.add_argument(
        "--opt-batch", type=int, default=1, help="the batch size kernels are tuned for (default 1)"
    )
    p.add_argument(
        "--lanes",
        type=int,
        default=1,
        help="KV caches that can run at the same time, e.g. concurrent generate calls (default 1; "
        "each lane adds profiles and build time)",
    )
    p.add_argument(
        "--workspace-mib", type=int, help="cap on the builder's scratch memory (Jetsons with 8 GB: 512)"
    )
    p.add_argument(
        "--timing-cache",
        help="kernel timing cache to reuse and update (default: timing.cache in the engine directory)",
    )
    p.add_argument(
        "--single-profile",
        action="store_true",
        help="one shape profile per lane instead of separate prefill and decode profiles",
    )
    p.add_argument("--tf32", action="store_true", help="fp32 bundles: allow TF32 math (faster, ~1e-3 off)")
    p.add_argument("--verbose", action="store_true", help="keep TensorRT's informational messages")
    p.set_defaults(func=_cmd_build_engine)


def _cmd_build_engine(args: argparse.Namespace) -> int:
    options = BuildOptions(
        limits=Limits(
            max_batch=args.max_batch,
            max_context=args.max_context,
            opt_batch=args.opt_batch,
            lanes=args.lanes,
            split_phases=not args.single_profile,
        ),
        workspace_mib=args.workspace_mib,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        tf32=args.tf32,
        verbose=args.verbose,
    )
    try:
        out = build_engine(args.bundle, args.output, options)
    except CudaError as e:
        raise EngineError(f"CUDA: {e}") from None
    print(f"run it: Generator.from_bundle({str(args.bundle)!r}, provider='trt-engine')  (or pass {out})")
    return 0


def add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="what this machine can run (ONNX Runtime, GPU, CUDA, TensorRT, CPU features) and which "
        "bundle and provider to use",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    facts = gather()
    rec = recommend(facts)
    print(json.dumps(report(facts, rec), indent=2) if args.json else render(facts, rec))
    return 0
