"""Decode speed: gpt2-edge runtime vs Optimum ORTModelForCausalLM vs transformers (PyTorch), same run.

Random GPT-2 124M-shaped weights (speed does not depend on the values), batch 1, a 32-token
prompt, 128 new tokens (greedy, eos disabled so every run makes all 128), N CPU threads.
Every engine is loaded once in this process, then they take strict turns for ``--repeats``
rounds (benchmarks/harness.py); the table shows each engine's decode tokens/s (median, min-max
over rounds) and ours / engine, the median of per-round ratios. Ours is timed through
``Generator.generate`` (``ignore_eos``), as an app calls it.

    python -m benchmarks.bench_decode [--threads 2] [--repeats 3] [--new-tokens 128] [--json PATH]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import bundle_of, random_checkpoint
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import summary

Rate = Callable[[int], float]  # one timed run (round index) -> decode tokens/s


def ours(bundle: Path, prompt: list[int], new: int, threads: int) -> Rate:
    """Decode tokens/s through ``Generator.generate``, the API an app calls."""
    from gpt2_edge import GenerationConfig, Generator

    gen = Generator.from_bundle(str(bundle), threads=threads)
    cfg = GenerationConfig(max_new_tokens=new, ignore_eos=True)  # every run decodes all tokens

    def rate(_: int) -> float:
        t = gen.generate([prompt], cfg)[0].timings
        return (t["steps"] - 1) / t["decode_s"]

    return rate


def optimum(checkpoint: Path, prompt: list[int], new: int, threads: int) -> Rate:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(
        checkpoint, export=True, use_cache=True, session_options=so, provider="CPUExecutionProvider"
    )
    return _hf_generate_rate(model, prompt, new)


def transformers_torch(checkpoint: Path, prompt: list[int], new: int, threads: int) -> Rate:
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    return _hf_generate_rate(model, prompt, new, no_grad=True)


def _hf_generate_rate(model, prompt: list[int], new: int, no_grad: bool = False) -> Rate:
    import torch

    ids = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)

    def rate(_: int) -> float:
        with torch.no_grad() if no_grad else torch.enable_grad():
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            total = time.perf_counter() - t0
        assert out.shape[1] == ids.shape[1] + new
        return (new - 1) / (total - first)  # decode steps only, prefill subtracted

    return rate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of strict turns")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--skip", nargs="*", default=[], choices=["optimum", "torch"])
    add_json_argument(ap)
    args = ap.parse_args(argv)
    report = Report("bench_decode", "Decode speed: gpt2-edge vs Optimum vs transformers", argv, vars(args))

    ckpt = random_checkpoint(args.preset)
    prompt = np.random.default_rng(0).integers(0, 50000, args.prompt_tokens).tolist()
    new, threads = args.new_tokens, args.threads
    engines: dict[str, Rate] = {
        "gpt2-edge, ort target, in-place KV (GQA)": ours(bundle_of(ckpt, "ort"), prompt, new, threads)
    }
    for label, b in (
        ("gpt2-edge, ort target, concat KV (MHA)", bundle_of(ckpt, "ort", kv_cache="concat")),
        ("gpt2-edge, ort target, concat, unfused", bundle_of(ckpt, "ort", False, kv_cache="concat")),
        ("gpt2-edge, tensorrt target (plain ONNX)", bundle_of(ckpt, "tensorrt")),
    ):
        engines[label] = ours(b, prompt, new, threads)
    if "optimum" not in args.skip:
        engines["optimum ORTModelForCausalLM"] = optimum(ckpt, prompt, new, threads)
    if "torch" not in args.skip:
        engines["transformers generate (PyTorch)"] = transformers_torch(ckpt, prompt, new, threads)
    runs = interleave(engines, args.repeats, log=print)
    mine = next(iter(engines))
    rows = []
    for name in engines:
        r = runs.ratio(mine, name)
        rows.append(
            {
                "engine": name,
                "rate": summary(runs.values(name)),
                "ms": 1000 / summary(runs.values(name))[0],
                "ours": (r["median"], r["lo"], r["hi"]),
            }
        )
    report.raw["rates"] = runs.results
    report.raw["orders"] = runs.orders
    report.table(
        f"{args.preset} random weights, batch 1, {args.prompt_tokens}-token prompt, {new} new tokens, "
        f"{threads} threads, {args.repeats} rounds",
        [
            Column("engine", "engine"),
            Column("rate", "decode tok/s (median, min-max)", ".1f"),
            Column("ms", "ms/token (median)", ".2f"),
            Column("ours", "ours / engine (per-round ratio)", ".2f"),
        ],
        rows,
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
