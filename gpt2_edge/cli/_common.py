"""What several commands read from the user: prompts (flags, a file, standard input), checked
as UTF-8, and whether a model argument names a bundle. Torch-free."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import Gpt2EdgeError
from ..runtime.bundle import MANIFEST


def is_bundle(spec: str | None) -> bool:
    """Whether ``spec`` is a bundle directory (one with ``bundle.json``), not a checkpoint or hub id."""
    return spec is not None and (Path(spec) / MANIFEST).is_file()


def utf8(text: str, source: str) -> str:
    """Refuse text that is not valid UTF-8. Python hands such command-line bytes over as lone
    surrogates (surrogateescape), which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        byte = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"character U+{bad:04X}"
        raise Gpt2EdgeError(
            f"{source} is not valid UTF-8 ({byte} at position {e.start}); pass UTF-8 text"
        ) from None
    return text


def read_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` (repeatable), ``--prompt-file`` (``-`` = stdin), or piped standard input."""
    prompts = [utf8(p, "--prompt") for p in args.prompt or []]
    if args.prompt_file:
        if args.prompt_file == "-":
            prompts.append(read_stdin())
        else:
            try:
                prompts.append(Path(args.prompt_file).read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise Gpt2EdgeError(f"{args.prompt_file} is not UTF-8 text") from None
    if not prompts and not sys.stdin.isatty():
        prompts.append(read_stdin())
    if not prompts or any(p == "" for p in prompts):
        raise Gpt2EdgeError("no prompt: pass --prompt TEXT, --prompt-file FILE, or text on stdin")
    return prompts


def read_stdin() -> str:
    """All of standard input, decoded as UTF-8 (refused with the offending byte otherwise)."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text-only stand-in (tests, embedding)
        return sys.stdin.read()
    data = raw.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Gpt2EdgeError(
            f"standard input is not valid UTF-8 (byte 0x{data[e.start]:02x} at position {e.start}); "
            "pass UTF-8 text"
        ) from None
