"""Time to first token with a ``Generator``'s prefix cache (``prefix_cache=TOKENS``), batch 1.

Each round draws a new document of ``--prompt-tokens`` random token ids (seeded) and times, on one
``Generator`` with the cache on: its first call (nothing stored: a whole prefill), the same prompt
again, and the document followed by a new ``--suffix-tokens`` question; then the same prompt on a
``Generator`` without the cache (the plain prefill, interleaved). Medians and spread over the
rounds; the ratios are to the plain prefill of the same round. The outputs are compared too.

    python -m benchmarks.bench_prefix --model gpt2 --prompt-tokens 896 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from gpt2_edge.measure import summary
from gpt2_edge.runtime.generator import Generator
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
    args = p.parse_args(argv)
    path = args.bundle
    if path is None:
        path = bundle_of(random_checkpoint(args.model))
        if args.precision != "fp32":
            path = variant_of(path, args.precision)
    plain = Generator.from_bundle(str(path), threads=args.threads)
    tokens = (args.prompt_tokens + args.suffix_tokens + args.new_tokens) * 2
    cached = Generator(plain.backend, plain.tokenizer, plain.eos_token_id, plain.n_ctx, prefix_cache=tokens)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    rng = np.random.default_rng(0)
    vocab = plain.tokenizer.vocab_size
    rows: dict[str, list[float]] = {"plain": [], "first": [], "repeated": [], "new suffix": []}
    same = True
    for _ in range(args.rounds):
        doc = rng.integers(0, vocab, args.prompt_tokens).tolist()
        question = doc + rng.integers(0, vocab, args.suffix_tokens).tolist()
        cached.prefix_cache.clear()
        first = cached.generate(doc, cfg)[0]
        base = plain.generate(doc, cfg)[0]
        again = cached.generate(doc, cfg)[0]
        asked = cached.generate(question, cfg)[0]
        same &= first.token_ids == base.token_ids == again.token_ids
        same &= asked.token_ids == plain.generate(question, cfg)[0].token_ids
        for name, r in (("plain", base), ("first", first), ("repeated", again), ("new suffix", asked)):
            rows[name].append(r.timings["prefill_s"] * 1000)
    print(f"bundle {path}, {args.prompt_tokens}-token prompt, {args.threads} threads, {args.rounds} rounds")
    print("| call | TTFT ms (median, min-max) | / plain prefill (median of rounds) |")
    print("|---|---:|---:|")
    for name, ms in rows.items():
        med, lo, hi = summary(ms)
        ratio = statistics.median(a / b for a, b in zip(ms, rows["plain"], strict=True))
        print(f"| {name} | {med:.1f} ({lo:.1f}-{hi:.1f}) | {ratio:.3f} |")
    print(f"outputs identical with and without the cache: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
