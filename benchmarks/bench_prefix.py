"""Time to first token with a ``Generator``'s prefix cache (``prefix_cache=TOKENS``), batch 1.

Each round draws a new document of ``--prompt-tokens`` random token ids (seeded) and a new
``--suffix-tokens`` question. Two subjects take strict turns (benchmarks/harness.py): a
``Generator`` with the cache on (cleared, then its first call: nothing stored, a whole prefill;
the same prompt again; the document followed by the question) and one without it (the plain
prefill of the document, and of the question, untimed). Medians and spread over the rounds; the
ratios are to the plain prefill of the same round. The outputs are compared too.

    python -m benchmarks.bench_prefix --model gpt2 --prompt-tokens 896 --rounds 5 [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import ratio_summary, summary
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.prefix_cache import KVStore
from gpt2_edge.runtime.sampling import GenerationConfig

from .common import bundle_of, random_checkpoint, variant_of


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="bundle (default: a random --model bundle)")
    p.add_argument("--model", default="gpt2", help="GPT-2 shape of the random bundle")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--prompt-tokens", type=int, default=896)
    p.add_argument("--suffix-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    add_json_argument(p)
    args = p.parse_args(argv)
    report = Report("bench_prefix", "Time to first token with a Generator's prefix cache", argv, vars(args))
    path = args.bundle
    if path is None:
        path = bundle_of(random_checkpoint(args.model))
        if args.precision != "fp32":
            path = variant_of(path, args.precision)
    plain = Generator.from_bundle(str(path), threads=args.threads)
    tokens = (args.prompt_tokens + args.suffix_tokens + args.new_tokens) * 2
    cached = Generator(dataclasses.replace(plain.model, prefix_store=KVStore(tokens)))
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    vocab = plain.tokenizer.vocab_size

    def prompts(r: int) -> tuple[list[int], list[int]]:
        rng = np.random.default_rng(r + 1)  # round -1 (warm-up) gets its own document too
        doc = rng.integers(0, vocab, args.prompt_tokens).tolist()
        return doc, doc + rng.integers(0, vocab, args.suffix_tokens).tolist()

    def run_plain(r: int) -> dict:
        doc, question = prompts(r)
        base = plain.generate(doc, cfg)[0]
        asked = plain.generate(question, cfg)[0]
        return {"plain": base.timings["prefill_s"] * 1000, "ids": [base.token_ids, asked.token_ids]}

    def run_cached(r: int) -> dict:
        doc, question = prompts(r)
        cached.prefix_cache.clear()
        first = cached.generate(doc, cfg)[0]
        again = cached.generate(doc, cfg)[0]
        asked = cached.generate(question, cfg)[0]
        return {
            "first": first.timings["prefill_s"] * 1000,
            "repeated": again.timings["prefill_s"] * 1000,
            "new suffix": asked.timings["prefill_s"] * 1000,
            "ids": [first.token_ids, again.token_ids, asked.token_ids],
        }

    runs = interleave({"plain": run_plain, "cached": run_cached}, args.rounds, log=print)
    same = all(
        c["ids"][0] == p["ids"][0] == c["ids"][1] and c["ids"][2] == p["ids"][1]
        for p, c in zip(runs.values("plain"), runs.values("cached"), strict=True)
    )
    base = runs.values("plain", "plain")
    rows = []
    for name, subject in (
        ("plain", "plain"),
        ("first", "cached"),
        ("repeated", "cached"),
        ("new suffix", "cached"),
    ):
        ms = runs.values(subject, name)
        rows.append({"call": name, "ttft": summary(ms), "ratio": ratio_summary(ms, base)})
    report.raw["ttft_ms"] = {
        k: runs.values(s, k)
        for k, s in (
            ("plain", "plain"),
            ("first", "cached"),
            ("repeated", "cached"),
            ("new suffix", "cached"),
        )
    }
    report.raw["orders"] = runs.orders
    report.table(
        f"{args.prompt_tokens}-token prompt, {args.suffix_tokens}-token question, {args.threads} threads, "
        f"{args.rounds} rounds, bundle {path}",
        [
            Column("call", "call"),
            Column("ttft", "TTFT ms (median, min-max)", ".1f"),
            Column("ratio", "/ plain prefill (per-round ratio)", ".3f"),
        ],
        rows,
        note=f"outputs identical with and without the cache: {'yes' if same else 'NO'}",
    )
    report.emit(args.json)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
