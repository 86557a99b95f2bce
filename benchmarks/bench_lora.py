"""LoRA adapters at run time: decode speed against the bundle with the adapter merged, and the memory
one more served adapter costs.

1. Speed: batch-1 decode tokens/s after a ``P``-token prompt, the adapter served at run time (a
   bundle exported with ``--lora-slots``, the row running adapter 1) over the same adapter merged
   at export (an ordinary bundle), in strict turns (benchmarks/harness.py); median of per-round
   ratios and their range, both orders combined. Also the slot bundle's rows without an adapter
   (what the low-rank branches cost when they add zeros).
2. Memory: what one more adapter adds, (a) the stacked adapter inputs the session holds (bytes, exact:
   rank-``R`` slots of every c_attn / c_proj / c_fc of every layer) and (b) the resident set of a
   fresh process that loads the slot bundle with ``k`` adapters, for k = 0..``--adapters``
   (``VmRSS`` after load and one decode; each k its own process).

Random GPT-2 124M-shaped weights (``benchmarks/common.py``) and random adapters in PEFT's layout
(rank ``--rank``, every target). ``--small``: the shipped model and a few rounds, to check the
benchmark runs (its figures mean nothing).

    python -m benchmarks.bench_lora [--rank 8] [--prompt 32] [--steps 48] [--rounds 7]
        [--adapters 3] [--threads 2] [--small] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, random_checkpoint
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import summary

HERE = CACHE / "lora"


def write_adapter(out: Path, n_layer: int, n_embd: int, rank: int, seed: int) -> Path:
    """A random LoRA adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.numpy import save_file

    from gpt2_edge.contract import LORA_TARGETS

    if (out / "adapter_model.safetensors").is_file():
        return out
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(n_layer):
        for t, (k_in, k_out) in LORA_TARGETS.items():
            key = f"base_model.model.transformer.h.{i}.{t}"
            tensors[f"{key}.lora_A.weight"] = (0.02 * rng.standard_normal((rank, k_in * n_embd))).astype(
                np.float32
            )
            tensors[f"{key}.lora_B.weight"] = (0.02 * rng.standard_normal((k_out * n_embd, rank))).astype(
                np.float32
            )
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "fan_in_fan_out": True,
              "target_modules": ["c_attn", "c_proj", "c_fc"], "bias": "none"}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def bundles(source: Path, name: str, rank: int, slots: int) -> tuple[Path, Path, Path]:
    """(adapter, merged bundle, slot bundle) of ``source``, cached under ``HERE``."""
    from gpt2_edge.model.config import GPTConfig

    c = GPTConfig.load(source)
    adapter = write_adapter(HERE / f"{name}-adapter-r{rank}-0", c.n_layer, c.n_embd, rank, 0)
    merged, slotted = HERE / f"{name}-merged-r{rank}", HERE / f"{name}-slots{slots}-r{rank}"
    if not (merged / "bundle.json").is_file() or not (slotted / "bundle.json").is_file():
        from gpt2_edge.export.bundle import export_bundle

        export_bundle(source, merged, lora=adapter, overwrite=True)
        export_bundle(source, slotted, lora_slots=slots, lora_rank=rank, overwrite=True)
    return adapter, merged, slotted


def decode_rate(backend, adapter_id: int, r: int, *, prompt: int, steps: int, vocab: int) -> float:
    """Batch-1 decode tokens/s after a ``prompt``-token prefill (round ``r``'s own random tokens)."""
    rng = np.random.default_rng(r + 1)
    cache = backend.new_cache(1, prompt + steps + 1)
    if adapter_id:
        cache.set_adapter(0, adapter_id)
    cache.prefill([0], [rng.integers(0, vocab, prompt).tolist()])
    t = time.perf_counter()
    for _ in range(steps):
        cache.decode([0], [int(rng.integers(0, vocab))])
    return steps / (time.perf_counter() - t)


def speed(merged: Path, slotted: Path, adapter: Path, a: argparse.Namespace) -> dict:
    from gpt2_edge.runtime.loader import load_model

    m = load_model(merged, threads=a.threads)
    s = load_model(slotted, threads=a.threads, lora={"a": adapter})
    vocab = m.manifest.model.vocab_size
    rate = functools.partial(decode_rate, prompt=a.prompt, steps=a.steps, vocab=vocab)
    runs = interleave(
        {
            "merged": functools.partial(rate, m.backend, 0),
            "runtime": functools.partial(rate, s.backend, 1),
            "slots, no adapter": functools.partial(rate, s.backend, 0),
        },
        a.rounds,
    )
    row = {"prompt": a.prompt, "steps": a.steps}
    for name in ("merged", "runtime", "slots, no adapter"):
        row[name] = summary(runs.values(name))[0]
    for name in ("runtime", "slots, no adapter"):
        ratio = runs.ratio(name, "merged")
        row[f"{name} / merged"] = (ratio["median"], ratio["lo"], ratio["hi"])
        row[f"{name} / merged, combined"] = ratio["combined"]
    row["rates"] = {k: runs.values(k) for k in ("merged", "runtime", "slots, no adapter")}
    return row


