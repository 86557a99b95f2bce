"""``gpt2-edge bench``: how fast each bundle runs on this device, to pick a precision. Torch-free.

Per bundle: load time, time to first token for a short and a long prompt, decode tokens/s at
batch 1, at batch 8 and at a long context, and the process's peak RSS. Each bundle is measured
in its own subprocess (so peak RSS is its own), bundles alternate for ``--rounds`` rounds and
the table shows medians: absolute numbers drift on a shared machine, alternation keeps the
comparison fair. Prompts are random token ids (seeded); eos is suppressed so every run decodes
the same number of tokens. With ``prompt_lookup`` each bundle also gets a row decoded with
speculative decoding by prompt lookup (same prompts, alternated with the plain row), and the
share of drafted tokens accepted at batch 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import Gpt2EdgeError
from .measure import peak_rss_mib
from .runtime.bundle import Bundle
from .runtime.generator import Generator
from .runtime.sampling import GenerationConfig

BATCH = 8


@dataclass
class BenchConfig:
    short_prompt: int = 32
    long_prompt: int = 512
    long_context: int = 896  # prompt length for the long-context decode (capped by the context)
    new_tokens: int = 64
    batch: int = BATCH
    threads: int | None = None
    provider: str = "cpu"
    session_config: dict[str, str] = field(default_factory=dict)
    prompt_lookup: int = 0  # > 0: also measure each bundle with speculative decoding (prompt lookup)


@dataclass
class BenchResult:
    bundle: str
    precision: str
    kv_cache: str
    mib: float
    load_s: float = 0.0
    ttft_short_ms: float = 0.0
    ttft_long_ms: float = 0.0
    decode_b1: float = 0.0  # tokens/s, batch 1, short prompt
    decode_batch: float = 0.0  # tokens/s summed over the batch
    decode_long: float = 0.0  # tokens/s, batch 1, long context
    peak_rss_mib: float = 0.0
    lengths: dict[str, int] = field(default_factory=dict)
    prompt_lookup: int = 0  # the speculative row's most drafted tokens per step (0: plain decoding)
    acceptance: float = 0.0  # drafted tokens accepted, batch 1 (speculative rows)


def measure(path: str, cfg: BenchConfig) -> BenchResult:
    """Measure one bundle in this process, through ``Generator`` (the API an app calls)."""
    t0 = time.perf_counter()
    options = {"session_config": cfg.session_config} if cfg.session_config else {}  # ONNX Runtime's
    gen = Generator.from_bundle(path, provider=cfg.provider, threads=cfg.threads, verify=False, **options)
    load_s = time.perf_counter() - t0
    bundle = gen.model.bundle
    n_ctx, vocab = gen.n_ctx, bundle.dims.vocab_size
    new = min(cfg.new_tokens, n_ctx // 2)
    rng = np.random.default_rng(0)

    def prompt(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, vocab, n)]

    def run(prompts: list[list[int]], max_new: int) -> dict[str, float]:
        c = GenerationConfig(max_new_tokens=max_new, ignore_eos=True, prompt_lookup=cfg.prompt_lookup)
        return gen.generate(prompts, c)[0].timings

    short = min(cfg.short_prompt, n_ctx - new)
    long = min(cfg.long_prompt, n_ctx - 1)
    ctx = min(cfg.long_context, n_ctx - new)
    run([prompt(short)], 4)  # warm-up: first-run allocations and kernel choices
    ttft_short = statistics.median(run([prompt(short)], 1)["prefill_s"] for _ in range(3))
    ttft_long = statistics.median(run([prompt(long)], 1)["prefill_s"] for _ in range(2))

    def rate(prompts: list[list[int]]) -> tuple[float, float]:
        """Decode tokens/s over the batch, and the share of drafted tokens accepted."""
        t = run(prompts, new)
        return len(prompts) * (t["steps"] - 1) / t["decode_s"], t.get("spec_acceptance", 0.0)

    b1, b1_acceptance = rate([prompt(short)])
    bb = rate([prompt(short) for _ in range(cfg.batch)])[0]
    lc = rate([prompt(ctx)])[0]
    mib = bundle.manifest.model_bytes() / 2**20
    return BenchResult(
        bundle=str(path),
        precision=bundle.precision,
        kv_cache=bundle.kv_form,
        mib=mib,
        load_s=load_s,
        ttft_short_ms=1000 * ttft_short,
        ttft_long_ms=1000 * ttft_long,
        decode_b1=b1,
        decode_batch=bb,
        decode_long=lc,
        peak_rss_mib=peak_rss_mib() or 0.0,
        lengths={"short": short, "long": long, "context": ctx, "new": new, "batch": cfg.batch},
        prompt_lookup=cfg.prompt_lookup,
        acceptance=b1_acceptance,
    )


def _measure_in_subprocess(path: str, cfg: BenchConfig) -> BenchResult:
    cmd = [sys.executable, "-m", "gpt2_edge.bench", "--worker", path, "--config", json.dumps(asdict(cfg))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"benchmarking {path} failed: {last}")
    return BenchResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def bench(paths: list[str], cfg: BenchConfig, rounds: int = 1, log=print) -> list[BenchResult]:
    """Alternate the bundles (and, with ``cfg.prompt_lookup``, plain and speculative decoding of
    each) for ``rounds`` rounds, one subprocess each; the medians, one row per bundle and mode."""
    for p in paths:
        Bundle.load(p, verify=False)  # refuse a bad path before any timing
    modes = [0] + ([cfg.prompt_lookup] if cfg.prompt_lookup else [])
    runs: dict[tuple[str, int], list[BenchResult]] = {(p, m): [] for p in paths for m in modes}
    for r in range(rounds):
        for p, m in runs:
            log(f"round {r + 1}/{rounds}: {p}" + (f" (prompt lookup {m})" if m else ""))
            runs[p, m].append(_measure_in_subprocess(p, replace(cfg, prompt_lookup=m)))
    out = []
    for rs in runs.values():
        med = {
            k: statistics.median(getattr(x, k) for x in rs)
            for k in (
                "load_s",
                "ttft_short_ms",
                "ttft_long_ms",
                "decode_b1",
                "decode_batch",
                "decode_long",
                "peak_rss_mib",
                "acceptance",
            )
        }
        out.append(BenchResult(**{**asdict(rs[0]), **med}))
    return out


def table(results: list[BenchResult]) -> str:
    """The results as a markdown table."""
    r0 = results[0].lengths
    spec = any(r.prompt_lookup for r in results)
    head = (
        f"| bundle | precision | KV cache | MiB | load s | TTFT {r0['short']} tok ms "
        f"| TTFT {r0['long']} tok ms | decode tok/s b1 | decode tok/s b{r0['batch']} "
        f"| decode tok/s @{r0['context']} | peak RSS MiB |" + (" accepted b1 |" if spec else "")
    )
    lines = [head, "|" + "---|" * 3 + "---:|" * (9 if spec else 8)]
    for r in results:
        name = Path(r.bundle).name + (f" + prompt lookup {r.prompt_lookup}" if r.prompt_lookup else "")
        accepted = (f" {100 * r.acceptance:.0f}% |" if r.prompt_lookup else " - |") if spec else ""
        lines.append(
            f"| {name} | {r.precision} | {r.kv_cache} | {r.mib:.1f} | {r.load_s:.2f} | "
            f"{r.ttft_short_ms:.1f} | {r.ttft_long_ms:.1f} | {r.decode_b1:.1f} | {r.decode_batch:.1f} | "
            f"{r.decode_long:.1f} | {r.peak_rss_mib:.0f} |{accepted}"
        )
    return "\n".join(lines)


def require_pyplot():
    """matplotlib's pyplot (Agg), or a refusal that says how to install it (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Gpt2EdgeError("--plot needs matplotlib: pip install 'gpt2-edge[plot]'") from None
    return plt


