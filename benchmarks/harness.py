"""The benchmarks' one harness: how subjects take turns, how rounds are summarised, how a run is
reported (markdown on stdout, JSON with the machine for ``benchmarks/results/``).

Interleaving: strict turns, both orders
---------------------------------------
Every comparison in ``benchmarks/`` runs its subjects (engines, bundles, settings, servers) in
**strict turns**: round after round each subject runs once, in a fixed order, so no subject ever
runs twice in a row (no ABBA), with a short pause before each turn. The first half of the rounds
(rounded up) runs in the given order, the second half in the reverse order, separated by one
untimed turn of the first subject (``...A B | A | B A B A...``: still never twice in a row). A
ratio is taken within a round (both sides saw the same load), summarised per order, and the two
orders' medians are combined by their geometric mean, which cancels a bias that favours the
subject in one position.

Why this one (the earlier benchmarks disagreed: bench_b1 used strict turns in both orders;
bench_serve's grounded scenario, bench_speculative and bench_step_invariance used ABBA; bench_peers
and bench_memory --compare used one fixed order; bench_decode, bench_quantized and bench_serve's
levels ran each subject's repeats back to back, not interleaved at all). The one measurement of
the question in this repository is bench_b1's A/A runs (an engine against itself, where any
difference is bias), commit 02ad5d5 (2026-11-27,
"benchmarks/bench_b1: ... strict turns, both orders: the second engine of a pair measured up to
7% faster under load"), recorded in its docstring: "ABBA order (one engine twice in a row)
biased A/A runs by 10-20%: the turns stay strictly A, B" and "the engine that runs second in
each pair measured up to 7% faster in an A/A run under load (none when quiet), so every
comparison runs in both orders". The README at 0d50e39 ("Batch 1 against ONNX Runtime's GPT-2
tool, in one process") reports the comparisons measured that way, with both orders' figures
(e.g. int8: tool 1.235x with the tool second, 1.080x with ours second). ABBA (d3409a7,
bench_serve --scenario grounded; bench_speculative; bench_step_invariance) was chosen without a
measurement. The 20 ms pause before each turn is bench_b1's too: the previous session's spinning
thread pool goes idle before the next one is timed.

One difference from what was measured: bench_b1 ran each order in its own process; the harness
runs both in one process (second half reversed), which no A/A run has checked yet. The check is
``python -m benchmarks.bench_b1 ab ours:BUNDLE ours:BUNDLE`` (the same bundle twice) on a quiet
machine: its combined ratio should be 1.00 within its IQR; until then trust no difference that is
smaller than the spread between the two orders.

Use: ``interleave({"a": fn_a, "b": fn_b}, rounds)`` calls ``fn(round_index)`` per turn and
returns ``Rounds`` (each subject's results in round order and the order of each round);
``Rounds.ratio(...)`` summarises per-round ratios through ``gpt2_edge.measure``. A benchmark
whose subjects live in other processes (servers, one process per engine) passes functions that
talk to them; the schedule is the same.

Report
------
``Report(benchmark, argv)`` records the machine at the start (CPU model, cores, memory,
onnxruntime and Python versions, load average, date, git commit, the command line);
``report.table(...)`` adds a table (columns with their format, rows as values), ``report.emit(path)``
records the load average at the end, prints the markdown and writes the JSON (``--json PATH``).
``python -m benchmarks.report`` renders ``benchmarks/results/*.json`` into docs/measured.md with the
same ``render_table``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2_edge.measure import geometric_mean, ratios, summary

REPO = Path(__file__).resolve().parent.parent
# The method in a reader's words, for docs/measured.md (benchmarks/report.py); the module docstring
# above has the whole argument.
METHOD = """\
Every comparison runs its subjects (engines, bundles, settings, servers) in **strict turns**: each
round runs every subject once in a fixed order, so no subject ever runs twice in a row, with a 20 ms
pause before each turn. The first half of the rounds runs in the given order, the second half in
the reverse order (one untimed turn in between keeps the no-repeat rule). Ratios are taken within a
round, so both sides saw the same load; per order their median, and the two orders' medians
combined by their geometric mean, which cancels a bias towards one position.

