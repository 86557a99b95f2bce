"""OpenVINO GenAI as a peer of ``benchmarks/bench_peers.py``: the checkpoint exported with
optimum-intel, run through ``openvino_genai.LLMPipeline`` as a user runs it.

It runs in its own Python (``OPENVINO_GENAI_PYTHON``): optimum-intel needs newer transformers and
torch than the kit pins. That Python needs ``openvino-genai`` and ``optimum-intel[openvino]``
(requirements-peers.txt); it imports this module through ``python -m benchmarks.bench_peers
--worker``, whose top-level imports are numpy and the standard library only.

Export (cached under the bench cache, ``openvino/<precision>``), from the same random checkpoint
as every engine (``benchmarks.common.random_checkpoint``, a Hugging Face directory):
  fp32  ``--weight-format fp32``
  int8  ``--weight-format int8 --sym``: int8 symmetric per output channel, every MatMul and the
        embeddings (the kit's int8: per-channel symmetric weights, int8 embeddings)
  int4  ``--weight-format int4 --sym --group-size 32 --ratio 1.0 --all-layers``: int4 symmetric in
        groups of 32 along K, every layer including the embeddings and the LM head (the kit's int4:
        MatMulNBits symmetric, blocks of 32, MatMuls and the embedding Gather at 4 bits). Without
        ``--all-layers`` optimum-intel keeps the embeddings and head at int8 and without ``--sym``
        it is asymmetric with groups of 128 (its defaults), which would not be the same class.

Run: ``LLMPipeline(dir, "CPU", scheduler_config=..., INFERENCE_NUM_THREADS=threads, ...)`` with
the scheduler settings of OpenVINO GenAI's own ``benchmark_genai`` sample: its paged
continuous-batching pipeline, prefix caching off, ``max_num_batched_tokens`` unbounded (a prompt is
prefilled in one pass, not in chunks of 256, the SchedulerConfig default). Token ids go in as
``TokenizedInputs`` (no tokenizer in the timing, the same ids as every engine); greedy,
``ignore_eos`` with ``min_new_tokens = max_new_tokens``; batch 8 is one ``generate`` call with 8
prompts. Modes:
  fair     ``INFERENCE_PRECISION_HINT=f32`` and f32 KV cache (``KV_CACHE_PRECISION``,
           ``KEY_CACHE_PRECISION``, ``VALUE_CACHE_PRECISION``): the kit computes and caches in f32
  default  OpenVINO's CPU defaults: on a CPU with AVX512-BF16 or AMX it computes in bf16 and keeps
           the KV cache in u8
Both keep OpenVINO's dynamic quantization of activations for int8/int4 weights (groups of 32 by
default), as the kit's int8/int4 quantize activations per row.

Timing: time to first token and the generate duration from its own perf metrics
(``get_ttft``, ``get_generate_duration``); decode = generate - TTFT. The wall clock around the call
comes back too, so the worker can check the metrics against it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, random_checkpoint

EXPORT_ARGS = {
    "fp32": ["--weight-format", "fp32"],
    "int8": ["--weight-format", "int8", "--sym"],
    "int4": ["--weight-format", "int4", "--sym", "--group-size", "32", "--ratio", "1.0", "--all-layers"],
}
F32 = "f32"
MODES: dict[str, dict[str, str]] = {
    "fair": {
        "INFERENCE_PRECISION_HINT": F32,
        "KV_CACHE_PRECISION": F32,
        "KEY_CACHE_PRECISION": F32,
        "VALUE_CACHE_PRECISION": F32,
    },
    "default": {},
}


def settings(mode: str, precision: str, threads: int) -> str:
    """What an engine ``openvino MODE PRECISION`` runs with, for the table's settings note."""
    export = " ".join(EXPORT_ARGS[precision])
    run = (
        "f32 compute and f32 KV cache (INFERENCE_PRECISION_HINT, KV/KEY/VALUE_CACHE_PRECISION=f32)"
        if mode == "fair"
        else "its CPU defaults (bf16 compute and u8 KV cache where the CPU has bf16)"
    )
    return (
        f"optimum-cli export openvino {export}; LLMPipeline, paged continuous batching, prefix caching "
        f"off, max_num_batched_tokens unbounded (as benchmark_genai); {run}; INFERENCE_NUM_THREADS {threads}"
    )


def model_dir(precision: str) -> Path:
    """The checkpoint exported by optimum-intel at ``precision`` (cached; built on first use)."""
    out = CACHE / "openvino" / precision
    if (out / "openvino_model.xml").is_file():
        return out
    ckpt = random_checkpoint("gpt2")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model", str(ckpt)]
    cmd += ["--task", "text-generation-with-past", *EXPORT_ARGS[precision], str(tmp)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not (tmp / "openvino_model.xml").is_file():
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"optimum-cli export openvino {precision} failed: {tail}")
    os.replace(tmp, out)
    return out


def openvino(engine: str, threads: int):
    """A runner for ``openvino fair|default fp32|int8|int4``: ``run(prompts, new)`` returns
    (time to first token s, decode s for the other new-1 tokens, wall-clock s of the whole call)."""
    import openvino as ov
    import openvino_genai as ov_genai

    _, mode, precision = engine.split()
    sched = ov_genai.SchedulerConfig()
    sched.enable_prefix_caching = False
    sched.max_num_batched_tokens = sys.maxsize
    pipe = ov_genai.LLMPipeline(
        str(model_dir(precision)), "CPU", scheduler_config=sched, INFERENCE_NUM_THREADS=threads, **MODES[mode]
    )

    def run(prompts: list[list[int]], new: int) -> tuple[float, float, float]:
        ids = np.array(prompts, np.int64)
        config = ov_genai.GenerationConfig(
            max_new_tokens=new, min_new_tokens=new, ignore_eos=True, do_sample=False
        )
        inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        t0 = time.perf_counter()
        out = pipe.generate(inputs, config)
        wall = time.perf_counter() - t0
        got = [len(t) for t in out.tokens]
        if got != [new] * len(prompts):
            raise RuntimeError(f"openvino generated {got} tokens per prompt, expected {new}")
        m = out.perf_metrics
        first = m.get_ttft().mean / 1000
        return first, m.get_generate_duration().mean / 1000 - first, wall

    return run


def versions() -> dict[str, str]:
    """The OpenVINO packages this worker ran with."""
    import importlib.metadata as md

    out = {}
    for dist in ("openvino", "openvino-genai", "optimum-intel"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out
