"""Serving speed: continuous batching on vs off at 1, 4 and 16 concurrent streaming clients, and
what a long prompt does to the streams already running (chunked prefill on vs off).

For each mode a ``python -m gpt2_edge.serve BUNDLE`` starts on a free loopback port
(``batching``: ``--max-batch 16``; ``one-at-a-time``: ``--max-batch 1``, the same server with a
batch of one); the servers run side by side and, level by level, take strict turns for
``--level-rounds`` rounds (benchmarks/harness.py; the ratio column is each mode's output tokens/s
over the first mode's, per round). ``--compare-tree DIR`` adds, for every mode, the same server
run from another checkout (``cwd`` and ``PYTHONPATH`` = DIR): before/after a change, interleaved.
At each concurrency level C, C clients (asyncio + httpx, one process) send
streaming greedy completions back to back: a fixed prompt of ``--prompt-tokens`` token ids and
exactly ``--max-tokens`` new tokens (``min_tokens`` = ``max_tokens``, so eos never ends one early).
Each client sends ``--requests-per-client`` requests; a level stops early at ``--level-timeout``.

Reported per mode and level: requests/s and output tokens/s over the level's wall time, p50/p95
time to first token (request sent -> first chunk) and inter-token latency (gaps between chunks;
a chunk is one token except where text is held back, e.g. a split UTF-8 character), and the
server's peak RSS (VmHWM, Linux) after all levels. Loopback only; bounded in count and time.

``--scenario long-prompt``: for each ``--prefill-chunks`` value a server (``--prefill-chunk C``;
0 = whole prompts; the servers side by side, rounds in strict turns) gets ``--streams``
streaming clients with the short prompt; once each has
its first token, one request with a ``--long-prompt-tokens`` prompt (900) arrives. Reported over
``--rounds`` rounds: the running streams' inter-token latency p50 overall and p99 / max over the
gaps that overlap the long prompt's prefill (from its arrival to its first token), the long
request's time to first token, and TTFT p99 over every request. The 900-token prompt needs a
context of 1024 (``--model gpt2``, or a GPT-2-shaped bundle).

``--scenario prefix``: a server with the prefix cache on and one with it off
(``--no-prefix-cache``), side by side, each gets one ``--long-prompt-tokens`` prompt as warm-up,
then another one ``1 + --rounds`` times (8 new tokens each), the two servers in strict turns.
Reported: that prompt's first time to first token and the repeats' p50 (the repeats reuse its KV).

``--scenario grounded``: speculative decoding (prompt lookup) in the continuous batch. Two servers
run side by side, one plain and one with ``--prompt-lookup K`` (``--prompt-lookup``, 8); each round
sends ``--clients`` (4) concurrent streaming clients, ``--requests-per-client`` requests each, to
one and then the other (strict turns over ``--rounds``), with the same grounded prompts: benchmarks/
bench_speculative.py's ``quote`` workload (a held-out passage of gpt2_edge/default_model/
heldout.txt, a blank line, its first tokens) and, on the shipped model, ``self-quote`` (a passage,
the model's own continuation, the passage again), greedy, ``--max-tokens`` new tokens (eos
ignored). Reported: each round's output tokens/s of both and their ratio, the median ratio and its
range, the drafted tokens accepted (/metrics), and whether the two servers' texts were identical.
With ``--draft BUNDLE`` the speculating server also drafts with that model (``serve --draft``, up to
``--draft-tokens``); ``--prompt-lookup 0 --draft BUNDLE`` measures the draft model alone.

One file past 400 lines: the scenarios share the server process, the streaming client and the
report, and a benchmark reads best top to bottom.

    python -m benchmarks.bench_serve                       # the shipped default model
    python -m benchmarks.bench_serve --model gpt2          # random GPT-2 124M weights (cached export)
    python -m benchmarks.bench_serve --bundle out/bundle --levels 1,4 --requests-per-client 2
    python -m benchmarks.bench_serve --model gpt2 --scenario long-prompt --prefill-chunks 0,128,256
    python -m benchmarks.bench_serve --model gpt2 --scenario prefix --long-prompt-tokens 896 --rounds 3
    python -m benchmarks.bench_serve --scenario grounded --rounds 6        # the shipped model
    python -m benchmarks.bench_serve --model gpt2 --scenario grounded --rounds 4
    python -m benchmarks.bench_serve --model gpt2 --levels 1,4,16 --compare-tree ../main   # before/after
    (every form takes --json PATH: the run's record, with the machine, for benchmarks/results/)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import peak_rss_mib, quantile, ratio_summary, summary

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
    arrivals: list[float] = field(default_factory=list)  # perf_counter of each chunk
    text: str = ""


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
    round: int = 0
    extra: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LongPromptResult:
    prefill_chunk: int  # 0 = whole prompts
    streams: int
    rounds: int
    long_prompt_tokens: int
    itl_p50_ms: float  # the running streams, every gap
    itl_p99_during_prefill_ms: float  # their gaps that overlap the long prompt's prefill
    itl_max_during_prefill_ms: float
    long_ttft_p50_ms: float
    ttft_p99_ms: float  # every request: the streams and the long one
    errors: int
    extra: dict = field(default_factory=dict)


def resolve_bundle(args: argparse.Namespace) -> Path:
    if args.bundle:
        return Path(args.bundle)
    if args.model == "gpt2":
        from benchmarks.common import bundle_of, random_checkpoint

        return bundle_of(random_checkpoint("gpt2"))
    from gpt2_edge.serve.cli import resolve_bundle as serve_default

    return serve_default(None)


class ChildServer:
    """A server in a child process on a loopback port: its log in a temporary file (a pipe nobody
    reads fills at 64 KiB and blocks the server writing to it), ready once ``/health`` answers,
    stopped with SIGTERM."""

    what = "the server"

    def _start(self, cmd: list[str], port: int, **popen: Any) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = shlex.join(cmd)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True, **popen)

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.what} did not answer /health within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Server(ChildServer):
    """``python -m gpt2_edge.serve`` in a child process on a free loopback port."""

    def __init__(
        self,
        bundle: Path,
        max_batch: int,
        threads: int,
        prefill_chunk: int | None = None,
        extra: tuple[str, ...] = (),
        repo: Path = REPO,
    ) -> None:
        port = free_port()
        cmd = [
            sys.executable, "-m", "gpt2_edge.serve", str(bundle), "--port", str(port),
            "--max-batch", str(max_batch), "--max-queue", "64", "--threads", str(threads),
            "--log-level", "warning",
        ]  # fmt: skip
        if prefill_chunk is not None:
            cmd += ["--prefill-chunk", str(prefill_chunk)]
        cmd += list(extra)
        env = os.environ if repo == REPO else {**os.environ, "PYTHONPATH": str(repo)}
        self._start(cmd, port, cwd=repo, env=env)


async def one_request(
    client, url: str, body: dict, on_first: Callable[[], None] | None = None
) -> RequestResult:
    """One streaming request; ``on_first`` is called at its first chunk."""
    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    arrivals: list[float] = []
    tokens = 0
    text = []
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
            arrivals.append(now)
            text += [c["text"] for c in event["choices"]]
            if first is None:
                first = now
                if on_first is not None:
                    on_first()
            else:
                gaps.append(now - last)
            last = now
    if first is None:
        raise RuntimeError("the stream had no chunk")
    return RequestResult(first - t0, gaps, tokens, arrivals, "".join(text))


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


def level_result(mode: str, clients: int, results: list, errors: list, wall: float, r: int) -> LevelResult:
    ttft = [x.ttft_s * 1000 for x in results]
    gaps = [g * 1000 for x in results for g in x.gaps_s]
    return LevelResult(
        mode=mode,
        clients=clients,
        requests=len(results),
        wall_s=wall,
        requests_per_s=len(results) / wall,
        output_tokens_per_s=sum(x.tokens for x in results) / wall,
        ttft_p50_ms=quantile(ttft, 0.5),
        ttft_p95_ms=quantile(ttft, 0.95),
        itl_p50_ms=quantile(gaps, 0.5),
        itl_p95_ms=quantile(gaps, 0.95),
        errors=len(errors),
        round=r,
        extra={"first_error": errors[0]} if errors else {},
    )


def bench_levels(
    modes: list[str], bundle: Path, args: argparse.Namespace, prompt: list[int]
) -> list[LevelResult]:
    """Every mode's server side by side (and each again from ``--compare-tree``); level by level
    they take strict turns for ``--level-rounds`` rounds. One ``LevelResult`` per subject, level
    and round; each server's peak RSS after all levels."""
    trees = [("", REPO)] + (
        [(f" @{Path(args.compare_tree).name}", Path(args.compare_tree))] if args.compare_tree else []
    )
    servers = {
        f"{m}{tag}": Server(bundle, MODES[m], args.threads, repo=repo) for tag, repo in trees for m in modes
    }
    body = {
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "min_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out: list[LevelResult] = []
    try:
        for server in servers.values():
            server.wait_ready()
            asyncio.run(run_level(server.url, body, 1, 2, args.level_timeout))  # warm-up
        for clients in args.levels:

            def turn(r: int, name: str, url: str, clients: int = clients) -> LevelResult:
                results, errors, wall = asyncio.run(
                    run_level(url, body, clients, args.requests_per_client, args.level_timeout)
                )
                return level_result(name, clients, results, errors, wall, r)

            runs = interleave(
                {n: (lambda r, n=n, u=s.url: turn(r, n, u)) for n, s in servers.items()},
                args.level_rounds,
                warmup=0,
            )
            for name in servers:
                out += runs.values(name)
                x = runs.values(name)[-1]
                print(
                    f"  {name:>13} x{clients:<3} {x.output_tokens_per_s:8.1f} tok/s",
                    file=sys.stderr,
                    flush=True,
                )
        for name, server in servers.items():
            rss = peak_rss_mib(server.proc.pid)
            for r in out:
                if r.mode == name:
                    r.peak_rss_mib = rss
    finally:
        for server in servers.values():
            server.stop()
    return out


async def long_prompt_round(
    client, url: str, stream_body: dict, long_body: dict, streams: int, timeout: float
) -> tuple[list[RequestResult], RequestResult, float, float]:
    """``streams`` running streams; once each has its first token, the long request. Returns the
    streams' results, the long one's, and its arrival and first-token times (perf_counter)."""
    started = [asyncio.Event() for _ in range(streams)]
    tasks = [asyncio.create_task(one_request(client, url, stream_body, on_first=e.set)) for e in started]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout)
    submitted = time.perf_counter()
    long = await asyncio.wait_for(one_request(client, url, long_body), timeout)
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    return list(results), long, submitted, submitted + long.ttft_s


