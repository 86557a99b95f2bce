"""`gpt2-edge generate` on a bundle: JSON and streamed output, one-line errors, prompts from stdin
and files (the runtime itself: tests/runtime/test_runtime.py)."""

from __future__ import annotations

import json

import pytest

from gpt2_edge.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


def test_cli_generate_json_and_stream(inplace_bundle, capsys):
    assert (
        main(
            [
                "generate",
                str(inplace_bundle),
                "--prompt",
                "All:",
                "--prompt",
                "First Citizen:",
                "--max-new-tokens",
                "5",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert (
        len(out) == 2 and all(len(r["token_ids"]) == 5 for r in out) and out[0]["finish_reason"] == "length"
    )
    assert (
        main(["generate", str(inplace_bundle), "--prompt", "All:", "--max-new-tokens", "5", "--stream"]) == 0
    )
    cap = capsys.readouterr()
    assert "ms per step" in cap.err and "time to first token" in cap.err
    assert main(["generate", str(inplace_bundle), "--prompt", "All:", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == cap.out


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in"),
        (["--top-k", "-1"], "top_k must be >= 0"),
        (["--num-beams", "0"], "num_beams must be >= 1"),
        (["--provider", "cuda"], "CUDAExecutionProvider is not available"),
    ],
)
def test_cli_bad_input_is_one_line(inplace_bundle, capsys, args, msg):
    import onnxruntime as ort

    if "cuda" in args and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    assert main(["generate", str(inplace_bundle), "--prompt", "All:", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_cli_bare_temperature_zero_is_greedy(inplace_bundle, capsys):
    assert (
        main(
            [
                "generate",
                str(inplace_bundle),
                "--prompt",
                "All:",
                "--max-new-tokens",
                "6",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    zero = capsys.readouterr().out
    assert main(["generate", str(inplace_bundle), "--prompt", "All:", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == zero


def test_cli_missing_bundle(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x", "--backend", "onnx"]) == 2
    assert "is not a bundle" in capsys.readouterr().err


def test_cli_prompt_from_stdin_and_file(inplace_bundle, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "gpt2_edge", "generate", str(inplace_bundle), "--max-new-tokens", "4"]
    piped = subprocess.run(cmd, input="All:", capture_output=True, text=True, timeout=120)
    (tmp_path / "p.txt").write_text("All:")
    from_file = subprocess.run(
        [*cmd, "--prompt-file", str(tmp_path / "p.txt")], capture_output=True, text=True, timeout=120
    )
    assert piped.returncode == from_file.returncode == 0, piped.stderr
    assert piped.stdout == from_file.stdout and piped.stdout.strip()
    missing = subprocess.run(
        [*cmd, "--prompt-file", str(tmp_path / "nope.txt")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "No such file" in missing.stderr and "Traceback" not in missing.stderr
