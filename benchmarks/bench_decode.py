"""Decode speed: gpt2-edge runtime vs Optimum ORTModelForCausalLM vs transformers (PyTorch), same run.

Random GPT-2 124M-shaped weights (speed does not depend on the values), batch 1, a 32-token
prompt, 128 new tokens (greedy, eos disabled so every run makes all 128), N CPU threads.
Prints decode tokens/s per engine and ratios against ours; ours is timed through
``Generator.generate`` (``ignore_eos``), as an app calls it.

    python -m benchmarks.bench_decode [--threads 2] [--repeats 3] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import bundle_of, random_checkpoint


def bench_ours(bundle: Path, prompt: list[int], new: int, threads: int, repeats: int) -> float:
    """Decode tokens/s through ``Generator.generate``, the API an app calls (median of repeats)."""
    from gpt2_edge import GenerationConfig, Generator

    gen = Generator.from_bundle(str(bundle), threads=threads)
    cfg = GenerationConfig(max_new_tokens=new, ignore_eos=True)  # every run decodes all tokens
    rates = []
    for _ in range(repeats + 1):
        t = gen.generate([prompt], cfg)[0].timings
        rates.append((t["steps"] - 1) / t["decode_s"])
    return statistics.median(rates[1:])


def bench_optimum(checkpoint: Path, prompt: list[int], new: int, threads: int, repeats: int) -> float:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(
        checkpoint, export=True, use_cache=True, session_options=so, provider="CPUExecutionProvider"
    )
    return _hf_generate_rate(model, torch.tensor([prompt]), new, repeats)


def bench_torch(checkpoint: Path, prompt: list[int], new: int, threads: int, repeats: int) -> float:
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        return _hf_generate_rate(model, torch.tensor([prompt]), new, repeats)


def _hf_generate_rate(model, ids, new: int, repeats: int) -> float:
    import torch

    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    rates = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        total = time.perf_counter() - t0
        assert out.shape[1] == ids.shape[1] + new
        rates.append((new - 1) / (total - first))  # decode steps only, prefill subtracted
    return statistics.median(rates[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--skip", nargs="*", default=[], choices=["optimum", "torch"])
    args = ap.parse_args()

    ckpt = random_checkpoint(args.preset)
    prompt = np.random.default_rng(0).integers(0, 50000, args.prompt_tokens).tolist()
    rows = []
    ours = bench_ours(bundle_of(ckpt, "ort"), prompt, args.new_tokens, args.threads, args.repeats)
    rows.append(("gpt2-edge, ort target, in-place KV (GQA)", ours))
    for label, b in (
        ("gpt2-edge, ort target, concat KV (MHA)", bundle_of(ckpt, "ort", kv_cache="concat")),
        ("gpt2-edge, ort target, concat, unfused", bundle_of(ckpt, "ort", False, kv_cache="concat")),
        ("gpt2-edge, tensorrt target (plain ONNX)", bundle_of(ckpt, "tensorrt")),
    ):
        rows.append((label, bench_ours(b, prompt, args.new_tokens, args.threads, args.repeats)))
    if "optimum" not in args.skip:
        rows.append(
            (
                "optimum ORTModelForCausalLM",
                bench_optimum(ckpt, prompt, args.new_tokens, args.threads, args.repeats),
            )
        )
    if "torch" not in args.skip:
        rows.append(
            (
                "transformers generate (PyTorch)",
                bench_torch(ckpt, prompt, args.new_tokens, args.threads, args.repeats),
            )
        )
    print(
        f"\n{args.preset} random weights, batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new "
        f"tokens, {args.threads} threads, median of {args.repeats}"
    )
    print(f"{'engine':<40} {'decode tok/s':>12} {'ms/token':>9} {'ours is':>8}")
    for name, rate in rows:
        print(f"{name:<40} {rate:>12.1f} {1000 / rate:>9.2f} {ours / rate:>7.2f}x")


if __name__ == "__main__":
    main()
