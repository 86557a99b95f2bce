"""``gpt2-edge bench`` on a tiny model: structure only (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from gpt2_edge.cli import main
from gpt2_edge.export.bundle import export_bundle

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def two_bundles(tmp_path_factory, tiny_checkpoint):
    d = tmp_path_factory.mktemp("bench")
    return [
        export_bundle(tiny_checkpoint, d / kv, kv_cache=kv, log=lambda _: None)
        for kv in ("inplace", "concat")
    ]


def test_bench_table_and_json(two_bundles, capsys):
    args = ["bench", *map(str, two_bundles), "--new-tokens", "8", "--batch", "2", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("| bundle | precision | KV cache | MiB |") and len(lines) == 4
    assert "| inplace | fp32 | inplace |" in out and "| concat | fp32 | concat |" in out
    assert main([*args, "--json", "--rounds", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["kv_cache"] for r in rows] == ["inplace", "concat"]
    for r in rows:
        for key in (
            "ttft_short_ms",
            "ttft_long_ms",
            "decode_b1",
            "decode_batch",
            "decode_long",
            "peak_rss_mib",
        ):
            assert r[key] > 0, key
        # the tiny model's context (64) caps the lengths, and the table says which were used
        assert r["lengths"]["long"] <= 63 and r["lengths"]["batch"] == 2


def test_bench_refuses_bad_input(two_bundles, tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", str(two_bundles[0]), "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err


def test_bench_draws_a_chart(two_bundles, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    png = tmp_path / "bench.png"
    assert main(["bench", str(two_bundles[0]), "--new-tokens", "4", "--batch", "2", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
