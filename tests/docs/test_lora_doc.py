"""docs/lora.md runs as written: its Python blocks (each followed by a ``text`` block of what it
prints) and its console blocks (``$ command`` lines, each followed by its output) are executed in
order in one fresh directory, and every output must be the page's (numbers with a decimal point,
timings and parity figures, are compared by shape only).

``python -m tests.docs.test_lora_doc`` rewrites the page's outputs from a run (after a change).
Needs torch and peft (the page makes its adapters with PEFT and exports bundles)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PAGE = REPO / "docs" / "lora.md"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)
MARK = "@@gpt2-edge-doc@@"


def blocks(text: str) -> list[tuple[str, str, re.Match]]:
    return [(m.group(1), m.group(2), m) for m in FENCE.finditer(text)]


def normalise(out: str) -> str:
    """Timings and parity figures by shape; adapter hashes not at all (PEFT's adapter_config.json
    holds the base model's absolute path)."""
    out = re.sub(r"sha256 [0-9a-f]{16}", "sha256 H", out)
    return re.sub(r"\d+\.\d+(e[-+]?\d+)?", "N", out).strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_console(block: str, workdir: Path, port: int) -> list[tuple[str, str]]:
    """Run a console block's commands in one bash; ``[(command, its output)]``."""
    commands = [line[2:] for line in block.splitlines() if line.startswith("$ ")]
    shim = workdir / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "gpt2-edge").write_text(f'#!/bin/sh\nexec {sys.executable} -m gpt2_edge "$@"\n')
    (shim / "gpt2-edge").chmod(0o755)
    script = "\n".join(f"echo {MARK}\n{c.replace('8000', str(port))}" for c in commands)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{shim}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=600
    ).stdout
    parts = out.split(MARK + "\n")[1:]
    return list(zip(commands, [p.rstrip("\n") for p in parts], strict=True))


def run_python(code: str, workdir: Path, namespace: dict) -> str:
    buf = io.StringIO()
    old = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(code, str(PAGE), "exec"), namespace)
    finally:
        os.chdir(old)
    return buf.getvalue().rstrip("\n")


def run_page(workdir: Path) -> list[tuple[str, str]]:
    """Every example's (expected, actual) output, in page order."""
    text = PAGE.read_text()
    found = blocks(text)
    results = []
    namespace: dict = {"__name__": "__doc__"}
    port = free_port()
    for i, (lang, body, _) in enumerate(found):
        if lang == "python":
            assert found[i + 1][0] == "text", "a python block is followed by its output (a text block)"
            results.append((found[i + 1][1].rstrip("\n"), run_python(body, workdir, namespace)))
        elif lang == "console":
            expected = _console_outputs(body)
            for (_cmd, got), want in zip(run_console(body, workdir, port), expected, strict=True):
                results.append((want, got))
    return results


def _console_outputs(block: str) -> list[str]:
    outs: list[list[str]] = []
    for line in block.rstrip("\n").splitlines():
        if line.startswith("$ "):
            outs.append([])
        else:
            outs[-1].append(line)
    return ["\n".join(o) for o in outs]


def test_every_example_prints_what_the_page_says(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    for want, got in run_page(tmp_path):
        assert normalise(got) == normalise(want), f"the page says:\n{want}\nthe run printed:\n{got}"


def _rewrite() -> None:
    """Put a run's outputs into the page (python blocks' text blocks, console outputs)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        results = iter(run_page(Path(d)))
    text = PAGE.read_text()
    out, pos = [], 0
    found = blocks(text)
    for i, (lang, body, m) in enumerate(found):
        if lang == "text" and i and found[i - 1][0] == "python":
            _, got = next(results)
            out.append(text[pos : m.start(2)] + got + "\n")
            pos = m.end(2)
        elif lang == "console":
            new = []
            for line in body.rstrip("\n").splitlines():
                if line.startswith("$ "):
                    _, got = next(results)
                    new.append(line)
                    if got:
                        new.append(got)
            out.append(text[pos : m.start(2)] + "\n".join(new) + "\n")
            pos = m.end(2)
    out.append(text[pos:])
    PAGE.write_text("".join(out))


if __name__ == "__main__":
    _rewrite()