Why: the one measurement of the question in this repository, bench_b1's A/A runs (an engine against
itself, where any difference is bias; commit 02ad5d5, 2026-11-27), found that running one engine
twice in a row (ABBA) biased A/A runs by 10-20%, and that under load the engine running second in a
pair measured up to 7% faster (none when quiet). The README at 0d50e39 ("Batch 1 against ONNX
Runtime's GPT-2 tool, in one process") shows both orders' figures of that method (int8: the tool
1.235x faster when it ran second, 1.080x when ours did). The ABBA order some benchmarks used before
(bench_serve's grounded scenario, d3409a7; bench_speculative; bench_step_invariance) had no such
measurement behind it, and the imported tables below that used it say so. bench_b1 ran each order
in its own process; the harness runs both in one (the second half reversed), which no A/A run has
checked yet (`python -m benchmarks.bench_b1 ab ours:BUNDLE ours:BUNDLE` on a quiet machine should
give 1.00 combined).
"""
SCHEMA = 1
PAUSE_S = 0.02  # before every turn: the previous subject's spinning thread pool goes idle
HARNESS = "harness"  # a record's "source" when this harness wrote it


# -- interleaving ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Turn:
    """One call of one subject: ``round`` is -1 for an untimed turn (warm-up, the order change)."""

    round: int
    subject: str
    order: str  # "forward" | "reverse"

    @property
    def timed(self) -> bool:
        return self.round >= 0


def schedule(subjects: Sequence[str], rounds: int, warmup: int = 1, both_orders: bool = True) -> list[Turn]:
    """Every turn, in the order they run: ``warmup`` untimed passes, then ``rounds`` rounds of
    strict turns (the second half reversed where ``both_orders``, after one untimed turn of the
    first subject, so that no subject ever runs twice in a row)."""
    subjects = list(subjects)
    if len(set(subjects)) != len(subjects) or not subjects:
        raise ValueError(f"subjects must be distinct and at least one, got {subjects}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    forward = (rounds + 1) // 2 if both_orders and len(subjects) > 1 else rounds
    turns = [Turn(-1, s, "forward") for _ in range(warmup) for s in subjects]
    for r in range(rounds):
        if r == forward:
            turns.append(Turn(-1, subjects[0], "reverse"))
        order, names = ("forward", subjects) if r < forward else ("reverse", subjects[::-1])
        turns += [Turn(r, s, order) for s in names]
    return turns


@dataclass
class Rounds:
    """What ``interleave`` measured: each subject's result per round, and each round's order."""

    results: dict[str, list[Any]]
    orders: list[str]

    def values(self, subject: str, key: str | Callable[[Any], float | None] | None = None) -> list:
        """``subject``'s figure per round: the result itself, ``result[key]``, or ``key(result)``."""
        out = self.results[subject]
        if key is None:
            return list(out)
        return [key(x) if callable(key) else x[key] for x in out]

    def ratio(
        self, subject: str, baseline: str, key: str | Callable[[Any], float | None] | None = None
    ) -> dict[str, Any]:
        """Per-round ``subject / baseline``: their median, min, max over all rounds, the median per
        order, and the two orders' medians combined (geometric mean; the one median where only one
        order ran)."""
        a, b = self.values(subject, key), self.values(baseline, key)
        per_round = [x / y if x is not None and y else None for x, y in zip(a, b, strict=True)]
        out: dict[str, Any] = {"per_round": per_round}
        kept = ratios(a, b)
        if not kept:
            return out | {"median": None, "lo": None, "hi": None, "combined": None}
        out["median"], out["lo"], out["hi"] = summary(kept)
        medians = []
        for order in ("forward", "reverse"):
            rs = [r for r, o in zip(per_round, self.orders, strict=True) if o == order and r is not None]
            out[order] = summary(rs)[0] if rs else None
            if rs:
                medians.append(out[order])
        out["combined"] = geometric_mean(medians)
        return out


def interleave(
    subjects: Mapping[str, Callable[[int], Any]],
    rounds: int,
    *,
    warmup: int = 1,
    both_orders: bool = True,
    pause_s: float = PAUSE_S,
    log: Callable[[str], None] | None = None,
) -> Rounds:
    """Run ``subjects`` (name -> ``fn(round)``, ``round`` -1 for an untimed turn) by ``schedule``;
    the results of the timed turns, per subject in round order."""
    results: dict[str, list[Any]] = {s: [None] * rounds for s in subjects}
    orders = ["forward"] * rounds
    for turn in schedule(list(subjects), rounds, warmup, both_orders):
        if pause_s:
            time.sleep(pause_s)
        value = subjects[turn.subject](turn.round)
        if turn.timed:
            results[turn.subject][turn.round] = value
            orders[turn.round] = turn.order
            if log:
                log(f"round {turn.round + 1}/{rounds} ({turn.order}) {turn.subject}: {_short(value)}")
    return Rounds(results, orders)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items() if isinstance(v, int | float))
    return str(value)[:120]


# -- the machine -------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return f"{importlib.metadata.version(d)}" + ("" if d == dists[0] else f" ({d})")
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _gpu() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    p = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    )
    names = [line.strip() for line in p.stdout.splitlines() if line.strip()]
    return ", ".join(names) if p.returncode == 0 and names else None


