"""The CLI on bundles: `inspect` describes one, and a damaged one is refused in one line (the
checks themselves: tests/runtime/test_bundle.py)."""

from __future__ import annotations

import shutil

import pytest

from gpt2_edge.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def copy(trt_target_bundle, tmp_path):
    return shutil.copytree(trt_target_bundle, tmp_path / "copy")


def test_cli_inspect(trt_target_bundle, capsys):
    assert main(["inspect", str(trt_target_bundle)]) == 0
    out = capsys.readouterr().out
    assert "target tensorrt, precision fp32" in out
    assert "past_key_values.0.key" in out and "'past_sequence_length'" in out
    assert "parity (fp32)" in out and "passed True" in out


def test_cli_damaged_bundle_is_one_line(copy, capsys):
    (copy / "tokenizer.json").write_text("x")
    assert main(["generate", str(copy), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json is 1 bytes" in err
