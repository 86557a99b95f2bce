"""``gpt2-edge train``: a GPT-2 trained on a text file, written as a checkpoint."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..model.config import TrainConfig
from ..runtime.tokenizer import Tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train``: one flag per ``TrainConfig`` field, with its default."""
    p = sub.add_parser("train", help="train a GPT-2 on a text file (language-modelling objective)")
    p.add_argument("--text", required=True, help="UTF-8 text file; the last --val-fraction is held out")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    p.add_argument("--tokenizer", help="checkpoint dir whose tokenizer to reuse (default: train a new one)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(
            flag,
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"(default: {getattr(defaults, f.name)})",
        )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..model.train import train  # imports torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    tok = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else None
    res = train(
        args.text,
        args.output,
        cfg,
        tokenizer=tok,
        progress=not args.quiet,
        overwrite=args.overwrite,
        tokenizer_dir=args.tokenizer,
    )
    print(
        f"best val loss {res.best_val_loss:.4f} (ppl {res.best_val_ppl:.2f}) at step {res.best_step} "
        f"of {res.steps}; {res.seconds:.0f} s; checkpoint: {res.out_dir}"
    )
    return 0
