"""Size, decode speed and accuracy of every precision, for the default model and a 124M shape.

For the shipped default model each variant is made with ``gpt2-edge quantize`` semantics and
judged against fp32 on the held-out last 10% of tinyshakespeare (perplexity, KL, top-1 and
greedy agreement). For a random GPT-2 124M-shaped model (accuracy is meaningless there) only
size and speed are reported. Speed: batch 1, 32-token prompt, 128 new tokens, greedy, N threads;
a model's variants are loaded together and take strict turns for ``--rounds`` rounds
(benchmarks/harness.py), with the per-round ratio to fp32.

    python -m benchmarks.bench_quantized [--text ../shared/data/tinyshakespeare.txt] [--skip-124m]
        [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, random_checkpoint
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.export.bundle import export_bundle
from gpt2_edge.measure import ratio_summary, summary
from gpt2_edge.quantize.pipeline import PRECISIONS, quantize_bundle
from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig


def decode_rate(bundle: Path, threads: int, new: int = 128) -> Callable[[int], float]:
    """One timed ``Generator.generate`` (``ignore_eos``) per call: decode tokens/s."""
    gen = Generator.from_bundle(str(bundle), threads=threads, verify=False)
    prompt = np.random.default_rng(0).integers(0, gen.tokenizer.vocab_size - 1, 32).tolist()
    new = min(new, gen.n_ctx - len(prompt))  # the default model's context is 128
    cfg = GenerationConfig(max_new_tokens=new, ignore_eos=True)

    def rate(_: int) -> float:
        t = gen.generate([prompt], cfg)[0].timings
        return (t["steps"] - 1) / t["decode_s"]

    return rate


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


def speed_rows(model: str, bundles: dict[str, Path], args: argparse.Namespace, report: Report) -> list[dict]:
    """The variants' decode rates, strict turns; one row per variant (accuracy from its manifest)."""
    runs = interleave({p: decode_rate(b, args.threads) for p, b in bundles.items()}, args.rounds, log=print)
    report.raw.setdefault("rates", {})[model] = runs.results
    rows = []
    for name, b in bundles.items():
        acc = Bundle.load(b, verify=False).manifest.accuracy or {}
        rate = runs.values(name)
        row = {
            "model": model,
            "precision": name,
            "mib": size_mib(b),
            "rate": summary(rate)[0],
            "vs_fp32": ratio_summary(rate, runs.values("fp32"))[0],
        }
        if acc:
            row |= {
                "ppl": acc["perplexity"],
                "dppl": f"{100 * acc['ppl_increase']:+.2f}%",
                "kl": acc["mean_kl"],
                "top1": f"{100 * acc['top1_agreement']:.2f}%",
                "greedy": f"{100 * acc['greedy_agreement']:.1f}%",
            }
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-124m", action="store_true")
    ap.add_argument("--skip-default", action="store_true")
    add_json_argument(ap)
    args = ap.parse_args(argv)
    report = Report("bench_quantized", "Precisions: size, decode speed and accuracy", argv, vars(args))
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
        rows += speed_rows("default", variants(fp32, out, calib, held_out), args, report)
    if not args.skip_124m:
        ckpt = random_checkpoint("gpt2")
        out = CACHE / "gpt2-124m"
        fp32 = {
            t: export_bundle(ckpt, out / f"fp32-{t}", target=t, overwrite=True, validate=False)
            for t in ("ort", "tensorrt")
        }
        made = {"fp32": fp32["ort"]}
        for p in PRECISIONS:
            src = fp32["tensorrt"] if p in ("int8-qdq", "fp16") else fp32["ort"]
            calib = CACHE / "calib.txt" if p == "int8-qdq" else None
            made[p], _ = quantize_bundle(src, p, out / p, calib_text=calib, force=True, overwrite=True)
        rows += speed_rows("124M random", made, args, report)
    report.table(
        f"batch 1, 32-token prompt, 128 new tokens (96 for the 128-context default model), greedy, "
        f"{args.threads} threads (ONNX Runtime CPU), {args.rounds} rounds",
        [
            Column("model", "model"),
            Column("precision", "precision"),
            Column("mib", "MiB", ".1f"),
            Column("rate", "decode tok/s (median)", ".1f"),
            Column("vs_fp32", "/ fp32 (per-round ratio)", ".2f"),
            Column("ppl", "perplexity", ".3f"),
            Column("dppl", "Δ ppl"),
            Column("kl", "mean KL", ".4f"),
            Column("top1", "top-1"),
            Column("greedy", "greedy 64"),
        ],
        rows,
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
