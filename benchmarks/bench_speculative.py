"""Speculative decoding by prompt lookup vs plain decoding: tokens/s at batch 1, one process.

Models: the shipped model (``gpt2-edge export``'s default; 4 layers, 256 wide, context 128) and
random GPT-2 124M-shaped weights (benchmarks/common.py). Workloads, per model:

- ``quote``: a held-out passage (gpt2_edge/default_model/heldout.txt), a blank line and the
  passage's first tokens, so a model that quotes continues with the passage; greedy.
- ``self-quote`` (shipped model): a passage, the model's own greedy continuation of it, a blank line
  and the passage again: the continuation repeats text already in the prompt; greedy.
- ``continue``: a held-out passage's first 32 tokens, greedy: a continuation that is not in the
  prompt (what a draft model, ``--draft``, is for).
- ``random``: random token ids, greedy (whatever the model does; a random model loops).
- ``random-sampled``: random token ids, sampled at temperature 1 (same seed with and without):
  continuations with almost no n-gram match, the worst case for drafting.

Plain (A) and prompt lookup (B) alternate prompt by prompt, ABBA over the rounds, in this one
process; each round gives a ratio of tokens/s (B over A, the round's tokens over its decode
seconds, prefill excluded); the table shows the median ratio and its range over rounds, the
medians of both rates, drafted tokens accepted, tokens per target pass, and whether greedy output
was identical token for token.

    python -m benchmarks.bench_speculative [--models shipped,124m] [--rounds 5] [--new-tokens 64]
        [--threads 2] [--prompt-lookup 8] [--draft BUNDLE [--draft-tokens 4]]

With ``--draft`` the B side is the draft model (no prompt lookup) on the same target session.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, bundle_of, random_checkpoint

HELDOUT = Path(__file__).resolve().parent.parent / "gpt2_edge" / "default_model" / "heldout.txt"


def shipped_bundle() -> Path:
    """The shipped model's ort bundle (in-place KV cache), exported once into the cache."""
    from gpt2_edge import DEFAULT_MODEL_DIR

    out = CACHE / "default-model-ort-inplace-bundle"
    if not (out / "bundle.json").is_file():
        from gpt2_edge.export.bundle import export_bundle

        export_bundle(DEFAULT_MODEL_DIR, out, target="ort", overwrite=True)
    return out


