"""Export time and peak memory for full-size shapes (random weights), one fresh process each.

python -m benchmarks.bench_export [--presets gpt2 gpt2-medium] [--targets ort tensorrt]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import CACHE, random_checkpoint

CHILD = """
import json, resource, sys, time
from gpt2_edge.export.bundle import export_bundle
t0 = time.perf_counter()
out = export_bundle(sys.argv[1], sys.argv[2], target=sys.argv[3], overwrite=True, log=lambda m: None)
m = json.load(open(out / "bundle.json"))
print(json.dumps({"seconds": time.perf_counter() - t0, "timings": m["made_by"]["timings"],
                  "bytes": {k: v["bytes"] for k, v in m["files"].items()}, "fused": m["graph"]["fused_ops"],
                  "max_abs_logits": m["validation"]["max_abs_logits"],
                  "top1": m["validation"]["top1_agreement"], "greedy": m["validation"]["greedy_identical"],
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["gpt2", "gpt2-medium"])
    ap.add_argument("--targets", nargs="+", default=["ort", "tensorrt"])
    args = ap.parse_args()
    for preset in args.presets:
        ckpt = random_checkpoint(preset)
        for target in args.targets:
            out = CACHE / f"export-{preset}-{target}"
            t0 = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-c", CHILD, str(ckpt), str(out), target],
                capture_output=True,
                text=True,
                check=True,
            )
            wall = time.perf_counter() - t0
            r = json.loads(res.stdout.strip().splitlines()[-1])
            mib = sum(r["bytes"].values()) / 2**20
            peak = r["peak_kib"]
            print(
                f"{preset:<12} {target:<9} wall {wall:6.1f} s (export {r['timings']['export_s']:.1f}, "
                f"graph {r['timings']['graph_s']:.1f}, validate {r['timings'].get('validate_s', 0):.1f}) | "
                f"peak RSS "
                f"{peak / 2**20:.2f} GiB | bundle {mib:.0f} MiB | max |dlogits| {r['max_abs_logits']:.2e}, "
                f"top-1 {100 * r['top1']:.1f}%, greedy identical {r['greedy']} | fused {r['fused'] or '-'}"
            )


if __name__ == "__main__":
    main()
