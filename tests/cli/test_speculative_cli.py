"""`gpt2-edge generate --prompt-lookup / --draft` and `gpt2-edge bench --prompt-lookup` (the runtime:
tests/runtime/test_speculative.py)."""

from __future__ import annotations

import json

import pytest

from gpt2_edge.cli import main
from tests.bundles import ModelSpec, spec

pytestmark = pytest.mark.filterwarnings("ignore")
PROMPT = "All:\nSpeak, speak.\n\nAll:\nSpeak"


def generate(capsys, *args: str) -> tuple[dict, str]:
    assert main(["generate", *args, "--prompt", PROMPT, "--max-new-tokens", "24", "--json"]) == 0
    cap = capsys.readouterr()
    return json.loads(cap.out), cap.err


def test_generate_with_prompt_lookup_and_a_draft(make_bundle, concat_bundle, capsys):
    bundle = str(make_bundle(spec()))
    plain, _ = generate(capsys, bundle)
    assert "spec_passes" not in plain["timings"]
    for flags in (["--prompt-lookup", "4"], ["--draft", str(make_bundle(spec(model=ModelSpec(seed=5))))]):
        out, _ = generate(capsys, bundle, *flags)
        assert out["token_ids"] == plain["token_ids"] and out["timings"]["spec_passes"] >= 1
    assert (
        main(["generate", bundle, "--prompt", PROMPT, "--max-new-tokens", "24", "--prompt-lookup", "4"]) == 0
    )
    err = capsys.readouterr().err
    assert "ms per token" in err and "drafted tokens accepted" in err
    # a concatenating KV cache cannot roll back: plain steps, and the timing line says so
    assert (
        main(
            [
                "generate",
                str(concat_bundle),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "8",
                "--prompt-lookup",
                "4",
            ]
        )
        == 0
    )
    assert "speculative: off" in capsys.readouterr().err
    assert main(["generate", bundle, "--prompt", PROMPT, "--prompt-lookup", "-1"]) == 2
    assert "prompt_lookup must be >= 0" in capsys.readouterr().err


def test_bench_adds_a_prompt_lookup_row(make_bundle, capsys):
    bundle = str(make_bundle(spec()))
    args = ["bench", bundle, "--new-tokens", "8", "--batch", "2", "--threads", "1", "--prompt-lookup", "4"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].endswith("| accepted b1 |")
    assert "+ prompt lookup 4 |" in lines[3] and lines[2].endswith("| - |")
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt_lookup"] for r in rows] == [0, 4]
    assert rows[1]["decode_b1"] > 0 and 0 <= rows[1]["acceptance"] <= 1
    assert main(["bench", bundle, "--prompt-lookup", "-2"]) == 2


def test_generate_step_invariant(make_bundle, concat_bundle, capsys):
    """`--step-invariant`: the same tokens as plain decoding (with prompt lookup too); a bundle
    without the graph input is one line, exit 2."""
    bundle = str(make_bundle(spec()))
    plain, _ = generate(capsys, bundle)
    for flags in (["--step-invariant"], ["--step-invariant", "--prompt-lookup", "4"]):
        out, _ = generate(capsys, bundle, *flags)
        assert out["token_ids"] == plain["token_ids"]
    assert main(["generate", str(concat_bundle), "--prompt", PROMPT, "--step-invariant"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no `step_invariant` input" in lines[0], lines
