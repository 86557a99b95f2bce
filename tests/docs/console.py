"""Shell sessions in the docs, run for real: a Sybil evaluator for ```console blocks.

A block is a shell session: ``$ command`` (a trailing ``\\`` continues it on the next line), then the
output the command prints, stdout and stderr together, until the next ``$``. Each command runs with
bash in the page's working directory (one fresh temporary directory per page, shared by its console
and Python examples), with ``gpt2-edge`` on PATH running the tree under test, and must print the shown
output. A command with no output shown must exit 0; its output is not compared.

Shown and printed output are compared after ``normalise`` (both sides), which makes exactly these
allowances and no others:

- timings: a number followed by a time unit or a rate (``9.5 s``, ``3.12 ms``, ``321.0 steps/s``,
  ``3231 tokens/s``) becomes ``<time>``: they differ on every run;
- ``...`` in the shown output matches any text (as doctest's ELLIPSIS), for parts that differ by
  machine or install (versions, absolute paths, hashes of files that embed them);
- trailing whitespace and trailing blank lines are ignored.

A command ending in ``&`` starts a background process (a server); it must redirect its output. Every
process a page started is sent SIGTERM when the page ends (by process group, the ids recorded here).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sybil import Example

REPO = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_S = 300

_TIMING = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[-+]?\d+)? ?(?:ms|s|us|µs|steps/s|tokens/s|tok/s)(?![\w/])")
ELLIPSIS = "..."


@dataclass
class Command:
    line: int  # offset of the ``$`` line inside the block
    text: str
    shown: str


def parse_session(source: str) -> list[Command]:
    """The commands of a console block and the output shown under each."""
    commands: list[Command] = []
    lines = source.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if commands:
                commands[-1].shown += line + "\n"
            elif line.strip():
                raise ValueError(f"a console block starts with '$ command', got {line!r}")
            i += 1
            continue
        start, text = i, line[2:]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text + "\n" + lines[i]  # bash reads the continuation as is
        commands.append(Command(start, text, ""))
        i += 1
    return commands


def normalise(text: str) -> str:
    text = _TIMING.sub("<time>", text)
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def matches(shown: str, printed: str) -> bool:
    """``printed`` is ``shown`` up to ``normalise`` and the ellipses in ``shown``."""
    shown, printed = normalise(shown), normalise(printed)
    if ELLIPSIS not in shown:
        return shown == printed
    pattern = "[\\s\\S]*?".join(re.escape(part) for part in shown.split(ELLIPSIS))
    return re.fullmatch(pattern, printed) is not None


# --- the shipped model's bundle, exported once per session for pages that start from one ---

_shipped_lock = threading.Lock()
_shipped: Path | None = None


def shipped_bundle(env: dict[str, str]) -> Path:
    """``gpt2-edge export -o bundle`` of the shipped model, made once per test session."""
    global _shipped
    with _shipped_lock:
        if _shipped is None:
            root = Path(tempfile.mkdtemp(prefix="gpt2-edge-docs-shipped-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            out = root / "bundle"
            done = subprocess.run(
                [sys.executable, "-m", "gpt2_edge", "export", "-o", str(out), "--quiet"],
                env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
            )
            if done.returncode != 0:
                raise RuntimeError(f"exporting the shipped model failed:\n{done.stdout}{done.stderr}")
            _shipped = out
        return _shipped


# --- a page's working directory and environment ---


class Page:
    """One document's working directory, environment and background processes."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = directory or Path(tempfile.mkdtemp(prefix="gpt2-edge-docs-"))
        self.bin = self.dir / ".bin"
        self.bin.mkdir(exist_ok=True)
        shim = self.bin / "gpt2-edge"
        (self.bin / "python").unlink(missing_ok=True)
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m gpt2_edge "$@"\n')
        shim.chmod(0o755)
        (self.bin / "python").symlink_to(sys.executable)
        self.env = dict(os.environ)
        self.env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
            PYTHONUNBUFFERED="1",  # stdout and stderr interleave as on a terminal
            GPT2_EDGE_CACHE=str(self.dir / ".cache"),  # `serve` without a bundle never fills ~/.cache
            COLUMNS="100",
        )
        self.groups: list[int] = []
        self.old_cwd = os.getcwd()

    def run(self, command: str) -> tuple[int, str]:
        if "$DOCS_SHIPPED_BUNDLE" in command:
            self.env["DOCS_SHIPPED_BUNDLE"] = str(shipped_bundle(self.env))
        proc = subprocess.Popen(
            ["bash", "-c", command], cwd=self.dir, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, text=True,
        )
        self.groups.append(proc.pid)
        try:
            out, _ = proc.communicate(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        return proc.returncode, out

    def close(self) -> None:
        os.chdir(self.old_cwd)
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 30
        for group in self.groups:
            while time.monotonic() < deadline:
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        shutil.rmtree(self.dir, ignore_errors=True)


def setup(namespace: dict) -> None:
    page = Page()
    namespace["_page"] = page
    os.chdir(page.dir)  # the Python examples run here too


def teardown(namespace: dict) -> None:
    namespace.pop("_page").close()


def evaluate_console(example: Example) -> str | None:
    page: Page = example.namespace["_page"]
    for command in parse_session(example.parsed):
        code, printed = page.run(command.text)
        where = f"line {example.line + 1 + command.line}: $ {command.text}"
        if not command.shown.strip():
            if code != 0:
                return f"{where}\nexited {code}, printed:\n{printed}"
            continue
        if not matches(command.shown, printed):
            return (
                f"{where}\n--- shown (normalised) ---\n{normalise(command.shown)}\n"
                f"--- printed (normalised) ---\n{normalise(printed)}\n"
                f"--- printed, as is (exit {code}) ---\n{textwrap.indent(printed, '  ')}"
            )
    return None
