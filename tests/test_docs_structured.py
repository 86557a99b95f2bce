"""Every example of docs/structured-output.md runs and prints what the page shows: each ```python
block (its output is the ```text block after it) and each ``$ gpt2-edge`` line of a ```console
block (its output: the lines after it), on the shipped model's bundle as ``out/default-bundle``.
The server example's client talks to the app in process."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from tests.bundles import SHIPPED

pytest.importorskip("llguidance")
pytestmark = pytest.mark.filterwarnings("ignore")

PAGE = Path(__file__).resolve().parent.parent / "docs" / "structured-output.md"


def blocks() -> list[tuple[str, str]]:
    """The page's fenced blocks in order: (language, text)."""
    return [(m[1], m[2]) for m in re.finditer(r"```(\w+)\n(.*?)```", PAGE.read_text(), re.S)]


def examples() -> list[tuple[str, str, str]]:
    """(kind, code, expected output): python blocks with their text block, console commands."""
    out = []
    found = blocks()
    for i, (lang, text) in enumerate(found):
        if lang == "python":
            assert i + 1 < len(found) and found[i + 1][0] == "text", "a python example needs its output"
            out.append(("python", text, found[i + 1][1]))
        elif lang == "console":
            for cmd in re.split(r"^\$ ", text, flags=re.M)[1:]:
                line, _, rest = cmd.partition("\n")
                if line.startswith("gpt2-edge "):
                    out.append(("console", line, rest))
    return out


@pytest.fixture
def workdir(make_bundle, tmp_path, monkeypatch) -> Path:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "default-bundle").symlink_to(make_bundle(SHIPPED), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def in_process_openai(workdir, monkeypatch):
    """``OpenAI(base_url="http://localhost:8000/v1")`` reaches the app serving out/default-bundle."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from gpt2_edge.runtime.loader import load_model
    from gpt2_edge.serve.app import ServeSettings, create_app

    app = create_app(load_model("out/default-bundle", threads=1), ServeSettings(max_batch=2, max_queue=2))
    real = openai.OpenAI
    with TestClient(app, base_url="http://localhost:8000") as client:
        monkeypatch.setattr(openai, "OpenAI", lambda **kw: real(**kw, http_client=client, max_retries=0))
        yield


def test_the_page_has_each_kind_of_example():
    kinds = [k for k, _, _ in examples()]
    assert kinds.count("python") == 4 and kinds.count("console") >= 4


@pytest.mark.parametrize("example", examples(), ids=lambda e: f"{e[0]}-{e[1].strip().splitlines()[0][:40]}")
def test_each_example_prints_what_the_page_shows(example, workdir, request, capsys):
    kind, code, expected = example
    if kind == "python":
        if "from openai import" in code:
            request.getfixturevalue("in_process_openai")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(PAGE), "exec"), {"__name__": "__doc_example__"})
        assert out.getvalue() == expected
        return
    from gpt2_edge.cli import main

    code_ = main(shlex.split(code)[1:])
    cap = capsys.readouterr()
    shown = cap.out if code_ == 0 else cap.err
    assert shown == expected, (code_, cap.err)
