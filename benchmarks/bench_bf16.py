"""The half-width class against the kit's fp32: a bf16 bundle on the ``openvino`` provider vs the
fp32 bundle on ONNX Runtime (the kit's default, in-place cache), same checkpoint (124M shape,
random weights), each measured by ``gpt2-edge bench``'s worker in its own process, in strict turns
(benchmarks/harness.py): decode at batch 1 after 32 tokens and after 896, batch 8 after 32, time
to first token after 896 tokens, peak RSS.

    python -m benchmarks.bench_bf16 [--rounds 3] [--threads 2] [--json PATH]

The bf16 bundle is ``variant_of(tensorrt-target bundle, "bf16")`` (benchmarks/common.py; bench_peers
can take it the same way). Needs OpenVINO (``pip install 'gpt2-edge[openvino]'``) and a CPU with
bf16 arithmetic (AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse

from benchmarks.common import bench_worker, bundle_of, random_checkpoint, variant_of
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import summary

FIGURES = (
    ("decode_b1", "b1 after 32 (tok/s)", True),
    ("decode_long", "b1 after 896 (tok/s)", True),
    ("decode_batch", "b8 after 32 (tok/s)", True),
    ("ttft_long_ms", "TTFT 896 (ms)", False),
    ("peak_rss_mib", "peak RSS (MiB)", False),
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    add_json_argument(p)
    args = p.parse_args(argv)

    ck = random_checkpoint("gpt2")
    fp32 = bundle_of(ck)  # the ort target, in-place cache: the kit's fp32 default
    bf16 = variant_of(bundle_of(ck, target="tensorrt"), "bf16")
    base = {"threads": args.threads, "long_prompt": 896, "long_context": 896, "batch": 8}
    base["new_tokens"] = args.new_tokens
    subjects = {
        "fp32 (ONNX Runtime)": lambda r: bench_worker(fp32, base | {"provider": "cpu"}),
        "bf16 (OpenVINO)": lambda r: bench_worker(bf16, base | {"provider": "openvino"}),
    }
    report = Report("bench_bf16", "The bf16 class (OpenVINO) vs the kit's fp32 (ONNX Runtime)", argv)
    report.params = {"rounds": args.rounds, **base, "fp32": str(fp32), "bf16": str(bf16)}
    rounds = interleave(subjects, args.rounds, warmup=0, log=print)
    rows = []
    for key, label, higher in FIGURES:
        a = summary(rounds.values("fp32 (ONNX Runtime)", key))
        b = summary(rounds.values("bf16 (OpenVINO)", key))
        ratio = rounds.ratio("bf16 (OpenVINO)", "fp32 (ONNX Runtime)", key)
        rows.append(
            [label, a[0], b[0], ratio["combined"], ratio["lo"], ratio["hi"], "higher" if higher else "lower"]
        )
    report.table(
        "bf16 vs fp32, same checkpoint (124M shape, random weights)",
        [
            Column("figure", "figure"),
            Column("fp32", "fp32 ORT (median)", ".1f"),
            Column("bf16", "bf16 OpenVINO (median)", ".1f"),
            Column("ratio", "bf16 / fp32 (rounds, both orders)", ".2f"),
            Column("lo", "min", ".2f"),
            Column("hi", "max", ".2f"),
            Column("better", "better is"),
        ],
        rows,
    )
    report.raw = {"rounds": rounds.results, "orders": rounds.orders}
    report.emit(args.json)


if __name__ == "__main__":
    main()
