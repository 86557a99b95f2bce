"""A backend declares what it is (``Backend.capabilities``, ``bundle``, ``n_ctx``, ``logits``): no code
asks a backend what it is with ``getattr`` / ``hasattr`` (``runtime.load_model`` gives callers a
``Model`` whose fields say it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gpt2_edge"


def probes(tree: ast.AST, source: str) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and node.args
        ):
            target = ast.get_source_segment(source, node.args[0]) or ""
            if "backend" in target.lower():
                found.append(f"line {node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_no_code_probes_a_backend():
    hits = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        found = probes(ast.parse(source), source)
        if found:
            hits[str(path.relative_to(PACKAGE.parent))] = found
    assert not hits, f"declare it on the backend (types.Capabilities) instead: {hits}"


def test_the_check_finds_a_probe():
    source = "x = getattr(model.backend, 'bundle', None)\ny = hasattr(self._backend, 'logits')\n"
    assert len(probes(ast.parse(source), source)) == 2
