"""benchmarks/harness.py and benchmarks/report.py: the interleaving order, the summaries, the JSON
round trip, the page generator, and that docs/measured.md is what the committed results generate.
Nothing here times anything: the benchmarks themselves are never part of the test run."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from benchmarks import report as report_page
from benchmarks.harness import Column, Report, Turn, interleave, render_record, render_table, schedule
from gpt2_edge.measure import geometric_mean, quartiles, ratio_summary, ratios


def timed(turns: list[Turn]) -> list[tuple[int, str]]:
    return [(t.round, t.subject) for t in turns if t.timed]


def test_two_subjects_take_strict_turns_in_both_orders() -> None:
    turns = schedule(["a", "b"], rounds=4)
    assert [(t.round, t.subject) for t in turns] == [
        (-1, "a"), (-1, "b"),  # warm-up
        (0, "a"), (0, "b"), (1, "a"), (1, "b"),  # forward
        (-1, "a"),  # the order change: one untimed turn, so b never runs twice in a row
        (2, "b"), (2, "a"), (3, "b"), (3, "a"),  # reverse
    ]  # fmt: skip
    assert [t.order for t in turns if t.timed] == ["forward"] * 4 + ["reverse"] * 4


@pytest.mark.parametrize("n_subjects", [2, 3, 5])
@pytest.mark.parametrize("rounds", [1, 2, 3, 7])
@pytest.mark.parametrize("both_orders", [True, False])
def test_no_subject_ever_runs_twice_in_a_row(n_subjects: int, rounds: int, both_orders: bool) -> None:
    subjects = [f"s{i}" for i in range(n_subjects)]
    turns = schedule(subjects, rounds, warmup=1, both_orders=both_orders)
    assert all(x.subject != y.subject for x, y in itertools.pairwise(turns))
    for r in range(rounds):  # every subject once per round
        assert sorted(t.subject for t in turns if t.round == r) == subjects
    reverse = [t.round for t in turns if t.timed and t.order == "reverse"]
    assert len(set(reverse)) == (rounds // 2 if both_orders else 0)


def test_one_subject_and_bad_arguments() -> None:
    assert timed(schedule(["only"], 3)) == [(0, "only"), (1, "only"), (2, "only")]
    with pytest.raises(ValueError):
        schedule(["a", "a"], 2)
    with pytest.raises(ValueError):
        schedule(["a", "b"], 0)


def test_interleave_calls_each_subject_with_its_round() -> None:
    calls: list[tuple[str, int]] = []

    def subject(name: str):
        def run(r: int) -> float:
            calls.append((name, r))
            return 10.0 * (r + 1) if name == "a" else 20.0 * (r + 1)

        return run

    runs = interleave({"a": subject("a"), "b": subject("b")}, 3, pause_s=0)
    assert calls == [
        ("a", -1),
        ("b", -1),
        ("a", 0),
        ("b", 0),
        ("a", 1),
        ("b", 1),
        ("a", -1),
        ("b", 2),
        ("a", 2),
    ]
    assert runs.values("a") == [10.0, 20.0, 30.0]
    assert runs.orders == ["forward", "forward", "reverse"]
    r = runs.ratio("b", "a")
    assert r["per_round"] == [2.0, 2.0, 2.0]
    assert (r["median"], r["lo"], r["hi"], r["combined"]) == (2.0, 2.0, 2.0, 2.0)


def test_the_orders_combine_by_geometric_mean() -> None:
    # a bias of 1.1 in favour of whoever runs second: the true ratio (1.0) comes back
    runs = interleave({"a": lambda r: 1.0, "b": lambda r: 1.0}, 4, warmup=0, pause_s=0)
    runs.results["b"] = [1.1, 1.1, 1 / 1.1, 1 / 1.1]  # b second in forward rounds, first in reverse
    r = runs.ratio("b", "a")
    assert r["forward"] == pytest.approx(1.1)
    assert r["reverse"] == pytest.approx(1 / 1.1)
    assert r["combined"] == pytest.approx(1.0)


def test_ratio_with_missing_rounds_and_keys() -> None:
    runs = interleave(
        {"a": lambda r: {"x": 2.0}, "b": lambda r: {"x": None if r == 0 else 4.0}}, 2, pause_s=0
    )
    r = runs.ratio("b", "a", "x")
    assert r["per_round"] == [None, 2.0]
    assert r["median"] == 2.0
    assert runs.ratio("a", "a", lambda x: x["x"])["combined"] == 1.0


def test_measure_summaries() -> None:
    assert ratios([2.0, None, 6.0, 1.0], [1.0, 1.0, 2.0, 0.0]) == [2.0, 3.0]
    assert ratio_summary([2.0, 9.0, 4.0], [1.0, 3.0, 1.0]) == (3.0, 2.0, 4.0)
    with pytest.raises(ValueError):
        ratios([1.0], [1.0, 2.0])
    assert geometric_mean([2.0, 0.5]) == pytest.approx(1.0)
    assert geometric_mean([4.0]) == 4.0
    with pytest.raises(ValueError):
        geometric_mean([1.0, 0.0])
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert quartiles([7.0]) == (7.0, 7.0, 7.0)


def test_cells_render_spreads_missing_values_and_text() -> None:
    table = {
        "columns": [{"key": "k", "label": "name", "fmt": ""}, {"key": "v", "label": "max |d|", "fmt": ".1f"}],
        "rows": [{"k": "a|b", "v": [10.0, 9.04, 11.96]}, {"k": True, "v": None}, {"k": "c", "v": 3}],
    }
    assert render_table(table).splitlines() == [
        "| name | max \\|d\\| |",
        "|---|---:|",
        "| a\\|b | 10.0 (9.0-12.0) |",
        "| yes | n/a |",
        "| c | 3.0 |",
    ]


def make_report(tmp_path: Path, capsys) -> tuple[Report, dict, Path]:
    rep = Report("bench_example", "An example", argv=["--rounds", "2"], params={"rounds": 2})
    rep.table(
        "rates",
        [Column("engine", "engine"), Column("rate", "tok/s", ".1f"), Column("spread", "ratio", ".2f")],
        [{"engine": "a", "rate": 1.5, "spread": (1.0, 0.5, 2.0)}],
    )
    rep.note("a note")
    path = tmp_path / "out" / "run.json"
    rec = rep.emit(path)
    printed = capsys.readouterr().out
    assert "| a | 1.5 | 1.00 (0.50-2.00) |" in printed
    return rep, rec, path


def test_report_json_round_trip_with_the_machine(tmp_path: Path, capsys) -> None:
    rep, rec, path = make_report(tmp_path, capsys)
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(rec))  # tuples come back as lists
    assert render_record(loaded) == rep.markdown()
    assert "| a | 1.5 | 1.00 (0.50-2.00) |" in rep.markdown()
    m = loaded["machine"]
    for key in ("cpu", "cores", "memory_gib", "onnxruntime", "python", "load_start", "load_end"):
        assert key in m, key
    assert loaded["command"] == "python -m benchmarks.bench_example --rounds 2"
    assert loaded["source"] == "harness"
    assert loaded["date"].endswith("Z")
    assert "commit" in loaded["git"]
    assert loaded["tables"][0]["rows"] == [{"engine": "a", "rate": 1.5, "spread": [1.0, 0.5, 2.0]}]


def imported_record() -> dict:
    return {
        "schema": 1,
        "source": "README.md at 2b87822 (recorded before the harness)",
        "benchmark": "bench_old",
        "title": "An old table",
        "command": "python -m benchmarks.bench_old --rounds 3",
        "date": "2026-11-26",
        "load": "busy (load average ~10)",
        "machine": {"description": "2 cores of an AMD EPYC, 24 GiB"},
        "notes": [],
        "tables": [
            {
                "title": "old",
                "columns": [
                    {"key": "a", "label": "engine", "fmt": ""},
                    {"key": "b", "label": "tok/s", "fmt": ""},
                ],
                "rows": [["x", "**48.4**"]],
                "note": "",
            }
        ],
    }


def test_the_page_generator_on_a_fixture(tmp_path: Path, capsys) -> None:
    results = tmp_path / "results"
    results.mkdir()
    _, rec, _ = make_report(tmp_path, capsys)
    (results / "bench_example-now.json").write_text(json.dumps(rec))
    (results / "readme-old.json").write_text(json.dumps(imported_record()))
    out = tmp_path / "measured.md"
    assert report_page.main(["--results", str(results), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!-- Generated by `python -m benchmarks.report`")
    assert "| x | **48.4** |" in page
    assert "| a | 1.5 | 1.00 (0.50-2.00) |" in page
    lines = page.splitlines()
    provenance = [lines[i - 3] for i, line in enumerate(lines) if line.startswith("|---")]
    assert len(provenance) == 2
    assert all(
        p.startswith("*Run*") and "*date*" in p and "*machine*" in p and "*command*" in p for p in provenance
    )
    assert any("**imported**: README.md at 2b87822" in p and "2026-11-26" in p for p in provenance)
    assert any("recorded with the harness" in p and "bench_example --rounds 2" in p for p in provenance)
    assert page.index("An example") < page.index("An old table")  # harness-recorded runs first
    assert report_page.main(["--results", str(results), "--out", str(out), "--check"]) == 0
    out.write_text(page.replace("48.4", "49.4"))  # a hand edit
    assert report_page.main(["--results", str(results), "--out", str(out), "--check"]) == 1


def test_a_record_without_provenance_is_refused(tmp_path: Path) -> None:
    rec = imported_record()
    del rec["date"]
    (tmp_path / "bad.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="date"):
        report_page.load_records(tmp_path)


def test_measured_page_is_generated_from_the_committed_results(tmp_path: Path) -> None:
    """docs/measured.md is what `python -m benchmarks.report` makes of benchmarks/results/*.json."""
    out = tmp_path / "measured.md"
    assert report_page.main(["--out", str(out)]) == 0
    assert report_page.PAGE.read_text() == out.read_text(), (
        "docs/measured.md differs from what `python -m benchmarks.report` generates: run it and commit"
    )


def test_two_runs_of_one_benchmark_get_their_own_headings(tmp_path: Path) -> None:
    for run in ("bench_old-before", "bench_old-after"):
        (tmp_path / f"{run}.json").write_text(json.dumps(imported_record()))
    page = report_page.render_page(report_page.load_records(tmp_path))
    assert "## An old table (bench_old-after)" in page and "## An old table (bench_old-before)" in page
    assert "(#an-old-table-bench_old-after)" in page
