"""Where a bundle's peak RSS goes, per precision, and what each memory choice saves and costs.

Breakdown (the default): one process per precision and setting, VmRSS / VmHWM read from /proc
at each stage of what ``gpt2-edge bench`` and ``benchmarks/bench_peers.py`` do, in that order:
the imports (numpy, onnxruntime, tokenizers, gpt2_edge), the session (its load peak, what stays),
the tokenizer, a batch-1 decode (32-token prompt, 64 new tokens, after a warm-up); the peak is
reset between stages (``/proc/self/clear_refs``), so each stage's peak is its own. ``--full``
adds the rest of the bench (512-token prompt, batch 8, 896-token context). Settings: "before" is
this runtime with its memory choices switched off (``GPT2_EDGE_MAP_WEIGHTS=0
GPT2_EDGE_MALLOC_TRIM=0``: weights parsed and copied, the heap kept), "mapped" maps the weights
(runtime.mapped), "after" also trims the heap (the defaults).

Compare (``--compare``): the bench's own measurement (``python -m gpt2_edge.bench --worker``,
peak RSS and speed), every (precision, variant) a subject in strict turns (benchmarks/harness.py),
medians and the median of the per-round ratios. ``--b1`` shortens every prompt to the batch-1
decode's (batch 1, 32-token prompts) for the batch-1 peak.

    python -m benchmarks.bench_memory [--precisions fp32 int8-dynamic int4] [--full] [--json PATH]
    python -m benchmarks.bench_memory --compare [--rounds 3] [--b1] [--variants before after ...]
        [--json PATH]

The bundles are the random-weight 124M-shaped ones of benchmarks/common.py (made and cached on
first use). RSS does not depend on the machine's load; speed does (alternate, take medians).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import bench_worker
from gpt2_edge.measure import ratio_summary, summary

# The worker's first stage ("Python + imports") counts what this module imports: the harness
# (platform, importlib.metadata, subprocess) is imported where a report is made, not here.

MIB = 2**20
PRECISIONS = ("fp32", "int8-dynamic", "int4", "int8-weight")  # the first three: bench_peers' classes
OFF = {"GPT2_EDGE_MAP_WEIGHTS": "0", "GPT2_EDGE_MALLOC_TRIM": "0"}
NO_PREPACK = {"session.disable_prepacking": "1"}
# name -> (environment, session config): each memory choice alone, then together
VARIANTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "before": (OFF, {}),
    "trim": ({"GPT2_EDGE_MAP_WEIGHTS": "0"}, {}),
    "mapped": ({"GPT2_EDGE_MALLOC_TRIM": "0"}, {}),
    "after": ({}, {}),
    "after-no-prepack": ({}, NO_PREPACK),
    "after-no-arena": ({}, {"session.enable_cpu_mem_arena": "0"}),
}
SPEED_KEYS = ("load_s", "ttft_short_ms", "ttft_long_ms", "decode_b1", "decode_batch", "decode_long")


def bundles(precisions: list[str]) -> dict[str, Path]:
    from benchmarks.common import bundle_of, random_checkpoint, variant_of

    base = bundle_of(random_checkpoint("gpt2"))
    return {p: base if p == "fp32" else variant_of(base, p) for p in precisions}


# one process: the stages ---------------------------------------------------------------------
def status() -> dict[str, float]:
    keys = {"VmHWM": "hwm", "VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k = line.split(":")[0]
        if k in keys:
            out[keys[k]] = int(line.split()[1]) / 1024
    return out


def next_stage() -> None:
    """Reset VmHWM to the current RSS (Linux 4.0+), so the next stage's peak is its own."""
    Path("/proc/self/clear_refs").write_text("5")


def stages(path: str, threads: int, session_config: dict[str, str], full: bool) -> dict:
    """The bench's steps in this process, ``status()`` after each (run in a fresh interpreter)."""
    out = {"python": status()}
    import numpy as np
    import onnxruntime  # noqa: F401
    import tokenizers  # noqa: F401

    from gpt2_edge.runtime.backends import load_backend
    from gpt2_edge.runtime.generator import Generator
    from gpt2_edge.runtime.sampling import GenerationConfig

    out["imports"] = status()
    next_stage()
    backend = load_backend(path, "cpu", threads=threads, verify=False, session_config=session_config)
    out["session"] = status()
    next_stage()
    bundle = backend.bundle
    gen = Generator(backend, bundle.tokenizer(), bundle.eos_token_id, backend.n_ctx)
    out["tokenizer"] = status()
    next_stage()
    rng = np.random.default_rng(0)
    vocab = bundle.dims.vocab_size

    def run(n: int, batch: int, new: int) -> dict:
        prompts = [[int(t) for t in rng.integers(0, vocab, n)] for _ in range(batch)]
        return gen.generate(prompts, GenerationConfig(max_new_tokens=new, ignore_eos=True))[0].timings

    run(32, 1, 4)  # the bench's warm-up
    t = run(32, 1, 64)
    out["b1"] = status()
    out["b1_tok_s"] = (t["steps"] - 1) / t["decode_s"]
    if full:
        next_stage()
        run(512, 1, 1)
        run(32, 8, 64)
        run(896, 1, 64)
        out["bench"] = status()
    out["weights_mib"] = bundle.manifest.model_bytes() / MIB
    out["mapped_mib"] = (backend.mapped.bytes_mapped / MIB) if backend.mapped is not None else 0.0
    return out


