"""Batch-1 decode A/B on a busy machine: two engines in one process, per-op profiles.

bench_peers runs each engine in its own process per round; on a shared 2-core machine the other
users' load moves a round's rate by 2x, so a 5% change in our graph cannot be seen there. Here two
engines (our bundles, each with optional ONNX Runtime session config entries, or ONNX Runtime's
GPT-2 tool's fp32/int8 models from bench_peers' cache) live in one process and take turns every
``--block`` decode steps (greedy, batch 1, 32-token prompt, caches reset every 64 tokens); each
round (a pair of adjacent blocks) gives one ratio, so both sides of a ratio saw the same load.

What was learned building it (2 cores, two other users' tests running; commit 02ad5d5), and what
made it benchmarks/harness.py's one method for every benchmark:
  - the engine that runs second in each pair measured up to 7% faster in an A/A run under load
    (none when quiet), so every comparison runs in both orders and reports the geometric mean of
    the two medians, ``sqrt(r_ab / r_ba)``, with both medians shown;
  - ABBA order (one engine twice in a row) biased A/A runs by 10-20%: the turns stay strictly A, B;
  - each turn starts after a 20 ms pause, so the previous session's spinning pool thread is idle.
Both orders now run in one process (the harness: ``--pairs`` rounds A, B, then one untimed A,
then ``--pairs`` rounds B, A); before the harness each order ran in its own process.

    python -m benchmarks.bench_b1 ab ours:BUNDLE ours:OTHER_BUNDLE [--pairs 120] [--json PATH]
    python -m benchmarks.bench_b1 ab ours:BUNDLE@session.dynamic_block_base=4 ortgpt2:int8
    python -m benchmarks.bench_b1 profile ours:BUNDLE ortgpt2:fp32 [--steps 100]

``profile``: ONNX Runtime's profiler on each engine (blocks alternating as above), per op type the
median over steps of that step's kernel time, plus a step's session run time and wall time (run
and Python); the profiler adds its own time between kernels, so compare run - kernel only
between engines of one run.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import quartiles, summary

PROMPT, NEW = 32, 64


class Engine:
    """One model decoding one sequence step by step: ``reset`` (prefill, untimed) and ``step``."""

    def __init__(self, spec: str, threads: int, profile_dir: str | None = None) -> None:
        self.spec = spec
        self.steps = 0
        kind, _, rest = spec.partition(":")
        prompt = np.random.default_rng(0).integers(0, 50256, PROMPT).tolist()
        if kind == "ours":
            self.session, self.reset, self.step = self._ours(rest, prompt, threads, profile_dir)
        elif kind == "ortgpt2":
            self.session, self.reset, self.step = self._tool(rest, prompt, threads, profile_dir)
        else:
            raise SystemExit(f"an engine is ours:BUNDLE[@key=value,...] or ortgpt2:fp32|int8, got {spec!r}")

    def _ours(self, rest: str, prompt: list[int], threads: int, profile_dir: str | None) -> tuple:
        import onnxruntime as ort

        from gpt2_edge.runtime.bundle import Bundle
        from gpt2_edge.runtime.session import OrtBackend

        path, _, cfg = rest.partition("@")
        config = dict(kv.split("=", 1) for kv in cfg.split(",")) if cfg else None
        if profile_dir:  # the backend makes its own SessionOptions: profile every one made here
            _profiling_session_options(ort, profile_dir)
        backend = OrtBackend(Bundle.load(path, verify=False), threads=threads, session_config=config)
        state: dict = {}

        def reset() -> None:
            state["cache"] = backend.new_cache(1, PROMPT + NEW + 1)
            state["tok"] = int(state["cache"].prefill([0], [prompt])[0].argmax())
            self.steps = 0

        def step() -> None:
            state["tok"] = int(state["cache"].decode([0], [state["tok"]])[0].argmax())
            self.steps += 1

        return backend.session, reset, step

    def _tool(self, precision: str, prompt: list[int], threads: int, profile_dir: str | None) -> tuple:
        """bench_peers' loop for the tool's stacked-past graph (presents fed back as numpy)."""
        import onnxruntime as ort

        model = CACHE / "ort-gpt2-tool" / precision / "model.onnx"
        if not model.is_file():
            raise SystemExit(f"{model} is missing: run bench_peers --only ortgpt2 once to build it")
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        if profile_dir:
            so.enable_profiling, so.profile_file_prefix = True, f"{profile_dir}/tool"
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        past = [i.name for i in sess.get_inputs() if i.name.startswith("past")]
        state: dict = {}

        def reset() -> None:
            feeds = {
                "input_ids": np.array([prompt], np.int64),
                "position_ids": np.arange(PROMPT, dtype=np.int64)[None],
                "attention_mask": np.ones((1, PROMPT), np.int64),
            }
            empty = {n: np.zeros((2, 1, 12, 0, 64), np.float32) for n in past}
            outs = sess.run(None, {**feeds, **empty})
            state.update(outs=outs, nxt=outs[0][:, -1].argmax(-1), total=PROMPT)
            self.steps = 0

        def step() -> None:
            state["total"] += 1
            t = state["total"]
            feeds = {
                "input_ids": state["nxt"][:, None].astype(np.int64),
                "position_ids": np.full((1, 1), t - 1, np.int64),
                "attention_mask": np.ones((1, t), np.int64),
            }
            outs = sess.run(None, {**feeds, **dict(zip(past, state["outs"][1:], strict=True))})
            state.update(outs=outs, nxt=outs[0][:, -1].argmax(-1))
            self.steps += 1

        return sess, reset, step


def _profiling_session_options(ort, directory: str) -> None:
    base = ort.SessionOptions
    if getattr(base, "_bench_b1", False):
        return

    class Profiled(base):
        _bench_b1 = True

        def __init__(self) -> None:
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = f"{directory}/ours"

    ort.SessionOptions = Profiled


def block_turn(
    e: Engine, block: int, on_step: Callable[[float], None] | None = None
) -> Callable[[int], float]:
    """One turn of ``e``: ``block`` decode steps (the cache reset first where it would pass ``NEW``);
    seconds per step."""

    def turn(_: int) -> float:
        if e.steps + block > NEW:
            e.reset()
        t0 = time.perf_counter()
        for _ in range(block):
            t = time.perf_counter()
            e.step()
            if on_step:
                on_step(time.perf_counter() - t)
        return (time.perf_counter() - t0) / block

    return turn


def warm(engines: list[Engine]) -> None:
    for e in engines:
        e.reset()
        for _ in range(12):
            e.step()
        e.reset()


def ab(args: argparse.Namespace, report: Report) -> None:
    a, b = args.engines
    engines = {"A": Engine(a, args.threads), "B": Engine(b, args.threads)}
    warm(list(engines.values()))
    runs = interleave({k: block_turn(e, args.block) for k, e in engines.items()}, 2 * args.pairs, warmup=0)
    speed = lambda s: 1 / s  # noqa: E731 - steps per second
    r = runs.ratio("B", "A", speed)  # B's speed over A's, per round
    rows = []
    for order, second in (("forward", "B"), ("reverse", "A")):
        per = [x for x, o in zip(r["per_round"], runs.orders, strict=True) if o == order]
        q1, med, q3 = quartiles(per)
        ms = {
            k: 1e3 * summary([v for v, o in zip(runs.values(k), runs.orders, strict=True) if o == order])[0]
            for k in engines
        }
        rows.append(
            {
                "order": f"{'A, B' if second == 'B' else 'B, A'} ({second} second)",
                "a_ms": ms["A"],
                "b_ms": ms["B"],
                "ratio": med,
                "iqr": f"{q1:.3f}-{q3:.3f}",
            }
        )
    rows.append({"order": "both orders combined (geometric mean)", "ratio": r["combined"]})
    report.raw["seconds_per_step"] = runs.results
    report.raw["orders"] = runs.orders
    report.table(
        f"A = {a}, B = {b}: {args.pairs} rounds of {args.block}-step blocks per order, batch 1, "
        f"{args.threads} threads",
        [
            Column("order", "order"),
            Column("a_ms", "A ms/step (median)", ".2f"),
            Column("b_ms", "B ms/step (median)", ".2f"),
            Column("ratio", "speed B / A (median)", ".3f"),
            Column("iqr", "IQR"),
        ],
        rows,
    )


def profile(args: argparse.Namespace, report: Report) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engines = [Engine(s, args.threads, profile_dir=tmp) for s in args.engines]
        warm(engines)
        walls: list[list[float]] = [[] for _ in engines]
        block = args.block
        turns = {e.spec: block_turn(e, block, walls[j].append) for j, e in enumerate(engines)}
        rounds = max(1, args.steps // block)
        interleave(turns, rounds, warmup=0, both_orders=False)  # the profiler's runs: the last steps
        n = rounds * block
        table: dict[str, dict] = {}
        for j, e in enumerate(engines):
            events = json.loads(Path(e.session.end_profiling()).read_text())
            table[e.spec] = _per_op(events, n) | {"wall_ms": 1e3 * summary(walls[j][-n:])[0]}
    report.raw["profiles"] = table
    for spec, t in table.items():
        report.table(
            f"{spec}: wall {t['wall_ms']:.2f} ms/step, session run {t['run_ms']:.2f}, kernels "
            f"{t['kernel_ms']:.2f}, {t['nodes']:.0f} nodes run",
            [
                Column("op", "op type"),
                Column("nodes", "nodes", ".0f"),
                Column("ms", "ms/step", ".3f"),
                Column("share", "share of kernels", ".1%"),
            ],
            [
                {"op": op, "nodes": c, "ms": ms, "share": ms / t["kernel_ms"]}
                for op, (c, ms) in t["ops"].items()
            ],
        )


def _per_op(events: list[dict], steps: int) -> dict:
    """Per op type: (nodes per step, median over the last ``steps`` runs of the step's kernel ms)."""
    runs = [e for e in events if e.get("name") == "model_run"][-steps:]
    kernels = sorted(
        (e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
        key=lambda e: e["ts"],
    )
    per_step, k = [], 0
    for r in runs:
        counts, us = collections.Counter(), collections.Counter()
        while k < len(kernels) and kernels[k]["ts"] < r["ts"]:
            k += 1
        while k < len(kernels) and kernels[k]["ts"] <= r["ts"] + r["dur"]:
            op = kernels[k]["args"]["op_name"]
            counts[op] += 1
            us[op] += kernels[k]["dur"]
            k += 1
        per_step.append((counts, us))
    ops = {o for _, us in per_step for o in us}
    rows = {
        o: (statistics.median(c[o] for c, _ in per_step), statistics.median(u[o] for _, u in per_step) / 1e3)
        for o in ops
    }
    return {
        "run_ms": statistics.median(r["dur"] for r in runs) / 1e3,
        "kernel_ms": statistics.median(sum(u.values()) for _, u in per_step) / 1e3,
        "nodes": statistics.median(sum(c.values()) for c, _ in per_step),
        "ops": dict(sorted(rows.items(), key=lambda kv: -kv[1][1])),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("ab", "profile"))
    ap.add_argument("engines", nargs="+", help="ours:BUNDLE[@key=value,...] | ortgpt2:fp32|int8")
    ap.add_argument("--pairs", type=int, default=120, help="ab: rounds (pairs of blocks) per order")
    ap.add_argument("--block", type=int, default=8, help="decode steps per turn")
    ap.add_argument("--steps", type=int, default=100, help="profile: timed steps per engine")
    ap.add_argument("--threads", type=int, default=2)
    add_json_argument(ap)
    args = ap.parse_args(argv)
    report = Report("bench_b1", f"Batch-1 decode, two engines in one process ({args.mode})", argv, vars(args))
    if args.mode == "profile":
        profile(args, report)
    elif len(args.engines) != 2:
        raise SystemExit("ab compares two engines")
    else:
        ab(args, report)
    report.emit(args.json)


if __name__ == "__main__":
    main()
