"""Export, quantize and generate for full-size shapes (random weights): time, peak memory and disk
per size and precision, each step in a fresh process (its own peak RSS, VmHWM). Stages run one
after the other (each needs the one before); there is nothing to interleave. The tables come
from benchmarks/harness.py's report.

python -m benchmarks.bench_export [--presets gpt2-medium gpt2-large gpt2-xl] [--targets ort]
    [--precisions int8-dynamic int4] [--threads 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

from benchmarks.common import CACHE, random_checkpoint
from benchmarks.harness import Column, Report, add_json_argument

# Each child prints one JSON line last: its result and its own peak RSS.
PEAK = "[int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]"
EXPORT = f"""
import json, sys, time
from gpt2_edge.export.bundle import export_bundle
t0 = time.perf_counter()
out = export_bundle(sys.argv[1], sys.argv[2], target=sys.argv[3], overwrite=True, log=lambda m: None)
m = json.load(open(out / "bundle.json"))
print(json.dumps({{"seconds": time.perf_counter() - t0, "timings": m["made_by"]["timings"],
                  "bytes": {{k: v["bytes"] for k, v in m["files"].items()}},
                  "max_abs_logits": m["validation"]["max_abs_logits"],
                  "greedy": m["validation"]["greedy_identical"], "peak_kib": {PEAK}}}))
"""
QUANTIZE = f"""
import json, sys, time
from gpt2_edge.quantize.pipeline import quantize_bundle
t0 = time.perf_counter()
src, precision, dst = sys.argv[1:4]
out, _ = quantize_bundle(src, precision, dst, force=True, overwrite=True, log=lambda m: None)
m = json.load(open(out / "bundle.json"))
print(json.dumps({{"seconds": time.perf_counter() - t0,
                  "bytes": {{k: v["bytes"] for k, v in m["files"].items()}}, "peak_kib": {PEAK}}}))
"""
GENERATE = f"""
import json, sys, time
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig
t0 = time.perf_counter()
g = Generator.from_bundle(sys.argv[1], threads=int(sys.argv[2]))
load = time.perf_counter() - t0
t1 = time.perf_counter()
r = g.generate("The meaning of life is", GenerationConfig(max_new_tokens=16))[0]
ms = 1000 * (time.perf_counter() - t1) / max(1, len(r.token_ids))
print(json.dumps({{"load_s": load, "ms_per_token": ms,
                  "tokens": len(r.token_ids), "peak_kib": {PEAK}}}))
"""


def child(code: str, *args: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"failed: {args}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def gib(kib: float) -> float:
    return kib / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["gpt2-medium", "gpt2-large", "gpt2-xl"])
    ap.add_argument("--targets", nargs="+", default=["ort"])
    ap.add_argument("--precisions", nargs="*", default=["int8-dynamic", "int4"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the bundles (default: remove each size's)")
    add_json_argument(ap)
    args = ap.parse_args(argv)
    report = Report("bench_export", "Export, quantize and generate per size", argv, vars(args))
    exports, quantizes, generates = [], [], []
    report.raw["rows"] = []
    for preset in args.presets:
        ckpt = random_checkpoint(preset)
        weights = (ckpt / "model.safetensors").stat().st_size
        for target in args.targets:
            out = CACHE / f"export-{preset}-{target}"
            r, wall = child(EXPORT, str(ckpt), str(out), target)
            row = {
                "preset": preset,
                "target": target,
                "fp32_weights_bytes": weights,
                "export": r,
                "wall_s": wall,
            }
            t = r["timings"]
            exports.append(
                {
                    "preset": preset,
                    "target": target,
                    "weights": weights / 2**30,
                    "wall": wall,
                    "stages": f"{t['export_s']:.0f} / {t['graph_s']:.0f} / {t.get('validate_s', 0):.0f}",
                    "peak": gib(r["peak_kib"]),
                    "x": r["peak_kib"] * 1024 / weights,
                    "disk": sum(r["bytes"].values()) / 2**20,
                    "dlogits": r["max_abs_logits"],
                    "greedy": r["greedy"],
                }
            )
            print(f"{preset} {target}: exported in {wall:.1f} s", flush=True)
            variants = {"fp32": out}
            for precision in args.precisions:
                q_out = CACHE / f"export-{preset}-{target}-{precision}"
                q, q_wall = child(QUANTIZE, str(out), precision, str(q_out))
                variants[precision] = q_out
                row[precision] = q
                quantizes.append(
                    {
                        "preset": preset,
                        "target": target,
                        "precision": precision,
                        "wall": q_wall,
                        "peak": gib(q["peak_kib"]),
                        "disk": sum(q["bytes"].values()) / 2**20,
                    }
                )
                print(f"{preset} {target} {precision}: quantized in {q_wall:.1f} s", flush=True)
            for precision, bundle in variants.items():
                g, _ = child(GENERATE, str(bundle), str(args.threads))
                row.setdefault("generate", {})[precision] = g
                generates.append(
                    {
                        "preset": preset,
                        "target": target,
                        "precision": precision,
                        "load": g["load_s"],
                        "ms": g["ms_per_token"],
                        "tokens": g["tokens"],
                        "peak": gib(g["peak_kib"]),
                    }
                )
            report.raw["rows"].append(row)
            if not args.keep:
                for bundle in variants.values():
                    shutil.rmtree(bundle, ignore_errors=True)
    report.table(
        "fp32 export (each in a fresh process; peak = its VmHWM)",
        [
            Column("preset", "size"),
            Column("target", "target"),
            Column("weights", "fp32 weights GiB", ".2f"),
            Column("wall", "export s", ".1f"),
            Column("stages", "export / graph / validate s"),
            Column("peak", "RAM to export GiB", ".2f"),
            Column("x", "x weights", ".2f"),
            Column("disk", "disk MiB", ".0f"),
            Column("dlogits", "max |Δlogits|", ".1e"),
            Column("greedy", "greedy identical"),
        ],
        exports,
    )
    if quantizes:
        report.table(
            "quantize",
            [
                Column("preset", "size"),
                Column("target", "target"),
                Column("precision", "precision"),
                Column("wall", "quantize s", ".1f"),
                Column("peak", "RAM to quantize GiB", ".2f"),
                Column("disk", "disk MiB", ".0f"),
            ],
            quantizes,
        )
    report.table(
        f"generate 16 tokens ({args.threads} threads, a fresh process per bundle)",
        [
            Column("preset", "size"),
            Column("target", "target"),
            Column("precision", "precision"),
            Column("load", "load s", ".1f"),
            Column("ms", "ms/token", ".0f"),
            Column("tokens", "tokens", "d"),
            Column("peak", "RAM to run GiB", ".2f"),
        ],
        generates,
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
