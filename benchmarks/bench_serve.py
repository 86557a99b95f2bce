"""Serving speed: continuous batching on vs off, at 1, 4 and 16 concurrent streaming clients.

For each mode a fresh ``python -m gpt2_edge.serve BUNDLE`` starts on a free loopback port
(``batching``: ``--max-batch 16``; ``one-at-a-time``: ``--max-batch 1``, the same server with a
batch of one). At each concurrency level C, C clients (asyncio + httpx, one process) send
streaming greedy completions back to back: a fixed prompt of ``--prompt-tokens`` token ids and
exactly ``--max-tokens`` new tokens (``min_tokens`` = ``max_tokens``, so eos never ends one early).
Each client sends ``--requests-per-client`` requests; a level stops early at ``--level-timeout``.

Reported per mode and level: requests/s and output tokens/s over the level's wall time, p50/p95
time to first token (request sent -> first chunk) and inter-token latency (gaps between chunks;
a chunk is one token except where text is held back, e.g. a split UTF-8 character), and the
server's peak RSS (VmHWM, Linux) after all levels. Loopback only; bounded in count and time.

    python benchmarks/bench_serve.py                       # the shipped default model
    python benchmarks/bench_serve.py --model gpt2          # random GPT-2 124M weights (cached export)
    python benchmarks/bench_serve.py --bundle out/bundle --levels 1,4 --requests-per-client 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = {"batching": 16, "one-at-a-time": 1}  # mode -> --max-batch
PROMPT_TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You "
    "are all resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you "
    "know Caius Marcius is chief enemy to the people. All: We know't, we know't. "
)


@dataclass
class RequestResult:
    ttft_s: float
    gaps_s: list[float]
    tokens: int


@dataclass
class LevelResult:
    mode: str
    clients: int
    requests: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    errors: int
    peak_rss_mib: float | None = None
    extra: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), Linux only."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def resolve_bundle(args: argparse.Namespace) -> Path:
    if args.bundle:
        return Path(args.bundle)
    if args.model == "gpt2":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import bundle_of, random_checkpoint

        return bundle_of(random_checkpoint("gpt2"))
    from gpt2_edge.serve.cli import resolve_bundle as serve_default

    return serve_default(None)


class Server:
    """``python -m gpt2_edge.serve`` in a child process on a free loopback port."""

    def __init__(self, bundle: Path, max_batch: int, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "gpt2_edge.serve", str(bundle), "--port", str(self.port),
            "--max-batch", str(max_batch), "--max-queue", "64", "--threads", str(threads),
            "--log-level", "warning",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({self.proc.returncode}): {self.proc.stderr.read()[-2000:]}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_request(client, url: str, body: dict) -> RequestResult:
    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
    if first is None:
        raise RuntimeError("the stream had no chunk")
    return RequestResult(first - t0, gaps, tokens)


async def run_level(url: str, body: dict, clients: int, per_client: int, timeout: float) -> tuple:
    import httpx

    results: list[RequestResult] = []
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def client_loop() -> None:
            for _ in range(per_client):
                if time.monotonic() > deadline:
                    return
                try:
                    results.append(await one_request(client, url, body))
                except Exception as e:  # counted and reported, the level goes on
                    errors.append(str(e))

        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(clients))), timeout + 30)
        except asyncio.TimeoutError:
            errors.append("level timed out")
        wall = time.perf_counter() - t0
    return results, errors, wall


def bench_mode(mode: str, bundle: Path, args: argparse.Namespace, prompt: list[int]) -> list[LevelResult]:
    server = Server(bundle, MODES[mode], args.threads)
    out = []
    try:
        server.wait_ready()
        body = {
            "prompt": prompt,
            "max_tokens": args.max_tokens,
            "min_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        asyncio.run(run_level(server.url, body, 1, 2, args.level_timeout))  # warm-up
        for clients in args.levels:
            results, errors, wall = asyncio.run(
                run_level(server.url, body, clients, args.requests_per_client, args.level_timeout)
            )
            ttft = [r.ttft_s * 1000 for r in results]
            gaps = [g * 1000 for r in results for g in r.gaps_s]
            out.append(
                LevelResult(
                    mode=mode,
                    clients=clients,
                    requests=len(results),
                    wall_s=wall,
                    requests_per_s=len(results) / wall,
                    output_tokens_per_s=sum(r.tokens for r in results) / wall,
                    ttft_p50_ms=percentile(ttft, 0.5),
                    ttft_p95_ms=percentile(ttft, 0.95),
                    itl_p50_ms=percentile(gaps, 0.5),
                    itl_p95_ms=percentile(gaps, 0.95),
                    errors=len(errors),
                    extra={"first_error": errors[0]} if errors else {},
                )
            )
            print(
                f"  {mode:>13} x{clients:<3} {out[-1].output_tokens_per_s:8.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )
        rss = peak_rss_mib(server.proc.pid)
        for r in out:
            r.peak_rss_mib = rss
    finally:
        server.stop()
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    versions = f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {versions}"


def table(rows: list[LevelResult]) -> str:
    lines = [
        "| mode | clients | req/s | output tok/s | TTFT p50 / p95 (ms) | inter-token p50 / p95 (ms) "
        "| peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rss = f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib is not None else "n/a"
        err = f" ({r.errors} errors)" if r.errors else ""
        lines.append(
            f"| {r.mode} | {r.clients} | {r.requests_per_s:.2f}{err} | {r.output_tokens_per_s:.1f} | "
            f"{r.ttft_p50_ms:.1f} / {r.ttft_p95_ms:.1f} | {r.itl_p50_ms:.2f} / {r.itl_p95_ms:.2f} | {rss} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="bundle to serve (default: --model)")
    p.add_argument(
        "--model", choices=["default", "gpt2"], default="default", help="default: the shipped model"
    )
    p.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    p.add_argument("--modes", default="batching,one-at-a-time", help=f"of {', '.join(MODES)}")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (exactly)")
    p.add_argument("--threads", type=int, default=2, help="server's ONNX Runtime threads")
    p.add_argument("--level-timeout", type=float, default=120.0, help="seconds one level may take")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")

    bundle = resolve_bundle(args)
    from gpt2_edge.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_file(bundle / "tokenizer.json")
    ids = tok.encode(PROMPT_TEXT * (1 + args.prompt_tokens // 16))
    if len(ids) < args.prompt_tokens:
        p.error(f"the prompt text has only {len(ids)} tokens")
    prompt = ids[: args.prompt_tokens]
    print(f"bench_serve: {bundle} on {machine()}", file=sys.stderr, flush=True)
    rows = [r for m in modes for r in bench_mode(m, bundle, args, prompt)]
    print(
        f"\nbundle {bundle.name}: prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens each, "
        f"{args.requests_per_client} requests per client, server threads {args.threads}, streaming, greedy\n"
        f"machine: {machine()}\n"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
