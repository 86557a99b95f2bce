"""Where a prefill's time goes, by operator type (ONNX Runtime's profiler, CPU provider).

Runs a bundle's graph (``model.onnx``, or ``--graph prompt``: an int4 bundle's prompt graph) over
one random prompt of ``T`` tokens from an empty cache, ``--rounds`` times after one untimed run,
and prints each operator type's share of the kernel time (the table behind quantize/int4.py's
prompt graph: ``MatMulNBits`` was 69% of an int4 prefill of 896 tokens at 124M).

    python -m benchmarks.profile_ops BUNDLE [T] [--graph model|prompt] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from gpt2_edge.runtime.bundle import Bundle


def feeds(bundle: Bundle, tokens: int) -> dict[str, np.ndarray]:
    """One prompt of ``tokens`` random ids from an empty cache, the last position's logits only."""
    d = bundle.dims
    ids = np.random.default_rng(0).integers(0, d.vocab_size - 1, (1, tokens), dtype=np.int64)
    # in place, the past is a buffer with room for the prompt; concatenating, it is empty
    past = tokens if bundle.kv_form == "inplace" else 0
    out: dict[str, np.ndarray] = {
        "input_ids": ids,
        "attention_mask": np.ones((1, tokens), np.int64),
        "position_ids": np.arange(tokens, dtype=np.int64)[None],
    }
    for spec in bundle.inputs:
        if spec.name.startswith("past_key_values."):
            out[spec.name] = np.zeros((1, d.n_head, past, d.head_size), np.dtype(spec.dtype))
        elif spec.name == "logits_to_keep":
            out[spec.name] = np.array(1, np.int64)
        elif spec.name == "step_invariant":
            out[spec.name] = np.array(0, np.int64)
        elif spec.name not in out:
            raise SystemExit(
                f"{bundle.path}: input {spec.name} is not one a plain prefill feeds (LoRA slots?)"
            )
    return out


def profile(
    graph: Path, inputs: dict[str, np.ndarray], threads: int, rounds: int
) -> tuple[list[float], Counter]:
    """Wall seconds per timed run, and kernel microseconds per operator type over the timed runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = str(graph.with_suffix("")) + "-profile"
    session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    session.run(["logits"], inputs)  # untimed and left out of the profile: first-run allocations
    walls = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        session.run(["logits"], inputs)
        walls.append(time.perf_counter() - t0)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op: Counter = Counter()
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[1]["ts"] if len(runs) > 1 else 0  # after the untimed run
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"]
    return walls, per_op


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("tokens", type=int, nargs="?", default=896, help="prompt length (default 896)")
    ap.add_argument("--graph", choices=("model", "prompt"), default="model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=10, help="operator types to list")
    args = ap.parse_args(argv)
    bundle = Bundle.load(args.bundle, verify=False)
    if not 0 < args.tokens <= bundle.context_length:
        ap.error(f"the prompt length must be 1..{bundle.context_length} (the context), got {args.tokens}")
    graph = bundle.model_file if args.graph == "model" else bundle.prompt_model_file
    if graph is None:
        ap.error(f"{args.bundle} has no prompt graph (int4 bundles quantized since it exists have one)")
    walls, per_op = profile(graph, feeds(bundle, args.tokens), args.threads, args.rounds)
    total = sum(per_op.values())
    print(
        f"{bundle.path.name} ({graph.name}, {bundle.precision}): prefill of {args.tokens} tokens, "
        f"{args.threads} threads, median {1e3 * float(np.median(walls)):.0f} ms over {args.rounds} runs"
    )
    for op, us in per_op.most_common(args.top):
        print(f"  {op:28s} {us / args.rounds / 1e3:8.1f} ms  {100 * us / total:5.1f}%")


if __name__ == "__main__":
    main()
