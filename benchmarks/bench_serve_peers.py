"""Serving against llama-server, measured by guidellm: the kit's server and llama-server on the same
f32 weights (GPT-2 124M shape, random weights: benchmarks/common.py), each driven by guidellm at
1, 4 and 16 concurrent streaming clients with exact lengths (``--prompt-tokens`` 128 synthetic
prompt tokens, ``--output-tokens`` 64 new tokens, eos ignored), on ``/v1/completions``.

The servers (each started once, loopback, on ports from ``--port-base``):

- ``kit``: ``python -m gpt2_edge.serve`` on the fp32 in-place bundle, ``--max-batch 16 --threads
  T`` and ``--kit-args`` (e.g. ``--step-tokens 0``); ``--compare-tree DIR`` adds the same server
  run from another checkout (``kit @DIR``: before/after a change, interleaved);
- ``llama-server fa=X`` for each ``--flash-attn`` value (``none``: no llama-server): the checkpoint
  converted to GGUF f32 by llama.cpp's own ``convert_hf_to_gguf.py`` (cached), ``-t T -tb T -np 16
  -c 16 x (prompt + output + 64) --cont-batching -fa X --no-webui``.

Level by level the servers take strict turns (benchmarks/harness.py: ``--rounds`` rounds, both
orders), each turn one ``guidellm run --profile kind=concurrent,streams=C --constraint
kind=max_requests,count=N`` (N = ``--requests-per-client`` x C) with its JSON report. Reported per
server and level, medians over the rounds: output tokens/s (guidellm's server throughput), time to
first token p50 / p99, inter-token latency p50 / p99, and each server's peak RSS (VmHWM) after all
levels; then kit / each other server, the median of the per-round ratios.

What guidellm calls inter-token latency is a **per-request mean**: (last token - first token) /
(output tokens - 1), its percentiles taken over requests (guidellm 0.8.1,
``schemas/base/request_stats.py``). So a prefill that runs while a stream decodes counts in full
however it is chunked: it is *when* prompts go in that decides the figure (serve/scheduler.py's
``step_tokens``, issue 23).

guidellm is not a dependency: install it in its own environment (``--guidellm``, default
``$GUIDELLM`` or ``guidellm`` on the PATH); it needs a tokenizer, given as the checkpoint directory
(the GPT-2 tokenizer files ``random_checkpoint`` writes; no hub access). llama-server:
``--llama-server`` (default ``$LLAMA_SERVER``), built from llama.cpp's sources; its source tree
(``<src>/build/bin/llama-server``) provides the converter.

    python -m benchmarks.bench_serve_peers --llama-server PATH --guidellm PATH            # 1/4/16
    python -m benchmarks.bench_serve_peers --levels 4,16 --rounds 4 --json out.json
    python -m benchmarks.bench_serve_peers --kit-args="--step-tokens 0" --compare-tree ../main
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_serve import ChildServer, Server
from benchmarks.common import CACHE, bundle_of, random_checkpoint
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import peak_rss_mib, summary

REPO = Path(__file__).resolve().parent.parent
METRICS = {  # our key -> (guidellm metric, statistic)
    "output_tok_s": ("output_tokens_per_second", "mean"),
    "ttft_p50_ms": ("time_to_first_token_ms", "p50"),
    "ttft_p99_ms": ("time_to_first_token_ms", "p99"),
    "itl_p50_ms": ("inter_token_latency_ms", "p50"),
    "itl_p99_ms": ("inter_token_latency_ms", "p99"),
}


def gguf_f32(checkpoint: Path, llama_src: Path) -> Path:
    """``checkpoint`` in GGUF f32 by llama.cpp's own converter (cached beside bench_peers' copy)."""
    out = CACHE / "llama" / "model-f32.gguf"
    if out.is_file():
        return out
    script = llama_src / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"no {script}: give --llama-server inside a llama.cpp source tree (build/bin/)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    env = {**os.environ, "PYTHONPATH": str(llama_src / "gguf-py")}
    cmd = [sys.executable, str(script), str(checkpoint), "--outtype", "f32", "--outfile", str(tmp)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed: {p.stderr.strip().splitlines()[-1:]}")
    tmp.rename(out)
    return out


class LlamaServer(ChildServer):
    """llama-server in a child process on a loopback port."""

    what = "llama-server"

    def __init__(self, binary: Path, gguf: Path, port: int, threads: int, ctx: int, flash_attn: str) -> None:
        t = str(threads)
        cmd = [
            str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", t, "-tb", t,
            "-np", "16", "-c", str(ctx), "--cont-batching", "-fa", flash_attn, "--no-webui",
        ]  # fmt: skip
        self._start(cmd, port)


def guidellm_turn(args: argparse.Namespace, url: str, clients: int, tokenizer: Path) -> dict:
    """One guidellm run against ``url`` at ``clients`` concurrent streams: its figures (METRICS), the
    requests completed and errored, and the wall time of the run."""
    data = f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}"
    with tempfile.TemporaryDirectory(prefix="bench-serve-peers-") as tmp:
        out = Path(tmp) / "report.json"
        cmd = [
            args.guidellm, "run",
            "--backend", f"kind=openai_http,target={url},request_format=/v1/completions",
            "--profile", f"kind=concurrent,streams={clients}",
            "--constraint", f"kind=max_requests,count={args.requests_per_client * clients}",
            "--data", data,
            "--tokenizer", f"kind=hf_auto,model={tokenizer}",
            "--output", f"kind=json,path={out}",
            "--disable-console",
        ]  # fmt: skip
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.turn_timeout)
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not out.is_file():
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            return {"error": f"guidellm exited {p.returncode}: {' | '.join(tail)}", "wall_s": wall}
        bench = json.loads(out.read_text())["benchmarks"][0]
    m = bench["metrics"]
    result: dict = {"wall_s": wall, "duration_s": bench.get("duration")}
    for key, (metric, stat) in METRICS.items():
        s = m[metric]["successful"]
        result[key] = s["mean"] if stat == "mean" else s["percentiles"][stat]
    totals = m["request_totals"]
    result["requests"] = totals["successful"]
    result["errors"] = totals["errored"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="rounds of strict turns per level (both orders)")
    p.add_argument(
        "--requests-per-client", type=int, default=6, help="guidellm's max_requests = this x clients"
    )
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="each server's threads")
    p.add_argument(
        "--flash-attn",
        default="off",
        help="llama-server -fa values, one server each (off,auto); none: no llama-server (the kit alone, "
        "or against --compare-tree)",
    )
    p.add_argument("--kit-args", default="", help="extra arguments of the kit's server (one string)")
    p.add_argument("--compare-tree", metavar="DIR", help="also run the kit's server from this checkout")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="llama-server binary")
    p.add_argument("--guidellm", default=os.environ.get("GUIDELLM") or shutil.which("guidellm"))
    p.add_argument("--port-base", type=int, default=18300, help="loopback ports from here (llama-server's)")
    p.add_argument("--turn-timeout", type=float, default=600.0, help="seconds one guidellm run may take")
    add_json_argument(p)
    args = p.parse_args(argv)
    fa_values = [] if args.flash_attn == "none" else args.flash_attn.split(",")
    if fa_values and (not args.llama_server or not Path(args.llama_server).is_file()):
        p.error("give --llama-server PATH (or set $LLAMA_SERVER): a llama-server binary in a llama.cpp tree")
    if not args.guidellm or not Path(args.guidellm).is_file():
        p.error("give --guidellm PATH (or set $GUIDELLM): guidellm installed in its own environment")
    levels = [int(x) for x in args.levels.split(",")]
    report = Report("bench_serve_peers", "Serving against llama-server (guidellm)", argv, vars(args))

    checkpoint = random_checkpoint("gpt2")
    bundle = bundle_of(checkpoint)
    if fa_values:
        binary = Path(args.llama_server).resolve()
        gguf = gguf_f32(checkpoint, binary.parents[2])
    ctx = 16 * (args.prompt_tokens + args.output_tokens + 64)
    servers: dict[str, Server | LlamaServer] = {
        "kit": Server(bundle, 16, args.threads, extra=tuple(shlex.split(args.kit_args)))
    }
    if args.compare_tree:
        tree = Path(args.compare_tree).resolve()
        servers[f"kit @{tree.name}"] = Server(
            bundle, 16, args.threads, extra=tuple(shlex.split(args.kit_args)), repo=tree
        )
    for i, fa in enumerate(fa_values):
        servers[f"llama-server fa={fa}"] = LlamaServer(
            binary, gguf, args.port_base + i, args.threads, ctx, fa
        )
    print(f"bench_serve_peers: {bundle.name}; servers {', '.join(servers)}", file=sys.stderr)
    rows: list[dict] = []
    raw: dict[str, dict] = {}
    try:
        for s in servers.values():
            s.wait_ready()
        for clients in levels:
            runs = interleave(
                {
                    n: (lambda r, s=s, c=clients: guidellm_turn(args, s.url, c, checkpoint))
                    for n, s in servers.items()
                },
                args.rounds,
                warmup=0,
                log=lambda msg, c=clients: print(f"  x{c} {msg}", file=sys.stderr, flush=True),
            )
            raw[str(clients)] = {"results": runs.results, "orders": runs.orders}
            for name in servers:
                ok = [x for x in runs.values(name) if "error" not in x]
                row = {"server": name, "clients": clients, "rounds": len(ok)}
                for key in METRICS:
                    row[key] = summary([x[key] for x in ok])[0] if ok else None
                row["errors"] = sum(x.get("errors", 0) for x in ok) + len(runs.values(name)) - len(ok)
                rows.append(row)
            kit = "kit"
            for name in servers:
                if name == kit:
                    continue
                ratio = {"server": f"kit / {name}", "clients": clients}
                for key in METRICS:
                    ratio[key] = runs.ratio(kit, name, lambda x, k=key: x.get(k))["median"]
                rows.append(ratio)
        for name, s in servers.items():
            rss = peak_rss_mib(s.proc.pid)
            for row in rows:
                if row["server"] == name:
                    row["peak_rss_mib"] = rss
        for row in rows:
            if row["server"].startswith("kit / "):
                other = row["server"][len("kit / ") :]
                a = next(r["peak_rss_mib"] for r in rows if r["server"] == "kit")
                b = next(r["peak_rss_mib"] for r in rows if r["server"] == other)
                row["peak_rss_mib"] = a / b if a and b else None
    finally:
        for s in servers.values():
            s.stop()
    report.raw = {
        "levels": raw,
        "llama_server": [s.command for s in servers.values() if isinstance(s, LlamaServer)],
    }
    report.table(
        "GPT-2 124M shape, random weights, f32 both (kit: fp32 in-place bundle, --max-batch 16; "
        f"llama-server: GGUF f32, -np 16 -c {ctx} --cont-batching); {args.threads} threads each; "
        f"guidellm concurrent streams, {args.prompt_tokens} prompt + {args.output_tokens} output tokens "
        f"(ignore_eos), {args.requests_per_client} requests per client per turn, /v1/completions; medians of "
        f"{args.rounds} rounds in strict turns; ratio rows: kit / that server, median of per-round ratios "
        "(peak RSS: of the run's peaks)",
        [
            Column("server", "server"),
            Column("clients", "clients", "d"),
            Column("output_tok_s", "output tok/s", ".2f"),
            Column("ttft_p50_ms", "TTFT p50 (ms)", ".2f"),
            Column("ttft_p99_ms", "TTFT p99 (ms)", ".2f"),
            Column("itl_p50_ms", "ITL p50 (ms)", ".2f"),
            Column("itl_p99_ms", "ITL p99 (ms)", ".2f"),
            Column("peak_rss_mib", "peak RSS (MiB)", ".2f"),
            Column("errors", "errors"),
        ],
        rows,
        note="ITL is guidellm's: per request, (last token - first token) / (output tokens - 1); percentiles "
        "over requests. Ratio rows < 1 are better for the kit in every column but output tok/s.",
    )
    report.emit(args.json)
    return 1 if any(r.get("errors") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