RSS_WORKER = """
import json, sys
import numpy as np
from gpt2_edge.runtime.loader import load_model
path, adapters, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
m = load_model(path, threads=threads, lora=adapters or None)
c = m.backend.new_cache(1, 40)
if adapters:
    c.set_adapter(0, 1)
c.prefill([0], [list(range(32))])
c.decode([0], [5])
held = sum(v.numpy().nbytes for v in m.backend.lora_feeds.values())
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
print(json.dumps({"rss_mib": rss, "adapter_inputs_mib": held / 2**20}))
"""


def memory(slotted: Path, source: Path, name: str, a: argparse.Namespace) -> list[dict]:
    """RSS and the stacked adapter inputs with k = 0..a.adapters adapters, each in a fresh process."""
    from gpt2_edge.model.config import GPTConfig

    c = GPTConfig.load(source)
    paths = [
        str(write_adapter(HERE / f"{name}-adapter-r{a.rank}-{k}", c.n_layer, c.n_embd, a.rank, k))
        for k in range(a.adapters)
    ]
    rows = []
    for k in range(a.adapters + 1):
        adapters = {f"a{i}": p for i, p in enumerate(paths[:k])}
        out = subprocess.run(
            [sys.executable, "-c", RSS_WORKER, str(slotted), json.dumps(adapters), str(a.threads)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        got = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"adapters": k, **got})
        if k:
            rows[-1]["rss_delta_mib"] = got["rss_mib"] - rows[-2]["rss_mib"]
            rows[-1]["inputs_delta_mib"] = got["adapter_inputs_mib"] - rows[-2]["adapter_inputs_mib"]
        print(
            f"memory: {k} adapters: RSS {got['rss_mib']:.1f} MiB, inputs {got['adapter_inputs_mib']:.2f} MiB"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--adapters", type=int, default=3, help="memory: up to this many adapters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="the shipped model, a few rounds: a smoke run")
    add_json_argument(ap)
    a = ap.parse_args(argv)
    if a.small:
        from gpt2_edge import DEFAULT_MODEL_DIR

        source, name = DEFAULT_MODEL_DIR, "default-model"
        a.rounds, a.steps, a.adapters = min(a.rounds, 2), min(a.steps, 8), min(a.adapters, 2)
    else:
        source = random_checkpoint("gpt2")
        name = source.name
    report = Report("bench_lora", "LoRA adapters at run time vs merged at export", argv, vars(a))
    adapter, merged, slotted = bundles(source, name, a.rank, a.slots)
    row = speed(merged, slotted, adapter, a)
    print(
        f"speed: merged {row['merged']:.1f}, runtime {row['runtime']:.1f}, no adapter "
        f"{row['slots, no adapter']:.1f} tok/s; runtime/merged {row['runtime / merged'][0]:.3f}",
        flush=True,
    )
    mem = memory(slotted, source, name, a)
    report.raw.update(speed=row, memory=mem)
    report.table(
        f"batch-1 decode tok/s after {a.prompt} prompt tokens, {a.steps} steps per turn, {a.rounds} rounds, "
        f"rank-{a.rank} adapter on every projection, {a.threads} threads ({name})",
        [
            Column("merged", "merged tok/s", ".1f"),
            Column("runtime", "run-time adapter tok/s", ".1f"),
            Column("runtime / merged", "run-time / merged, median (range)", ".3f"),
            Column("runtime / merged, combined", "both orders combined", ".3f"),
            Column("slots, no adapter / merged", "slot bundle, no adapter / merged", ".3f"),
        ],
        [row],
    )
    report.table(
        f"memory per served adapter (rank {a.rank}, {a.slots} slots; each row a fresh process)",
        [
            Column("adapters", "adapters", "d"),
            Column("adapter_inputs_mib", "stacked adapter inputs MiB", ".2f"),
            Column("inputs_delta_mib", "+ inputs MiB", ".2f"),
            Column("rss_mib", "RSS MiB", ".1f"),
            Column("rss_delta_mib", "+ RSS MiB", ".1f"),
        ],
        mem,
    )
    report.emit(a.json)


if __name__ == "__main__":
    main()