async def long_prompt_once(url: str, args: argparse.Namespace, stream_body: dict, long_body: dict) -> dict:
    """One round against one server: the streams' gaps (all, and those overlapping the long
    prompt's prefill), the long request's TTFT, every request's TTFT (ms), or the round's error."""
    import httpx

    m: dict[str, list] = {"itl": [], "during": [], "long_ttft": [], "ttft": [], "errors": []}
    limits = httpx.Limits(max_connections=args.streams + 1)
    async with httpx.AsyncClient(timeout=args.level_timeout, limits=limits) as client:
        try:
            streams, long, t0, t1 = await long_prompt_round(
                client, url, stream_body, long_body, args.streams, args.level_timeout
            )
        except Exception as e:  # counted and reported, the next round goes on
            m["errors"].append(str(e) or type(e).__name__)
            return m
    m["long_ttft"].append(long.ttft_s * 1000)
    m["ttft"] += [r.ttft_s * 1000 for r in [*streams, long]]
    for r in streams:
        for a, b in zip(r.arrivals, r.arrivals[1:], strict=False):
            m["itl"].append((b - a) * 1000)
            if b > t0 and a < t1:  # the gap overlaps the long prompt's prefill
                m["during"].append((b - a) * 1000)
    return m


def bench_long_prompt(
    bundle: Path, args: argparse.Namespace, prompt: list[int], long_prompt: list[int]
) -> list[LongPromptResult]:
    """The running streams' inter-token latency while a long prompt is admitted, per prefill chunk
    (the servers side by side, rounds in strict turns)."""
    stream_body = {
        "prompt": prompt,
        "max_tokens": args.stream_tokens,
        "min_tokens": args.stream_tokens,
        "temperature": 0,
        "stream": True,
    }
    long_body = {"prompt": long_prompt, "max_tokens": 8, "min_tokens": 8, "temperature": 0, "stream": True}
    servers = {
        c: Server(bundle, max(args.streams + 1, 2), args.threads, prefill_chunk=c)
        for c in args.prefill_chunks
    }
    try:
        for server in servers.values():
            server.wait_ready()
        runs = interleave(
            {
                str(c): (lambda _r, u=s.url: asyncio.run(long_prompt_once(u, args, stream_body, long_body)))
                for c, s in servers.items()
            },
            args.rounds,
            log=lambda msg: print(f"  prefill chunk {msg[:60]}", file=sys.stderr, flush=True),
        )
    finally:
        for server in servers.values():
            server.stop()
    out = []
    for chunk in args.prefill_chunks:
        m = {
            k: [x for r in runs.values(str(chunk)) for x in r[k]]
            for k in ("itl", "during", "long_ttft", "ttft", "errors")
        }
        out.append(
            LongPromptResult(
                prefill_chunk=chunk,
                streams=args.streams,
                rounds=args.rounds,
                long_prompt_tokens=len(long_prompt),
                itl_p50_ms=quantile(m["itl"], 0.5),
                itl_p99_during_prefill_ms=quantile(m["during"], 0.99),
                itl_max_during_prefill_ms=max(m["during"], default=float("nan")),
                long_ttft_p50_ms=quantile(m["long_ttft"], 0.5),
                ttft_p99_ms=quantile(m["ttft"], 0.99),
                errors=len(m["errors"]),
                extra={"first_error": m["errors"][0]} if m["errors"] else {},
            )
        )
    return out