def run_stages(
    path: Path, env: dict[str, str], session_config: dict[str, str], threads: int, full: bool
) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--worker", str(path), "--threads", str(threads)]
    cmd += ["--session-config", json.dumps(session_config)] + (["--full"] if full else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"{path}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


SETTINGS = ("before", "mapped", "after")  # names in VARIANTS


def breakdown(precisions: list[str], threads: int, full: bool, report) -> None:
    from benchmarks.harness import Column

    rows = []
    for precision, path in bundles(precisions).items():
        for setting in SETTINGS:
            env, config = VARIANTS[setting]
            s = run_stages(path, env, config, threads, full)
            imp, ses, tok, b1 = s["imports"], s["session"], s["tokenizer"], s["b1"]
            row = {
                "class": precision,
                "setting": setting,
                "Python + imports": imp["rss"],
                "model file": s["weights_mib"],
                "mapped": s["mapped_mib"],
                "session: load peak": ses["hwm"] - imp["rss"],
                "session: kept": ses["rss"] - imp["rss"],
                "tokenizer: peak": tok["hwm"] - ses["rss"],
                "tokenizer: kept": tok["rss"] - ses["rss"],
                "b1 decode": b1["rss"] - tok["rss"],
                "RSS after b1": b1["rss"],
                "of which file-backed": b1["file"],
                "peak b1": max(x["hwm"] for x in (ses, tok, b1)),
                "b1 tok/s (1 run)": s["b1_tok_s"],
            }
            if full:
                row["peak bench"] = max(row["peak b1"], s["bench"]["hwm"])
            rows.append(row)
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    cols = [Column("class", "class"), Column("setting", "setting")] + [
        Column(c, c, ".1f" if "tok/s" in c else ".0f") for c in list(rows[0])[2:]
    ]
    report.table(
        f"MiB per stage, the peak reset between stages, batch-1 decode (32-token prompt, 64 new tokens), "
        f"{threads} threads",
        cols,
        rows,
    )


# the bench's measurement, variants alternating -----------------------------------------------
def compare(precisions: list[str], variants: list[str], rounds: int, threads: int, b1: bool, report) -> None:
    from benchmarks.harness import Column, interleave

    paths = bundles(precisions)
    config = {"threads": threads}
    if b1:
        config.update(batch=1, long_prompt=32, long_context=32)
    subjects = {
        f"{p} {v}": (
            lambda _r, path=paths[p], v=v: bench_worker(
                path, config | {"session_config": VARIANTS[v][1]}, env=VARIANTS[v][0]
            )
        )
        for p in precisions
        for v in variants
    }
    runs = interleave(subjects, rounds, log=lambda m: print(m, file=sys.stderr, flush=True))
    report.raw["runs"] = runs.results
    report.raw["orders"] = runs.orders
    keys = ("peak_rss_mib", *SPEED_KEYS)
    cols = [Column("class", "class"), Column("variant", "variant")]
    medians, ratios = [], []
    base = variants[0]
    for p in precisions:
        for v in variants:
            s = f"{p} {v}"
            medians.append({"class": p, "variant": v} | {k: summary(runs.values(s, k))[0] for k in keys})
            if v != base:
                ratios.append(
                    {"class": p, "variant": v}
                    | {k: ratio_summary(runs.values(s, k), runs.values(f"{p} {base}", k))[0] for k in keys}
                )
    fmt = {"peak_rss_mib": ".0f", "load_s": ".2f"}
    report.table(
        f"medians of {rounds} rounds (gpt2-edge bench's worker"
        f"{', batch 1 and 32-token prompts' if b1 else ''})",
        cols + [Column(k, k, fmt.get(k, ".1f")) for k in keys],
        medians,
    )
    if ratios:
        report.table(
            f"per-round ratio to {base}, median over rounds (decode > 1 is faster, RSS and times < 1 "
            "are lower)",
            cols + [Column(k, k, ".2f") for k in keys],
            ratios,
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS[:3]), choices=PRECISIONS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", action="store_true", help="the bench's measurement, variants alternating")
    ap.add_argument("--variants", nargs="+", default=["before", "after"], choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--b1", action="store_true", help="compare: batch 1 and 32-token prompts only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--session-config", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help="breakdown: also the rest of the bench")
    ap.add_argument(
        "--json", metavar="PATH", help="also write the run's record (JSON, with the machine) here"
    )
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(stages(a.worker, a.threads, json.loads(a.session_config), a.full)))
        return
    from benchmarks.harness import Report

    title = "Memory: " + ("the memory choices compared" if a.compare else "where a bundle's peak RSS goes")
    report = Report("bench_memory", title, argv, vars(a))
    if a.compare:
        compare(a.precisions, a.variants, a.rounds, a.threads, a.b1, report)
    else:
        breakdown(a.precisions, a.threads, a.full, report)
    report.emit(a.json)


if __name__ == "__main__":
    main()
