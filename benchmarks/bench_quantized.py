"""Size, decode speed and accuracy of every precision, for the default model and a 124M shape.

For the shipped default model each variant is made with ``gpt2-edge quantize`` semantics and
judged against fp32 on the held-out last 10% of tinyshakespeare (perplexity, KL, top-1 and
greedy agreement). For a random GPT-2 124M-shaped model (accuracy is meaningless there) only
size and speed are reported. Speed: batch 1, 32-token prompt, 128 new tokens, greedy, N threads.

    python -m benchmarks.bench_quantized [--text ../shared/data/tinyshakespeare.txt] [--skip-124m]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, random_checkpoint
from gpt2_edge.export.bundle import export_bundle
from gpt2_edge.quantize.pipeline import PRECISIONS, quantize_bundle
from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig


def decode_rate(bundle: Path, threads: int, new: int = 128, repeats: int = 3) -> float:
    """Decode tokens/s through ``Generator.generate`` (``ignore_eos``), median of ``repeats``."""
    gen = Generator.from_bundle(str(bundle), threads=threads, verify=False)
    prompt = np.random.default_rng(0).integers(0, gen.tokenizer.vocab_size - 1, 32).tolist()
    new = min(new, gen.n_ctx - len(prompt))  # the default model's context is 128
    cfg = GenerationConfig(max_new_tokens=new, ignore_eos=True)
    rates = []
    for _ in range(repeats + 1):
        t = gen.generate([prompt], cfg)[0].timings
        rates.append((t["steps"] - 1) / t["decode_s"])
    return statistics.median(rates[1:])


def size_mib(bundle: Path) -> float:
    files = json.loads((bundle / "bundle.json").read_text())["files"]
    return sum(f["bytes"] for n, f in files.items() if n.startswith("model.onnx")) / 2**20


def variants(fp32: dict[str, Path], out: Path, calib: Path | None, held_out: Path | None) -> dict[str, Path]:
    made = {"fp32": fp32["ort"]}
    for p in PRECISIONS:
        src = fp32["tensorrt"] if p in ("int8-qdq", "fp16") else fp32["ort"]
        made[p], _ = quantize_bundle(
            src, p, out / p, calib_text=calib, eval_text=held_out, force=True, overwrite=True, threads=2
        )
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-124m", action="store_true")
    ap.add_argument("--skip-default", action="store_true")
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    rows = []
    if not args.skip_default:
        text = Path(args.text).read_text()
        calib, held_out = CACHE / "calib.txt", CACHE / "heldout.txt"
        cut = int(len(text) * 0.9)
        calib.write_text(text[:cut][:200_000])
        held_out.write_text(text[cut:])
        out = CACHE / "default"
        fp32 = {
            t: export_bundle(None, out / f"fp32-{t}", target=t, overwrite=True) for t in ("ort", "tensorrt")
        }
        for name, b in variants(fp32, out, calib, held_out).items():
            acc = Bundle.load(b, verify=False).manifest.get("accuracy") or {}
            rows.append(("default", name, size_mib(b), decode_rate(b, args.threads), acc))
    if not args.skip_124m:
        ckpt = random_checkpoint("gpt2")
        out = CACHE / "gpt2-124m"
        fp32 = {
            t: export_bundle(ckpt, out / f"fp32-{t}", target=t, overwrite=True, validate=False)
            for t in ("ort", "tensorrt")
        }
        for p in PRECISIONS:
            src = fp32["tensorrt"] if p in ("int8-qdq", "fp16") else fp32["ort"]
            calib = CACHE / "calib.txt" if p == "int8-qdq" else None
            b, _ = quantize_bundle(src, p, out / p, calib_text=calib, force=True, overwrite=True)
            rows.append(("124M random", p, size_mib(b), decode_rate(b, args.threads), {}))
        rows.insert(
            len(rows) - len(PRECISIONS),
            ("124M random", "fp32", size_mib(fp32["ort"]), decode_rate(fp32["ort"], args.threads), {}),
        )
    print(
        f"\nbatch 1, 32-token prompt, 128 new tokens (96 for the 128-context default model), greedy, "
        f"{args.threads} threads (ONNX Runtime CPU)"
    )
    print(
        f"{'model':<12} {'precision':<13} {'MiB':>7} {'tok/s':>7} {'ppl':>8} {'Δppl':>7} {'KL':>7} "
        f"{'top-1':>7} {'greedy':>7}"
    )
    for model, name, mib, rate, acc in rows:
        if acc:
            print(
                f"{model:<12} {name:<13} {mib:>7.1f} {rate:>7.1f} {acc['perplexity']:>8.3f} "
                f"{100 * acc['ppl_increase']:>+6.2f}% {acc['mean_kl']:>7.4f} "
                f"{100 * acc['top1_agreement']:>6.2f}% "
                f"{100 * acc['greedy_agreement']:>6.1f}%"
            )
        else:
            print(f"{model:<12} {name:<13} {mib:>7.1f} {rate:>7.1f}")


if __name__ == "__main__":
    main()
