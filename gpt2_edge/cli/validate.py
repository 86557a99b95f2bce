"""``gpt2-edge validate``: re-check a bundle's parity against its PyTorch checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import Gpt2EdgeError
from ..runtime.bundle import Bundle


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``validate``."""
    p = sub.add_parser("validate", help="re-check a bundle's parity against its PyTorch checkpoint")
    p.add_argument("bundle")
    p.add_argument("model", nargs="?", help="checkpoint (default: the one the bundle was made from)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.validate import check_same_dims, validate_onnx  # imports torch
    from ..model.checkpoint import load_checkpoint  # imports torch

    b = Bundle.load(args.bundle)
    source = args.model or b.manifest.made_by.source
    if args.model is None and (source is None or not Path(source).is_dir()):
        raise Gpt2EdgeError(f"the bundle's source checkpoint {source!r} is not here; pass MODEL")
    check_same_dims(b, source)
    tol = {"fp32": "fp32"}.get(b.precision, b.precision.split("-")[0])
    rep = validate_onnx(
        b.model_file,
        load_checkpoint(source),
        tolerance=tol,
        raise_on_failure=False,
        kv_dtype=b.inputs[3].dtype,
        kv_cache=b.kv_form,
    )
    print(
        f"{b.path} vs {source} ({tol} tolerance): max |dlogits| {rep.max_abs_logits:.2e}, "
        f"top-1 {100 * rep.top1_agreement:.2f}%, greedy identical {rep.greedy_identical}: "
        f"{'PASS' if rep.passed else 'FAIL'}"
    )
    return 0 if rep.passed else 1