def plot(results: list[BenchResult], path: str) -> None:
    """A PNG bar chart of the decode rates and time to first token (needs the ``plot`` extra)."""
    plt = require_pyplot()
    names = [f"{Path(r.bundle).name}\n{r.precision}" for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(results))
    w = 0.27
    for i, (key, label) in enumerate(
        (
            ("decode_b1", "batch 1"),
            ("decode_batch", f"batch {results[0].lengths['batch']}"),
            ("decode_long", f"@{results[0].lengths['context']} tokens"),
        )
    ):
        axes[0].bar(x + (i - 1) * w, [getattr(r, key) for r in results], w, label=label)
    axes[0].set_title("decode tokens/s (higher is better)")
    axes[0].set_xticks(x, names)
    axes[0].legend()
    for i, (key, label) in enumerate((("ttft_short_ms", "short prompt"), ("ttft_long_ms", "long prompt"))):
        axes[1].bar(x + (i - 0.5) * w, [getattr(r, key) for r in results], w, label=label)
    axes[1].set_title("time to first token, ms (lower is better)")
    axes[1].set_xticks(x, names)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# one bundle measured in a process of its own; the command line is gpt2_edge/cli/bench.py ---------
def _worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--config", required=True)
    a = p.parse_args(argv)
    print(json.dumps(asdict(measure(a.worker, BenchConfig(**json.loads(a.config))))))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
