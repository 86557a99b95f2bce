"""Step invariance (``Generator.from_bundle(path, step_invariant=True)``): what it fixes, what it costs.

1. Exactness, on the shipped model (``gpt2-edge export``'s default) and its quantized variants:
   greedy continuations of held-out passages, plain decoding vs speculative decoding by prompt
   lookup, with step invariance off and on; counts the continuations identical token for token.
   Off, a verified chunk's logits differ from a decode step's in the last bits, which a near-tie
   (or an activation quantization step) turns into another token.
2. Cost, on random GPT-2 124M-shaped weights: plain decode tokens/s with step invariance on over
   off, the same bundle and session settings, off and on in strict turns (benchmarks/harness.py)
   after a prompt of ``P`` tokens; median of per-round ratios and their range.

    python -m benchmarks.bench_step_invariance [--prompts 72] [--new-tokens 64] [--rounds 5]
        [--contexts 32,256,800] [--batches 1,8] [--precisions fp32,int8-dynamic,int4] [--skip-exact]
        [--skip-cost] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, random_checkpoint
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import summary

HELDOUT = Path(__file__).resolve().parent.parent / "gpt2_edge" / "default_model" / "heldout.txt"
HERE = CACHE / "step-invariant"  # bundles with the step_invariant input (older caches lack it)


def bundle(source: Path, name: str, precision: str = "fp32") -> Path:
    """``source``'s in-place ort bundle (cached under ``HERE``), or its ``precision`` variant."""
    base = HERE / f"{name}-ort-inplace-bundle"
    if not (base / "bundle.json").is_file():
        from gpt2_edge.export.bundle import export_bundle

        export_bundle(source, base, target="ort", overwrite=True)
    if precision == "fp32":
        return base
    out = base.with_name(f"{base.name}-{precision}")
    if not (out / "bundle.json").is_file():
        from gpt2_edge.quantize.pipeline import quantize_bundle

        quantize_bundle(base, precision, out, force=True, overwrite=True)
    return out


def exactness(precisions: list[str], n_prompts: int, new: int, threads: int) -> list[dict]:
    from gpt2_edge import DEFAULT_MODEL_DIR, GenerationConfig, Generator

    rows = []
    for precision in precisions:
        path = bundle(DEFAULT_MODEL_DIR, "default-model", precision)
        for invariant in (False, True):
            gen = Generator.from_bundle(str(path), threads=threads, step_invariant=invariant)
            ids = gen.tokenizer.encode(HELDOUT.read_text(encoding="utf-8"))
            starts = np.linspace(0, len(ids) - 33, n_prompts).astype(int)
            prompts = [ids[s : s + 32] for s in starts]
            cfg = dict(max_new_tokens=min(new, gen.n_ctx - 32), ignore_eos=True)
            same = 0
            for p in prompts:
                plain = gen.generate([p], GenerationConfig(**cfg))[0].token_ids
                spec = gen.generate([p], GenerationConfig(**cfg, prompt_lookup=8))[0].token_ids
                same += plain == spec
            rows.append(dict(precision=precision, invariant=invariant, same=same, n=len(prompts)))
            print(
                f"exactness {precision} step_invariant={invariant}: {same}/{len(prompts)} identical",
                flush=True,
            )
    return rows


def decode_rate(backend, batch: int, context: int, steps: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    cache = backend.new_cache(batch, context + steps + 1)
    slots = list(range(batch))
    cache.prefill(slots, [rng.integers(0, 50000, context).tolist() for _ in slots])
    t = time.perf_counter()
    for _ in range(steps):
        cache.decode(slots, [int(x) for x in rng.integers(0, 50000, batch)])
    return batch * steps / (time.perf_counter() - t)


def round_rate(backend, batch: int, context: int, steps: int, r: int) -> float:
    """``decode_rate`` for round ``r`` (-1: the untimed warm-up): each round its own random tokens."""
    return decode_rate(backend, batch, context, steps, r + 1)


def cost(
    precisions: list[str], contexts: list[int], batches: list[int], rounds: int, threads: int
) -> list[dict]:
    from gpt2_edge.runtime.bundle import Bundle
    from gpt2_edge.runtime.session import OrtBackend

    rows = []
    ckpt = random_checkpoint("gpt2")
    for precision in precisions:
        b = Bundle.load(bundle(ckpt, ckpt.name, precision))
        off = OrtBackend(b, threads=threads, step_invariant=False)
        on = OrtBackend(b, threads=threads, step_invariant=True)
        for batch in batches:
            for context in contexts:
                steps = 48 if batch == 1 else 24
                runs = interleave(
                    {
                        "off": functools.partial(round_rate, off, batch, context, steps),
                        "on": functools.partial(round_rate, on, batch, context, steps),
                    },
                    rounds,
                )
                ratio = runs.ratio("on", "off")
                row = dict(
                    precision=precision,
                    batch=batch,
                    context=context,
                    off=summary(runs.values("off"))[0],
                    on=summary(runs.values("on"))[0],
                    ratio=(ratio["median"], ratio["lo"], ratio["hi"]),
                    combined=ratio["combined"],
                    rates={"off": runs.values("off"), "on": runs.values("on"), "orders": runs.orders},
                )
                rows.append(row)
                print(
                    f"cost {precision} b{batch} @{context}: off {row['off']:.1f}, on {row['on']:.1f} tok/s, "
                    f"on/off {ratio['median']:.2f} ({ratio['lo']:.2f}-{ratio['hi']:.2f})",
                    flush=True,
                )
        del off, on
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=72)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--contexts", default="32,256,800")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--precisions", default="fp32,int8-dynamic,int4")
    ap.add_argument("--exact-precisions", default="fp32,int8-dynamic,int8-weight,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    add_json_argument(ap)
    a = ap.parse_args(argv)
    report = Report("bench_step_invariance", "Step invariance: what it fixes, what it costs", argv, vars(a))
    exact = (
        [] if a.skip_exact else exactness(a.exact_precisions.split(","), a.prompts, a.new_tokens, a.threads)
    )
    rows = (
        []
        if a.skip_cost
        else cost(
            a.precisions.split(","),
            [int(x) for x in a.contexts.split(",")],
            [int(x) for x in a.batches.split(",")],
            a.rounds,
            a.threads,
        )
    )
    if exact:
        table = []
        for p in dict.fromkeys(r["precision"] for r in exact):
            off, on = (
                next(r for r in exact if r["precision"] == p and r["invariant"] == v) for v in (False, True)
            )
            table.append(
                {"precision": p, "off": f"{off['same']}/{off['n']}", "on": f"{on['same']}/{on['n']}"}
            )
        report.table(
            f"exactness: greedy continuations of {a.prompts} held-out passages on the shipped model, "
            f"{a.new_tokens} new tokens, plain = prompt lookup 8",
            [
                Column("precision", "precision"),
                Column("off", "identical, step invariance off"),
                Column("on", "on"),
            ],
            table,
        )
    if rows:
        report.raw["cost"] = rows
        report.table(
            f"cost: plain decode tok/s, 124M random weights, on over off, {a.rounds} rounds, "
            f"{a.threads} threads",
            [
                Column("precision", "precision"),
                Column("batch", "batch", "d"),
                Column("context", "context", "d"),
                Column("off", "off tok/s", ".1f"),
                Column("on", "on tok/s", ".1f"),
                Column("ratio", "on / off, median (range)", ".2f"),
                Column("combined", "on / off, both orders combined", ".2f"),
            ],
            rows,
        )
    report.emit(a.json)


if __name__ == "__main__":
    main()
