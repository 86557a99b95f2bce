"""benchmarks/bench_peers.py without any peer: which engines and workloads run, why one cannot
(an unset environment variable, a bundle variant the kit cannot make), what each worker returns,
the per-class tables with their kit / peer ratios, and the settings each engine states. Nothing
here times anything or needs a peer installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import bench_peers as bp
from benchmarks.harness import render_table
from gpt2_edge.runtime.manifest import PRECISIONS


def test_only_and_workloads_select_and_refuse_unknown_names() -> None:
    engines, work = bp.select("openvino", "long,b1")
    assert {bp.ENGINES[e][0] for e in engines} == {"ours", "openvino"}  # the kit always runs
    assert work == ["b1", "long"]  # in the worker's order: RSS is read right after b1
    engines, work = bp.select(None, None)
    assert engines == list(bp.ENGINES) and work == list(bp.WORKLOADS)
    with pytest.raises(SystemExit, match="unknown llamas"):
        bp.select("llamas", None)
    with pytest.raises(SystemExit, match="unknown ttft"):
        bp.select(None, "b1,ttft")


def test_every_class_has_the_kit_and_every_engine_states_its_settings() -> None:
    for cls in bp.CLASSES:
        kit = [e for e, (fam, classes) in bp.ENGINES.items() if fam == "ours" and cls in classes]
        assert len(kit) == 1, cls
    for e in bp.ENGINES:
        assert len(bp.settings(e, 2)) > 40, e
    fair, default = bp.settings("openvino fair int4", 2), bp.settings("openvino default int4", 2)
    assert (
        "--sym --group-size 32" in fair and "--all-layers" in fair
    )  # the kit's int4: symmetric, blocks of 32
    assert "f32 compute" in fair and "f32 compute" not in default
    assert "prefix caching off" in fair and "INFERENCE_NUM_THREADS 2" in fair
    assert "2 threads" in bp.settings("llama.cpp q4_0", 2)


def test_openvino_is_skipped_with_the_reason_until_its_python_is_named(tmp_path: Path) -> None:
    e = "openvino fair fp32"
    assert "OPENVINO_GENAI_PYTHON" in bp.unavailable(e, {}, tmp_path)
    assert "not an executable" in bp.unavailable(
        e, {"OPENVINO_GENAI_PYTHON": str(tmp_path / "none")}, tmp_path
    )
    env = {"OPENVINO_GENAI_PYTHON": sys.executable}
    assert bp.unavailable(e, env, tmp_path) is None
    assert bp.python_for(e, env) == sys.executable
    assert bp.python_for("gpt2-edge fp32", {}) == sys.executable


def test_the_ort_tool_needs_its_python_only_to_build(tmp_path: Path) -> None:
    assert "ORT_GPT2_TOOL_PYTHON" in bp.unavailable("ort-gpt2-tool int8", {}, tmp_path)
    built = tmp_path / "ort-gpt2-tool" / "int8" / "model.onnx"
    built.parent.mkdir(parents=True)
    built.write_bytes(b"")
    assert bp.unavailable("ort-gpt2-tool int8", {}, tmp_path) is None


def test_a_local_llama_cpp_must_be_where_its_variables_say(tmp_path: Path) -> None:
    assert bp.unavailable("llama.cpp q4_0", {}, tmp_path) is None  # the installed package, if any
    assert "no libllama" in bp.unavailable("llama.cpp q4_0", {"LLAMA_CPP_LIB_PATH": str(tmp_path)}, tmp_path)
    (tmp_path / "libllama.so").write_bytes(b"")
    assert bp.unavailable("llama.cpp q4_0", {"LLAMA_CPP_LIB_PATH": str(tmp_path)}, tmp_path) is None
    why = bp.unavailable("llama.cpp q4_0", {"LLAMA_CPP_PYTHON_PATH": str(tmp_path)}, tmp_path)
    assert "no llama_cpp package" in why


def test_the_bf16_class_runs_once_the_kit_can_make_the_variant(tmp_path: Path) -> None:
    why = bp.unavailable("gpt2-edge bf16", {}, tmp_path)
    if "bf16" in PRECISIONS:
        assert why is None
    else:
        assert "'bf16' cannot be made" in why
    assert bp.unavailable("gpt2-edge int4", {}, tmp_path) is None


def test_the_worker_warms_each_shape_and_keeps_the_wall_clock_check(monkeypatch) -> None:
    calls: list[tuple[int, int, int]] = []

    def fake(engine: str, threads: int):
        def run(prompts: list[list[int]], new: int) -> tuple[float, ...]:
            calls.append((len(prompts), len(prompts[0]), new))
            return (0.1, 0.63, 0.75)  # TTFT, decode by its metrics, the whole call by the wall clock

        return run

    monkeypatch.setitem(bp.FAMILIES, "openvino", fake)
    monkeypatch.setattr(bp, "versions", lambda e: {"x": "1"})
    prompts = {"short": [[1] * 32], "long": [[2] * 896], "batch": [[3] * 32] * 8}
    res = bp.worker("openvino fair fp32", 2, prompts, ["b8", "b1"])
    assert calls == [(1, 32, 4), (1, 32, bp.NEW), (8, 32, 4), (8, 32, bp.NEW)]
    assert res["b1"] == pytest.approx(63 / 0.63) and res["b8"] == pytest.approx(8 * 63 / 0.63)
    assert res["ttft_short_ms"] == pytest.approx(100) and "long" not in res
    assert res["b1_wall"] == pytest.approx(63 / 0.65)
    assert res["rss_b1_mib"] > 0 and res["versions"] == {"x": "1"}
    notes = bp.wall_check({"openvino fair fp32": [res]}, ["openvino fair fp32"])
    assert notes == [
        "openvino: decode rate by its own metrics / by the wall clock around the call 1.032-1.032 (2 figures)"
    ]


def fig(b1: float, ttft: float) -> dict:
    return {"b1": b1, "ttft_short_ms": ttft, "rss_b1_mib": 100.0}


def test_a_class_table_puts_the_kit_first_and_a_ratio_row_under_each_peer() -> None:
    results = {
        "gpt2-edge int4": [fig(100, 50), fig(90, 60), fig(120, 40)],
        "openvino fair int4": [fig(50, 100), None, fig(60, 80)],  # a round it missed
        "openvino default int4": [fig(200, 25), fig(180, 30), fig(240, 20)],
        "llama.cpp q4_0": [None, None, None],  # skipped: no row
        "gpt2-edge fp32": [fig(1, 1)] * 3,
    }
    engines = list(results)
    rows = bp.class_rows(results, engines, "int4")
    assert [r["engine"] for r in rows] == [
        "**gpt2-edge int4**",
        "openvino fair int4",
        "↳ gpt2-edge / openvino fair int4",
        "openvino default int4",
        "↳ gpt2-edge / openvino default int4",
    ]
    assert rows[0]["b1"] == [100, 90, 120] and rows[0]["b8"] is None
    assert rows[1]["b1"] == [55.0, 50, 60]
    assert rows[2]["ratios"]["b1"] == [2.0, 2.0, 2.0]  # per round: 100/50, 120/60
    assert rows[2]["b1"] == "2.00" and rows[2]["b8"] is None
    assert rows[4]["ratios"]["ttft_short_ms"] == [2.0, 2.0, 2.0]
    table = {"columns": [c.__dict__ for c in bp.class_columns()], "rows": rows}
    lines = render_table(table).splitlines()
    assert lines[2].startswith("| **gpt2-edge int4** | 100.0 (90.0-120.0) | n/a |")
    assert lines[4].startswith("| ↳ gpt2-edge / openvino fair int4 | 2.00 | n/a | n/a | 0.50 |")
    # no kit row, no table: the bf16 class waits for the kit's bf16 variant
    results["openvino default fp32"] = [fig(10, 10)] * 3
    assert bp.class_rows(results, [*engines, "openvino default fp32"], "bf16") == []


def test_the_settings_table_names_each_engine_that_ran() -> None:
    results = {"gpt2-edge fp32": [{"versions": {"onnxruntime": "1"}}], "optimum fp32": [None]}
    rows = bp.settings_rows(["gpt2-edge fp32", "optimum fp32"], results, 2)
    assert [r["engine"] for r in rows] == ["gpt2-edge fp32"]
    assert rows[0]["versions"] == "onnxruntime 1" and "2 intra-op threads" in rows[0]["settings"]


def test_llama_picks_each_workloads_settings_by_shape() -> None:
    from benchmarks import peer_llama

    assert [peer_llama.workload_of(n, p) for n, p in [(1, 32), (1, 896), (8, 32)]] == ["b1", "long", "b8"]
    assert peer_llama.SETTINGS["long"].n_ubatch >= bp.LONG  # the long prompt in one micro-batch
    assert "n_ubatch 1024" in bp.settings("llama.cpp q8_0", 2)