def workloads(gen, model: str, new: int, n_prompts: int) -> dict[str, tuple[list[list[int]], dict]]:
    """name -> (prompts, GenerationConfig fields) for ``gen``'s model; prompts leave room for ``new``."""
    from gpt2_edge import GenerationConfig

    tok, n_ctx = gen.tokenizer, gen.n_ctx
    ids = tok.encode(HELDOUT.read_text(encoding="utf-8"))
    sep = tok.encode("\n\n")
    passage = min(120, (n_ctx - new - len(sep)) // 2 if model == "shipped" else 120)
    starts = np.linspace(0, len(ids) - passage - 1, n_prompts).astype(int)
    greedy = dict(max_new_tokens=new, ignore_eos=True)
    out: dict[str, tuple[list[list[int]], dict]] = {}
    quote = [ids[s : s + passage] + sep + ids[s : s + 5] for s in starts]
    out["quote"] = (quote, greedy)
    out["continue"] = ([ids[s : s + 32] for s in starts], greedy)  # ungrounded: what a draft model is for
    if model == "shipped":
        p_len = max(8, (n_ctx - 2 * new - len(sep)) // 2)
        selfq = []
        for s in starts:
            p = ids[s : s + p_len]
            c = gen.generate([p], GenerationConfig(**greedy))[0].token_ids
            selfq.append(p + c + sep + p)
        out["self-quote"] = (selfq, dict(greedy, max_new_tokens=min(new, n_ctx - len(selfq[0]))))
    rng = np.random.default_rng(0)
    vocab = tok.vocab_size - 1
    rand = [rng.integers(0, vocab, 32).tolist() for _ in range(n_prompts)]
    out["random"] = (rand, greedy)
    out["random-sampled"] = (rand, dict(greedy, do_sample=True, temperature=1.0, seed=0))
    return out


def run(gen, prompts: list[list[int]], fields: dict, lookup: int) -> tuple[int, float, list, dict]:
    """Decode each prompt alone: tokens after the first, decode seconds, token ids, stats."""
    from gpt2_edge import GenerationConfig

    tokens, seconds, out = 0, 0.0, []
    stats = dict(passes=0.0, drafted=0.0, accepted=0.0, emitted=0.0)
    for p in prompts:
        r = gen.generate([p], GenerationConfig(**fields, prompt_lookup=lookup))[0]
        tokens += len(r.token_ids) - 1
        seconds += r.timings["decode_s"]
        out.append(r.token_ids)
        t = r.timings
        if "spec_passes" in t:
            stats["passes"] += t["spec_passes"]
            stats["drafted"] += t["spec_drafted"]
            stats["accepted"] += t["spec_accepted"]
            stats["emitted"] += len(r.token_ids) - 1
    return tokens, seconds, out, stats


def bench_model(model: str, args: argparse.Namespace) -> list[dict]:
    from gpt2_edge import Generator

    path = shipped_bundle() if model == "shipped" else bundle_of(random_checkpoint("gpt2"))
    gen = Generator.from_bundle(str(path), threads=args.threads)
    # B: prompt lookup, or (--draft) the draft model on the same session, no prompt lookup
    gen_b, lookup_b = gen, args.prompt_lookup
    if args.draft:
        from gpt2_edge.runtime.drafters import DraftModel

        draft = DraftModel.from_bundle(args.draft, args.draft_tokens, threads=args.threads).attach(
            gen.backend.bundle
        )
        gen_b, lookup_b = Generator(gen.backend, gen.tokenizer, gen.eos_token_id, gen.n_ctx, draft=draft), 0
    rows = []
    for name, (prompts, fields) in workloads(gen, model, args.new_tokens, args.prompts).items():
        run(gen, prompts[:1], fields, 0)  # warm-up: first-run allocations and kernel choices
        run(gen_b, prompts[:1], fields, lookup_b)
        ratios, rate_a, rate_b, identical = [], [], [], True
        total = dict(passes=0.0, drafted=0.0, accepted=0.0, emitted=0.0)
        t0 = time.perf_counter()
        for r in range(args.rounds):
            ta = sa = tb = sb = 0.0
            for p in prompts:
                order = ("a", "b") if r % 2 == 0 else ("b", "a")
                got = {}
                for which in order:
                    got[which] = (
                        run(gen, [p], fields, 0) if which == "a" else run(gen_b, [p], fields, lookup_b)
                    )
                (n_a, s_a, ids_a, _), (n_b, s_b, ids_b, st) = got["a"], got["b"]
                ta, sa, tb, sb = ta + n_a, sa + s_a, tb + n_b, sb + s_b
                identical &= ids_a == ids_b or bool(fields.get("do_sample"))
                for k in total:
                    total[k] += st[k]
            rate_a.append(ta / sa)
            rate_b.append(tb / sb)
            ratios.append(rate_b[-1] / rate_a[-1])
        rows.append(
            dict(
                model=model,
                workload=name,
                plain=statistics.median(rate_a),
                lookup=statistics.median(rate_b),
                ratio=statistics.median(ratios),
                lo=min(ratios),
                hi=max(ratios),
                acceptance=total["accepted"] / total["drafted"] if total["drafted"] else 0.0,
                per_pass=total["emitted"] / total["passes"] if total["passes"] else 1.0,
                identical="n/a (sampled)" if fields.get("do_sample") else ("yes" if identical else "NO"),
                seconds=time.perf_counter() - t0,
            )
        )
        print(_line(rows[-1]), flush=True)
    return rows


HEAD = (
    "| model | workload | plain tok/s | lookup tok/s | ratio (median) | ratio range | accepted "
    "| tokens/pass | greedy identical |\n|---|---|---:|---:|---:|---|---:|---:|---|"
)


def _line(r: dict) -> str:
    return (
        f"| {r['model']} | {r['workload']} | {r['plain']:.1f} | {r['lookup']:.1f} | {r['ratio']:.2f}x "
        f"| {r['lo']:.2f}-{r['hi']:.2f} | {100 * r['acceptance']:.0f}% | {r['per_pass']:.2f} "
        f"| {r['identical']} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="shipped,124m", help="comma-separated: shipped, 124m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per workload")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-lookup", type=int, default=8, help="most drafted tokens per step")
    ap.add_argument("--draft", help="compare a draft model (this bundle) with plain decoding instead")
    ap.add_argument("--draft-tokens", type=int, default=4)
    args = ap.parse_args()
    b = (
        f"draft {args.draft} ({args.draft_tokens} tokens)"
        if args.draft
        else f"prompt lookup {args.prompt_lookup}"
    )
    print(f"{b}, {args.threads} threads, {args.rounds} rounds, batch 1")
    print(HEAD, flush=True)
    rows = [r for m in args.models.split(",") for r in bench_model(m.strip(), args)]
    print("\n" + HEAD)
    for r in rows:
        print(_line(r))


if __name__ == "__main__":
    main()
