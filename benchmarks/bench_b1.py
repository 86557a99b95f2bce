"""Batch-1 decode A/B on a busy machine: two engines in one process, per-op profiles.

bench_peers runs each engine in its own process per round; on a shared 2-core machine the other
users' load moves a round's rate by 2x, so a 5% change in our graph cannot be seen there. Here two
engines (our bundles, each with optional ONNX Runtime session config entries, or ONNX Runtime's
GPT-2 tool's fp32/int8 models from bench_peers' cache) live in one process and take turns every
``--block`` decode steps (greedy, batch 1, 32-token prompt, caches reset every 64 tokens); each
adjacent pair of blocks gives one ratio, so both sides of a ratio saw the same load.

What was learned building it (2 cores, two other users' tests running):
  - the engine that runs second in each pair measured up to 7% faster in an A/A run under load
    (none when quiet), so every comparison runs in both orders and reports the geometric mean of
    the two medians, ``sqrt(r_ab / r_ba)``, with both medians shown;
  - ABBA order (one engine twice in a row) biased A/A runs by 10-20%: the turns stay strictly A, B;
  - each turn starts after a 20 ms pause, so the previous session's spinning pool thread is idle.

    python -m benchmarks.bench_b1 ab ours:BUNDLE ours:OTHER_BUNDLE [--pairs 120]
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
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE

PROMPT, NEW, PAUSE_S = 32, 64, 0.02


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


def alternate(engines: list[Engine], pairs: int, block: int, on_step: Callable | None = None) -> list[list]:
    """Seconds per step of every block, per engine; the engines take strict turns."""
    for e in engines:
        e.reset()
        for _ in range(12):  # warm-up
            e.step()
        e.reset()
    times: list[list[float]] = [[] for _ in engines]
    for _ in range(pairs):
        for j, e in enumerate(engines):
            time.sleep(PAUSE_S)
            if e.steps + block > NEW:
                e.reset()
            t0 = time.perf_counter()
            for _ in range(block):
                t = time.perf_counter()
                e.step()
                if on_step:
                    on_step(j, time.perf_counter() - t)
            times[j].append((time.perf_counter() - t0) / block)
    return times


def worker(args: argparse.Namespace) -> dict:
    """One order of one comparison: medians and the per-pair speed ratios of B over A."""
    a, b = (Engine(s, args.threads) for s in args.engines)
    ta, tb = alternate([a, b], args.pairs, args.block)
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    return {"ms": [1e3 * statistics.median(ta), 1e3 * statistics.median(tb)], "ratios": ratios}


def ab(args: argparse.Namespace) -> None:
    a, b = args.engines
    runs = []
    for engines in ([a, b], [b, a]):
        cmd = [sys.executable, "-m", "benchmarks.bench_b1", "worker", *engines]
        cmd += ["--pairs", str(args.pairs), "--block", str(args.block), "--threads", str(args.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode:
            raise SystemExit(p.stderr[-2000:])
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    load = open("/proc/loadavg").read().split()[:3]
    r_ab = statistics.median(runs[0]["ratios"])  # B's speed over A's, B second
    r_ba = statistics.median(runs[1]["ratios"])  # A's speed over B's, A second
    q_ab, q_ba = (statistics.quantiles(r["ratios"], n=4) for r in runs)
    print(f"{args.pairs} pairs of {args.block}-step blocks per order; load average after: {' '.join(load)}")
    print(f"A {a}: {runs[0]['ms'][0]:.2f} / {runs[1]['ms'][1]:.2f} ms/step (median, each order)")
    print(f"B {b}: {runs[0]['ms'][1]:.2f} / {runs[1]['ms'][0]:.2f} ms/step")
    print(
        f"speed B/A: {math.sqrt(r_ab / r_ba):.3f}  (B second: {r_ab:.3f}, IQR {q_ab[0]:.3f}-{q_ab[2]:.3f}; "
        f"A second: {1 / r_ba:.3f}, IQR {1 / q_ba[2]:.3f}-{1 / q_ba[0]:.3f})"
    )


def profile(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engines = [Engine(s, args.threads, profile_dir=tmp) for s in args.engines]
        walls: list[list[float]] = [[] for _ in engines]
        block = args.block
        alternate(engines, max(1, args.steps // block), block, lambda j, s: walls[j].append(s))
        n = len(walls[0])
        table: dict[str, dict] = {}
        for j, e in enumerate(engines):
            events = json.loads(Path(e.session.end_profiling()).read_text())
            table[e.spec] = _per_op(events, n) | {"wall_ms": 1e3 * statistics.median(walls[j])}
    for spec, t in table.items():
        print(
            f"\n{spec}: wall {t['wall_ms']:.2f} ms/step, session run {t['run_ms']:.2f}, "
            f"kernels {t['kernel_ms']:.2f}, {t['nodes']:.0f} nodes run"
        )
        print("| op type | nodes | ms/step | share of kernels |\n|---|---:|---:|---:|")
        for op, (count, ms) in t["ops"].items():
            print(f"| {op} | {count:.0f} | {ms:.3f} | {100 * ms / t['kernel_ms']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("ab", "profile", "worker"))
    ap.add_argument("engines", nargs="+", help="ours:BUNDLE[@key=value,...] | ortgpt2:fp32|int8")
    ap.add_argument("--pairs", type=int, default=120, help="ab: pairs of blocks per order")
    ap.add_argument("--block", type=int, default=8, help="decode steps per turn")
    ap.add_argument("--steps", type=int, default=100, help="profile: timed steps per engine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="profile: also write the tables here")
    args = ap.parse_args()
    if args.mode == "profile":
        profile(args)
        return
    if len(args.engines) != 2:
        raise SystemExit("ab compares two engines")
    if args.mode == "worker":
        print(json.dumps(worker(args)))
    else:
        ab(args)


if __name__ == "__main__":
    main()
