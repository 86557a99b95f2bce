"""int4 with and without its int8 prompt graph (quantize/int4.py): time to first token after a long
prompt, decode at batch 1 and 8, through ``Generator.generate``, in strict turns.

Subjects: one int4 bundle loaded twice, ``prompt_graph=False`` (every pass on the int4 graph) and
the default (prompt chunks on the int8 prompt graph), optionally an int8-dynamic bundle for
reference. Each turn measures, for its subject: TTFT (a ``--long``-token prompt, one new token),
batch-1 and batch-8 decode tokens/s (32-token prompts, ``--new`` new tokens, greedy, eos ignored),
and batch-1 decode after the long prompt. Ratios are per round (benchmarks/harness.py).

    python -m benchmarks.bench_prompt_graph --int4 BUNDLE [--int8 BUNDLE] [--rounds 3] [--json PATH]

Without ``--int4`` it quantizes the 124M-shaped random model (``benchmarks/.cache``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import bundle_of, random_checkpoint, variant_of
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import summary
from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig

FIGURES = ("ttft_ms", "b1", "b8", "b1_long")


def turn(gen: Generator, long: int, new: int) -> Callable[[int], dict[str, float]]:
    """One turn of every figure for ``gen``."""
    rng = np.random.default_rng(0)
    vocab = gen.tokenizer.vocab_size - 1
    long_prompt = rng.integers(0, vocab, long).tolist()
    short = [rng.integers(0, vocab, 32).tolist() for _ in range(8)]
    one = GenerationConfig(max_new_tokens=1, ignore_eos=True)
    many = GenerationConfig(max_new_tokens=new, ignore_eos=True)

    def rate(prompts: list[list[int]]) -> float:
        res = gen.generate(prompts, many)
        t = res[0].timings
        return len(prompts) * (t["steps"] - 1) / t["decode_s"] if t.get("decode_s") else float("nan")

    def run(_: int) -> dict[str, float]:
        t0 = time.perf_counter()
        gen.generate([long_prompt], one)
        ttft = 1e3 * (time.perf_counter() - t0)
        return {"ttft_ms": ttft, "b1": rate(short[:1]), "b8": rate(short), "b1_long": rate([long_prompt])}

    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--int4", type=Path, help="an int4 bundle with a prompt graph (default: the 124M shape's)"
    )
    ap.add_argument("--int8", type=Path, help="an int8-dynamic bundle to run beside, for reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long", type=int, default=896, help="the long prompt's tokens")
    ap.add_argument("--new", type=int, default=32, help="new tokens per decode figure")
    add_json_argument(ap)
    args = ap.parse_args(argv)
    report = Report("bench_prompt_graph", "int4: the int8 prompt graph on and off", argv, vars(args))
    int4 = args.int4 or variant_of(bundle_of(random_checkpoint("gpt2")), "int4")
    if Bundle.load(int4, verify=False).prompt_model_file is None:
        ap.error(f"{int4} has no prompt graph (made before it existed): quantize it again")
    subjects = {
        "int4, one graph": Generator.from_bundle(str(int4), threads=args.threads, prompt_graph=False),
        "int4 + int8 prompt graph": Generator.from_bundle(str(int4), threads=args.threads),
    }
    if args.int8:
        subjects["int8-dynamic"] = Generator.from_bundle(str(args.int8), threads=args.threads)
    runs = interleave({k: turn(g, args.long, args.new) for k, g in subjects.items()}, args.rounds, log=print)
    report.raw["rounds"] = runs.results
    base = "int4, one graph"
    rows = []
    for name in subjects:
        row: dict[str, object] = {"subject": name}
        for f in FIGURES:
            row[f] = summary(runs.values(name, f))[0]
            row[f + "_x"] = runs.ratio(name, base, f)["combined"]
        rows.append(row)
    report.table(
        f"{int4.name}: TTFT after {args.long} tokens and decode tok/s (32-token prompts, {args.new} new "
        f"tokens, greedy), {args.threads} threads, {args.rounds} rounds; x = per-round ratio to one graph",
        [
            Column("subject", "subject"),
            Column("ttft_ms", f"TTFT {args.long} (ms)", ".0f"),
            Column("ttft_ms_x", "x", ".2f"),
            Column("b1", "b1 tok/s", ".1f"),
            Column("b1_x", "x", ".2f"),
            Column("b8", "b8 tok/s", ".1f"),
            Column("b8_x", "x", ".2f"),
            Column("b1_long", f"b1 after {args.long}", ".1f"),
            Column("b1_long_x", "x", ".2f"),
        ],
        rows,
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