async def repeated_prompt_ttfts(url: str, bodies: list[dict], timeout: float) -> list[float]:
    """Each body's time to first token (ms), one request after the other."""
    import httpx

    async with httpx.AsyncClient(timeout=timeout) as client:
        return [(await one_request(client, url, body)).ttft_s * 1000 for body in bodies]


def bench_prefix(
    bundle: Path, args: argparse.Namespace, long_prompt: list[int], warm: list[int]
) -> list[dict]:
    """The same long prompt sent ``1 + --rounds`` times to a server with the prefix cache on and
    one with it off, side by side in strict turns, after a warm-up with another prompt: its first
    TTFT (round 1) and the repeats'."""
    body = {"max_tokens": 8, "min_tokens": 8, "temperature": 0, "stream": True}
    servers = {
        cache: Server(bundle, 16, args.threads, extra=() if cache == "on" else ("--no-prefix-cache",))
        for cache in ("on", "off")
    }

    def turn(r: int, url: str) -> float:
        prompt = warm if r < 0 else long_prompt  # the untimed turn: another prompt, to warm up
        return asyncio.run(repeated_prompt_ttfts(url, [{**body, "prompt": prompt}], args.level_timeout))[0]

    try:
        for server in servers.values():
            server.wait_ready()
        runs = interleave(
            {c: (lambda r, u=s.url: turn(r, u)) for c, s in servers.items()},
            1 + args.rounds,
            both_orders=False,
        )  # one order: round 1 is each server's first sight of the prompt, the rounds after repeats
    finally:
        for server in servers.values():
            server.stop()
    out = []
    for cache in servers:
        ttft = runs.values(cache)
        out.append(
            {
                "prefix_cache": cache,
                "prompt_tokens": len(long_prompt),
                "first_ttft_ms": ttft[0],
                "repeat_ttft_p50_ms": quantile(ttft[1:], 0.5),
                "ratio": quantile(ttft[1:], 0.5) / ttft[0],
                "ttft_ms": ttft,
                "errors": 0,
            }
        )
    return out


