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

Plain (A) and prompt lookup (B) take strict turns (benchmarks/harness.py), a turn decoding every
prompt of the workload, in this one process; each round gives a ratio of tokens/s (B over A, the
round's tokens over its decode seconds, prefill excluded); the table shows the median ratio and
its range over rounds, the medians of both rates, drafted tokens accepted, tokens per target
pass, and whether greedy output was identical token for token.

    python -m benchmarks.bench_speculative [--models shipped,124m] [--rounds 5] [--new-tokens 64]
        [--threads 2] [--prompt-lookup 8] [--draft BUNDLE [--draft-tokens 4]] [--json PATH]

With ``--draft`` the B side is the draft model (no prompt lookup) on the same target session.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, bundle_of, random_checkpoint
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import summary

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
            gen.model.bundle
        )
        gen_b, lookup_b = Generator(dataclasses.replace(gen.model, draft=draft)), 0
    rows = []
    for name, (prompts, fields) in workloads(gen, model, args.new_tokens, args.prompts).items():
        run(gen, prompts[:1], fields, 0)  # warm-up: first-run allocations and kernel choices
        run(gen_b, prompts[:1], fields, lookup_b)
        t0 = time.perf_counter()
        runs = interleave(
            {
                "plain": lambda _r, p=prompts, f=fields: run(gen, p, f, 0),
                "lookup": lambda _r, p=prompts, f=fields: run(gen_b, p, f, lookup_b),
            },
            args.rounds,
            warmup=0,  # the one-prompt warm-up above
        )
        total = dict(passes=0.0, drafted=0.0, accepted=0.0, emitted=0.0)
        for _, _, _, st in runs.values("lookup"):
            for k in total:
                total[k] += st[k]
        identical = all(
            a[2] == b[2] for a, b in zip(runs.values("plain"), runs.values("lookup"), strict=True)
        )
        rate = lambda x: x[0] / x[1]  # noqa: E731 - tokens over decode seconds
        ratio = runs.ratio("lookup", "plain", rate)
        rows.append(
            dict(
                model=model,
                workload=name,
                plain=summary(runs.values("plain", rate))[0],
                lookup=summary(runs.values("lookup", rate))[0],
                ratio=ratio["median"],
                range=f"{ratio['lo']:.2f}-{ratio['hi']:.2f}",
                combined=ratio["combined"],
                acceptance=total["accepted"] / total["drafted"] if total["drafted"] else 0.0,
                per_pass=total["emitted"] / total["passes"] if total["passes"] else 1.0,
                identical="n/a (sampled)" if fields.get("do_sample") else ("yes" if identical else "NO"),
                seconds=time.perf_counter() - t0,
            )
        )
        r = rows[-1]
        print(f"{model} {name}: lookup / plain {r['ratio']:.2f} ({r['range']})", flush=True)
    return rows


COLUMNS = [
    Column("model", "model"),
    Column("workload", "workload"),
    Column("plain", "plain tok/s", ".1f"),
    Column("lookup", "lookup tok/s", ".1f"),
    Column("ratio", "ratio (median)", ".2f"),
    Column("range", "ratio range"),
    Column("combined", "ratio, both orders combined", ".2f"),
    Column("acceptance", "accepted", ".0%"),
    Column("per_pass", "tokens/pass", ".2f"),
    Column("identical", "greedy identical"),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="shipped,124m", help="comma-separated: shipped, 124m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per workload")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-lookup", type=int, default=8, help="most drafted tokens per step")
    ap.add_argument("--draft", help="compare a draft model (this bundle) with plain decoding instead")
    ap.add_argument("--draft-tokens", type=int, default=4)
    add_json_argument(ap)
    args = ap.parse_args(argv)
    report = Report("bench_speculative", "Speculative decoding vs plain decoding, batch 1", argv, vars(args))
    b = (
        f"draft {args.draft} ({args.draft_tokens} tokens)"
        if args.draft
        else f"prompt lookup {args.prompt_lookup}"
    )
    rows = [r for m in args.models.split(",") for r in bench_model(m.strip(), args)]
    report.table(f"{b}, {args.threads} threads, {args.rounds} rounds, batch 1", COLUMNS, rows)
    report.emit(args.json)


if __name__ == "__main__":
    main()