def _git() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """The machine a run is on (the load average is recorded at the start and the end by ``Report``)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gib": _memory_gib(),
        "gpu": _gpu(),
        "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def command_line(benchmark: str, argv: Sequence[str] | None = None) -> str:
    """How the run was started, as a user types it (``python -m benchmarks.NAME ARGS``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", f"benchmarks.{benchmark}", *map(shlex.quote, args)])


# -- the report --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """A table column: ``key`` in each row, its ``label``, and the format of a number (``""``: text).
    A value of three numbers is a spread (median, min, max) and reads ``m (lo-hi)``."""

    key: str
    label: str
    fmt: str = ""


def column(spec: Column | str | tuple[str, ...]) -> Column:
    if isinstance(spec, Column):
        return spec
    if isinstance(spec, str):
        return Column(spec, spec)
    return Column(*spec)


def cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(v, int | float) for v in value):
        med, lo, hi = value
        return f"{med:{fmt}} ({lo:{fmt}}-{hi:{fmt}})"
    if isinstance(value, int | float) and fmt:
        return format(value, fmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_table(table: Mapping[str, Any]) -> str:
    """A table of a report (as stored in its JSON) in markdown."""
    cols = [Column(**c) if isinstance(c, Mapping) else column(c) for c in table["columns"]]
    lines = [
        "| " + " | ".join(cell(c.label, "") for c in cols) + " |",
        "|" + "|".join("---:" if c.fmt else "---" for c in cols) + "|",
    ]
    for row in table["rows"]:
        values = [row.get(c.key) for c in cols] if isinstance(row, Mapping) else row
        lines.append("| " + " | ".join(cell(v, c.fmt) for v, c in zip(values, cols, strict=True)) + " |")
    return "\n".join(lines)


@dataclass
class Report:
    """One run of one benchmark: the machine, its tables, notes and raw data; markdown and JSON."""

    benchmark: str
    title: str = ""
    argv: Sequence[str] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    tables: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.machine = machine() | {"load_start": _load(), "load_end": None}
        self.command = command_line(self.benchmark, self.argv)
        self.git = _git()

    def table(
        self,
        title: str,
        columns: Sequence[Column | str | tuple[str, ...]],
        rows: Sequence[Mapping[str, Any] | Sequence[Any]],
        note: str = "",
    ) -> dict[str, Any]:
        cols = [column(c) for c in columns]
        t = {
            "title": title,
            "columns": [{"key": c.key, "label": c.label, "fmt": c.fmt} for c in cols],
            "rows": [dict(r) if isinstance(r, Mapping) else list(r) for r in rows],
            "note": note,
        }
        self.tables.append(t)
        return t

    def note(self, text: str) -> None:
        self.notes.append(text)

    def record(self) -> dict[str, Any]:
        """The JSON record (what ``benchmarks/results/`` holds)."""
        return {
            "schema": SCHEMA,
            "source": HARNESS,
            "benchmark": self.benchmark,
            "title": self.title or self.benchmark,
            "command": self.command,
            "date": self.started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git": self.git,
            "machine": self.machine,
            "interleaving": "strict turns, both orders (benchmarks/harness.py)",
            "params": self.params,
            "notes": self.notes,
            "tables": self.tables,
            "raw": self.raw,
        }

    def markdown(self) -> str:
        return render_record(self.record(), heading="##")

    def emit(self, json_path: str | Path | None = None) -> dict[str, Any]:
        """Record the load at the end, print the markdown, write the JSON where asked."""
        self.machine["load_end"] = _load()
        self.machine["seconds"] = round(
            (datetime.datetime.now(datetime.timezone.utc) - self.started).total_seconds(), 1
        )
        rec = self.record()
        print("\n" + render_record(rec, heading="##"), flush=True)
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(rec, indent=1, ensure_ascii=False, default=str) + "\n")
            print(f"\nwrote {json_path}", file=sys.stderr)
        return rec


def machine_line(m: Mapping[str, Any]) -> str:
    """One line for a record's machine (an imported record may carry only a description)."""
    if m.get("description"):
        return str(m["description"])
    parts = [m.get("cpu") or "unknown CPU"]
    if m.get("cores"):
        usable = m.get("cores_usable")
        parts.append(
            f"{m['cores']} cores" + (f" ({usable} usable)" if usable and usable != m["cores"] else "")
        )
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB")
    if m.get("gpu"):
        parts.append(str(m["gpu"]))
    if m.get("onnxruntime"):
        parts.append(f"onnxruntime {m['onnxruntime']}")
    if m.get("python"):
        parts.append(f"Python {m['python']}")
    return ", ".join(parts)


def load_line(rec: Mapping[str, Any]) -> str:
    m = rec.get("machine", {})
    if rec.get("load"):
        return str(rec["load"])
    start, end = m.get("load_start"), m.get("load_end")
    fmt = lambda x: " ".join(f"{v:.2f}" for v in x) if x else "not recorded"  # noqa: E731
    return f"load average {fmt(start)} at the start, {fmt(end)} at the end"


def provenance(rec: Mapping[str, Any], table: Mapping[str, Any] | None = None) -> str:
    """Which run, date, machine and command produced a table, in one line."""
    t = table or {}
    source = rec.get("source", HARNESS)
    git = rec.get("git") or {}
    at = (
        f" at {git['commit'][:7]}" + (" with uncommitted changes" if git.get("dirty") else "")
        if git.get("commit")
        else ""
    )
    how = f"recorded with the harness{at}" if source == HARNESS else f"**imported**: {source}"
    return (
        f"*Run* `{rec.get('run', rec.get('benchmark'))}` · *date* {t.get('date', rec.get('date'))} · "
        f"*machine* {machine_line(rec.get('machine', {}))} · *load* {t.get('load', load_line(rec))} · "
        f"*command* `{t.get('command', rec.get('command'))}` · {how}"
    )


def render_record(rec: Mapping[str, Any], heading: str = "##") -> str:
    """A record in markdown: its title, notes, and every table with its provenance line."""
    out = [f"{heading} {rec.get('title') or rec['benchmark']}", ""]
    for n in rec.get("notes", []):
        out += [n, ""]
    for t in rec.get("tables", []):
        if t.get("title"):
            out += [f"{heading}# {t['title']}", ""]
        out += [provenance(rec, t), "", render_table(t), ""]
        if t.get("note"):
            out += [t["note"], ""]
    return "\n".join(out).rstrip() + "\n"


def add_json_argument(parser: Any) -> None:
    """The ``--json PATH`` every benchmark takes (a record for benchmarks/results/)."""
    parser.add_argument(
        "--json", metavar="PATH", help="also write the run's record (JSON, with the machine) here"
    )