def grounded_prompts(bundle: Path, args: argparse.Namespace) -> list[tuple[list[int], int]]:
    """bench_speculative's grounded prompts for this bundle, each with its max_tokens."""
    from benchmarks.bench_speculative import workloads
    from gpt2_edge import Generator

    gen = Generator.from_bundle(str(bundle), threads=args.threads)
    kind = "shipped" if gen.n_ctx < 2 * 120 + args.max_tokens else "124m"  # the passage's length
    w = workloads(gen, kind, args.max_tokens, args.prompts)
    prompts = [p for name in ("quote", "self-quote") if name in w for p in w[name][0]]
    return [(p, min(args.max_tokens, gen.n_ctx - len(p))) for p in prompts]


async def grounded_round(url: str, bodies: list[list[dict]], timeout: float) -> tuple[list, float]:
    """Every client sends its bodies one after the other; all clients at once."""
    import httpx

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def client_loop(mine: list[dict]) -> list[RequestResult]:
            return [await one_request(client, url, body) for body in mine]

        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(client_loop(b) for b in bodies)), timeout)
        return [x for mine in results for x in mine], time.perf_counter() - t0


def spec_counters(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line[:1] != "#"}
    return (
        values.get("gpt2_edge_spec_decode_draft_tokens_total", 0.0),
        values.get("gpt2_edge_spec_decode_accepted_tokens_total", 0.0),
    )


