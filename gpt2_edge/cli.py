"""``gpt2-edge`` command line: a thin layer over the library functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields

from . import __version__


class UserError(Exception):
    """An error whose message is the whole story for the user (no traceback)."""


# train ------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    from .model.train import TrainConfig

    p = sub.add_parser("train", help="train a GPT-2 on a text file (language-modelling objective)")
    p.add_argument("--text", required=True, help="UTF-8 text file; the last --val-fraction is held out")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    p.add_argument("--tokenizer", help="checkpoint dir whose tokenizer to reuse (default: train a new one)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name),
                       help=f"(default: {getattr(defaults, f.name)})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .model.tokenizer import Tokenizer
    from .model.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    tok = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else None
    res = train(args.text, args.output, cfg, tokenizer=tok, progress=not args.quiet)
    print(f"best val loss {res.best_val_loss:.4f} (ppl {res.best_val_ppl:.2f}) at step {res.best_step} "
          f"of {res.steps}; {res.seconds:.0f} s; checkpoint: {res.out_dir}")
    return 0


# entry point ------------------------------------------------------------------------------
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2-edge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gpt2-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, ValueError, OSError) as e:
        print(f"gpt2-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
