"""``gpt2-edge eval``: sliding-window perplexity of a bundle or checkpoint on a text file; a
quantized bundle is also compared with its fp32 reference. A bundle's eval imports no torch."""

from __future__ import annotations

import argparse
import json

from ..errors import Gpt2EdgeError
from ..model.evaluate import bundle_perplexity, checkpoint_perplexity, read_tail
from ..quantize.accuracy import compare, eval_prompts
from ..runtime.bundle import Bundle
from ..runtime.session import OrtBackend
from ._common import is_bundle

MIN_COMPARE_TOKENS = 64  # the fewest held-out tokens a comparison with the reference is judged on


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval``."""
    p = sub.add_parser("eval", help="sliding-window perplexity on a text file")
    p.add_argument(
        "model", nargs="?", help="bundle dir, checkpoint dir or hub id (default: the shipped model)"
    )
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument(
        "--tail",
        type=float,
        default=1.0,
        help="evaluate only the last fraction of the file (0.1 = the training split's held-out part)",
    )
    p.add_argument("--max-length", type=int, help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, help="window stride (default: max-length / 2)")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument(
        "--reference",
        help="fp32 bundle to compare a quantized bundle with (default: the one "
        "it was made from, when present): adds KL, top-1 and greedy agreement",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    reference = args.reference if args.reference is not None else _made_from(args.model)
    if reference is not None:
        return _compare_with(args, reference)
    text = read_tail(args.text, args.tail)
    if is_bundle(args.model):
        rep = bundle_perplexity(
            args.model, text, args.max_length, args.stride, threads=args.threads, progress=not args.quiet
        )
    else:
        if args.threads:
            import torch  # a checkpoint's eval runs on torch anyway

            torch.set_num_threads(args.threads)
        rep = checkpoint_perplexity(args.model, text, args.max_length, args.stride, progress=not args.quiet)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        print(
            f"perplexity {rep.perplexity:.3f} over {rep.tokens} tokens "
            f"({rep.tokens_per_s:.0f} tokens/s, {rep.seconds:.1f} s)"
        )
    return 0


def _made_from(model: str | None) -> str | None:
    """The fp32 bundle a quantized bundle was made from, when it is still here."""
    if not is_bundle(model):
        return None
    quantization = Bundle.load(model, verify=False).manifest.quantization
    made_from = quantization.source if quantization is not None else None
    return made_from if made_from and is_bundle(made_from) else None


def _compare_with(args: argparse.Namespace, reference: str) -> int:
    """A bundle against its fp32 reference: the accuracy gate's numbers."""
    if not is_bundle(args.model):
        raise Gpt2EdgeError("--reference compares two bundles; MODEL must be a bundle")
    b, ref = Bundle.load(args.model), Bundle.load(reference)
    ids = b.tokenizer().encode(read_tail(args.text, args.tail))  # the same split as plain eval
    if len(ids) < MIN_COMPARE_TOKENS:
        raise Gpt2EdgeError(
            f"{args.text} (last {args.tail:.0%}) has {len(ids)} tokens; "
            f"at least {MIN_COMPARE_TOKENS} are needed"
        )
    rep = compare(
        OrtBackend(ref, threads=args.threads),
        OrtBackend(b, threads=args.threads),
        ids,
        b.precision,
        args.max_length or min(256, b.context_length),
        args.stride,
        prompts=eval_prompts(ids),
        n_ctx=b.context_length,
        progress=not args.quiet,
    )
    print(json.dumps(rep.as_dict(), indent=2) if args.json else rep.summary())
    return 0