def bench_grounded(bundle: Path, args: argparse.Namespace) -> dict:
    """Plain vs prompt lookup, two servers side by side, rounds in strict turns (the harness)."""
    prompts = grounded_prompts(bundle, args)
    bodies = [
        [
            {
                "prompt": prompts[(c + args.clients * j) % len(prompts)][0],
                "max_tokens": prompts[(c + args.clients * j) % len(prompts)][1],
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            for j in range(args.requests_per_client)
        ]
        for c in range(args.clients)
    ]
    lookup = ("--prompt-lookup", str(args.prompt_lookup))
    if args.draft:
        lookup += ("--draft", args.draft, "--draft-tokens", str(args.draft_tokens))
    servers = {m: Server(bundle, 16, args.threads, extra=x) for m, x in (("plain", ()), ("lookup", lookup))}

    def turn(r: int, url: str) -> tuple[float, list[str]]:
        results, wall = asyncio.run(grounded_round(url, bodies, args.level_timeout))
        return sum(x.tokens for x in results) / wall, [x.text for x in results]

    try:
        for server in servers.values():
            server.wait_ready()
            asyncio.run(grounded_round(server.url, [b[:1] for b in bodies], args.level_timeout))  # warm-up
        before = spec_counters(servers["lookup"].url)
        runs = interleave(
            {m: (lambda r, u=s.url: turn(r, u)) for m, s in servers.items()},
            args.rounds,
            warmup=0,
            log=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True),
        )
        after = spec_counters(servers["lookup"].url)
    finally:
        for server in servers.values():
            server.stop()
    rate = lambda x: x[0]  # noqa: E731
    ratio = runs.ratio("lookup", "plain", rate)
    drafted, accepted = after[0] - before[0], after[1] - before[1]
    return {
        "prompts": len(prompts),
        "clients": args.clients,
        "rounds": args.rounds,
        "plain_tok_s": runs.values("plain", rate),
        "lookup_tok_s": runs.values("lookup", rate),
        "orders": runs.orders,
        "ratios": ratio["per_round"],
        "ratio_median": ratio["median"],
        "ratio_combined": ratio["combined"],
        "acceptance": accepted / drafted if drafted else 0.0,
        "identical": all(
            a[1] == b[1] for a, b in zip(runs.values("plain"), runs.values("lookup"), strict=True)
        ),
        "draft": args.draft,
        "errors": 0,
    }


LEVEL_COLUMNS = [
    Column("mode", "mode"),
    Column("clients", "clients", "d"),
    Column("requests_per_s", "req/s", ".2f"),
    Column("output_tokens_per_s", "output tok/s", ".1f"),
    Column("ratio", "tok/s / first mode (per-round ratio)", ".2f"),
    Column("ttft", "TTFT p50 / p95 (ms)"),
    Column("itl", "inter-token p50 / p95 (ms)"),
    Column("peak_rss_mib", "peak RSS (MiB)", ".0f"),
    Column("errors", "errors", "d"),
]
LONG_COLUMNS = [
    Column("prefill", "prefill chunk"),
    Column("streams", "streams", "d"),
    Column("rounds", "rounds", "d"),
    Column("itl_p50_ms", "stream ITL p50 (ms)", ".1f"),
    Column("during", "stream ITL p99 / max during the long prefill (ms)"),
    Column("long_ttft_p50_ms", "long prompt TTFT p50 (ms)", ".1f"),
    Column("ttft_p99_ms", "TTFT p99, all requests (ms)", ".1f"),
    Column("errors", "errors", "d"),
]


