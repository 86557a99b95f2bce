"""``gpt2-edge`` command line: a thin layer over the library functions.

One module per subcommand, each with ``register(subparsers)``; this one builds the parser and
owns what every command shares: the error policy (a ``Gpt2EdgeError`` or ``OSError`` is one line
on stderr and exit 2, anything else is a bug and keeps its traceback), SIGTERM (exit 143, after
every clean-up ran) and one-line warnings.

Building the parser imports neither torch nor onnx: each command imports its heavy stage
(``model/``, ``export/``, ``quantize/``) when it runs, so ``--help`` and a bundle's ``generate``
and ``eval`` run where torch is not installed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence

from .. import __version__
from ..engine.cli import add_build_engine, add_doctor
from ..errors import Gpt2EdgeError
from ..serve.cli import add_serve
from . import bench, demo, evaluate, export, generate, inspect, quantize, train, validate

__all__ = ["Terminated", "build_parser", "main"]

DESCRIPTION = "GPT-2 from a PyTorch checkpoint to ONNX bundles, quantized variants and a torch-free runtime."

# In the order of `gpt2-edge --help`: the pipeline's stages, then running, measuring, serving.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    train.register,
    export.register,
    inspect.register,
    validate.register,
    quantize.register,
    generate.register,
    evaluate.register,
    demo.register,
    bench.register,
    add_build_engine,
    add_doctor,
    add_serve,
)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, a CI cancel, systemd), raised like Ctrl-C so every
    ``finally`` and staging-directory cleanup runs; the command then exits 143 (128 + 15)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``gpt2-edge`` parser with every subcommand; each sets ``func``, its command."""
    parser = argparse.ArgumentParser(prog="gpt2-edge", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"gpt2-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gpt2-edge`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal needs it
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return args.func(args)
    except (Gpt2EdgeError, OSError) as e:
        print(f"gpt2-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"gpt2-edge {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"gpt2-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    return f"gpt2-edge: warning: {message}\n"


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated()