def level_rows(rows: list[LevelResult]) -> list[dict]:
    """One row per subject and level: medians over the rounds, and the per-round ratio of output
    tokens/s to the first subject's."""
    names = list(dict.fromkeys(r.mode for r in rows))
    out = []
    for clients in dict.fromkeys(r.clients for r in rows):
        per = {n: [r for r in rows if r.mode == n and r.clients == clients] for n in names}
        base = [r.output_tokens_per_s for r in per[names[0]]]
        for n, rs in per.items():
            med = lambda k, rs=rs: summary([getattr(r, k) for r in rs])[0]  # noqa: E731
            out.append(
                {
                    "mode": n,
                    "clients": clients,
                    "requests_per_s": med("requests_per_s"),
                    "output_tokens_per_s": med("output_tokens_per_s"),
                    "ratio": ratio_summary([r.output_tokens_per_s for r in rs], base)[0],
                    "ttft": f"{med('ttft_p50_ms'):.1f} / {med('ttft_p95_ms'):.1f}",
                    "itl": f"{med('itl_p50_ms'):.2f} / {med('itl_p95_ms'):.2f}",
                    "peak_rss_mib": rs[0].peak_rss_mib,
                    "errors": sum(r.errors for r in rs),
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="bundle to serve (default: --model)")
    p.add_argument(
        "--model", choices=["default", "gpt2"], default="default", help="default: the shipped model"
    )
    p.add_argument(
        "--scenario",
        choices=["levels", "long-prompt", "prefix", "grounded", "all"],
        default="levels",
        help="levels: batching on/off at --levels clients; long-prompt: a long prompt among running streams; "
        "prefix: one long prompt repeated (--rounds), prefix cache on vs off; grounded: prompt lookup on vs "
        "off at --clients clients on prompts the continuation quotes",
    )
    p.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    p.add_argument("--modes", default="batching,one-at-a-time", help=f"of {', '.join(MODES)}")
    p.add_argument("--level-rounds", type=int, default=1, help="rounds of strict turns per level")
    p.add_argument(
        "--compare-tree", metavar="DIR", help="also run every mode's server from this checkout (before/after)"
    )
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (exactly)")
    g = p.add_argument_group("long-prompt scenario")
    g.add_argument("--long-prompt-tokens", type=int, default=900, help="the long request's prompt")
    g.add_argument("--prefill-chunks", default="0,256", help="servers' --prefill-chunk values (0 = whole)")
    g.add_argument("--streams", type=int, default=4, help="streams running when the long prompt arrives")
    g.add_argument("--stream-tokens", type=int, default=96, help="new tokens per stream (exactly)")
    g.add_argument("--rounds", type=int, default=5, help="long prompts sent, one per round")
    g = p.add_argument_group("grounded scenario")
    g.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    g.add_argument("--prompt-lookup", type=int, default=8, help="the speculating server's --prompt-lookup")
    g.add_argument("--prompts", type=int, default=8, help="grounded prompts per workload")
    g.add_argument("--draft", metavar="BUNDLE", help="the speculating server's draft model (serve --draft)")
    g.add_argument("--draft-tokens", type=int, default=4, help="the speculating server's --draft-tokens")
    p.add_argument("--threads", type=int, default=2, help="server's ONNX Runtime threads")
    p.add_argument("--level-timeout", type=float, default=120.0, help="seconds one level (round) may take")
    add_json_argument(p)
    args = p.parse_args(argv)
    report = Report("bench_serve", f"Serving: {args.scenario}", argv, vars(args))
    args.levels = [int(x) for x in args.levels.split(",")]
    args.prefill_chunks = [int(x) for x in args.prefill_chunks.split(",")]
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")

    bundle = resolve_bundle(args)
    from gpt2_edge.runtime.bundle import Bundle
    from gpt2_edge.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_file(bundle / "tokenizer.json")
    long_scenario = args.scenario in ("long-prompt", "prefix", "all")
    need = max(args.prompt_tokens, args.long_prompt_tokens if long_scenario else 0)
    ids = tok.encode(PROMPT_TEXT * (1 + need // 16))
    if len(ids) < need:
        p.error(f"the prompt text has only {len(ids)} tokens")
    prompt = ids[: args.prompt_tokens]
    if long_scenario:
        n_ctx = Bundle.load(bundle, verify=False).context_length
        if args.long_prompt_tokens + 8 > n_ctx or args.prompt_tokens + args.stream_tokens > n_ctx:
            p.error(
                f"{bundle.name}'s context is {n_ctx} tokens: too short for a {args.long_prompt_tokens}-token "
                "prompt (+8 new) or the streams' prompt + --stream-tokens; use --model gpt2 or lower them"
            )
    print(f"bench_serve: {bundle}", file=sys.stderr, flush=True)
    errors = 0
    if args.scenario in ("levels", "all"):
        rows = bench_levels(modes, bundle, args, prompt)
        errors += sum(r.errors for r in rows)
        report.raw["levels"] = [asdict(r) for r in rows]
        report.table(
            f"bundle {bundle.name}: prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens each, "
            f"{args.requests_per_client} requests per client, server threads {args.threads}, streaming, "
            "greedy; batching = --max-batch 16, one-at-a-time = --max-batch 1; medians of "
            f"{args.level_rounds} rounds",
            LEVEL_COLUMNS,
            level_rows(rows),
        )
    if args.scenario in ("long-prompt", "all"):
        long_rows = bench_long_prompt(bundle, args, prompt, ids[: args.long_prompt_tokens])
        errors += sum(r.errors for r in long_rows)
        report.raw["long_prompt"] = [asdict(r) for r in long_rows]
        report.table(
            f"bundle {bundle.name}: {args.streams} streams of {args.prompt_tokens} + {args.stream_tokens} "
            f"tokens; once they run, one {args.long_prompt_tokens}-token prompt (+8 new); {args.rounds} "
            f"rounds; server threads {args.threads}, --max-batch {max(args.streams + 1, 2)}, greedy",
            LONG_COLUMNS,
            [
                asdict(r)
                | {
                    "prefill": r.prefill_chunk or "whole",
                    "during": f"{r.itl_p99_during_prefill_ms:.1f} / {r.itl_max_during_prefill_ms:.1f}",
                }
                for r in long_rows
            ],
        )
    if args.scenario in ("prefix", "all"):
        prefix_rows = bench_prefix(
            bundle, args, ids[: args.long_prompt_tokens], ids[7 : 7 + args.long_prompt_tokens]
        )
        report.raw["prefix"] = prefix_rows
        report.table(
            f"bundle {bundle.name}: one {args.long_prompt_tokens}-token prompt (+8 new), sent "
            f"{1 + args.rounds} times one after the other (after another one as warm-up); server threads "
            f"{args.threads}, --max-batch 16, greedy",
            [
                Column("prefix_cache", "prefix cache"),
                Column("first_ttft_ms", "first TTFT (ms)", ".1f"),
                Column("repeat_ttft_p50_ms", "repeated TTFT p50 (ms)", ".1f"),
                Column("ratio", "repeated / first", ".1%"),
            ],
            prefix_rows,
        )
    if args.scenario in ("grounded", "all"):
        g = bench_grounded(bundle, args)
        report.raw["grounded"] = g
        spec = f"--prompt-lookup {args.prompt_lookup}" + (
            f" --draft {Path(args.draft).name} --draft-tokens {args.draft_tokens}" if args.draft else ""
        )
        report.table(
            f"bundle {bundle.name}: {g['clients']} streaming clients x {args.requests_per_client} requests "
            f"per round, {g['prompts']} grounded prompts, up to {args.max_tokens} new tokens each, greedy; "
            f"plain vs {spec}, {g['rounds']} rounds in strict turns; server threads {args.threads}, "
            "--max-batch 16",
            [
                Column("round", "round", "d"),
                Column("order", "order"),
                Column("plain", "plain tok/s", ".1f"),
                Column("lookup", "speculative tok/s", ".1f"),
                Column("ratio", "ratio", ".2f"),
            ],
            [
                {"round": i + 1, "order": o, "plain": a, "lookup": b, "ratio": q}
                for i, (a, b, q, o) in enumerate(
                    zip(g["plain_tok_s"], g["lookup_tok_s"], g["ratios"], g["orders"], strict=True)
                )
            ],
            note=(
                f"median tok/s: plain {summary(g['plain_tok_s'])[0]:.1f}, speculative "
                f"{summary(g['lookup_tok_s'])[0]:.1f}; median ratio {g['ratio_median']:.2f} (range "
                f"{min(g['ratios']):.2f}-{max(g['ratios']):.2f}), both orders combined "
                f"{g['ratio_combined']:.2f}; drafted tokens accepted {g['acceptance']:.0%}; texts identical: "
                f"{'yes' if g['identical'] else 'NO'}"
            ),
        )
    report.emit(args.json)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
