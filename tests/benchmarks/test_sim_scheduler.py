"""benchmarks/sim_scheduler.py: the real scheduler under simulated closed-loop clients reproduces
what the step budget is for (issue 23): a burst that goes in within one step keeps 16 clients'
streams together, and their inter-token latency is their decode steps alone."""

from __future__ import annotations

import argparse

from benchmarks.sim_scheduler import simulate


def args(**kw) -> argparse.Namespace:
    base = dict(
        requests=64, prompt_tokens=128, output_tokens=64, max_batch=16, client_delay=(3.0, 15.0),
        pass_ms=12.0, prefill_ms=1.05, decode_ms=1.7,
    )  # fmt: skip
    return argparse.Namespace(**(base | kw))


def test_one_client_sees_the_cost_model_and_nothing_else():
    r = simulate(args(requests=4), 1, 256, 2048, seed=0)
    assert abs(r["ttft_p50_ms"] - (12.0 + 1.05 * 128)) < 1e-9 and r["ttft_p99_ms"] == r["ttft_p50_ms"]
    assert abs(r["itl_p50_ms"] - (12.0 + 1.7)) < 1e-9


def test_a_burst_within_one_step_keeps_sixteen_streams_in_step():
    one_chunk = simulate(args(), 16, 256, 256, seed=0)
    budget = simulate(args(), 16, 256, 2048, seed=0)
    decode_step = 12.0 + 1.7 * 16
    # every burst after the first goes in while nobody decodes: the median stream sees decode steps only
    assert abs(budget["itl_p50_ms"] - decode_step) < 0.5
    # one chunk a step: the streams drift apart and every prompt goes in while others decode
    assert one_chunk["itl_p50_ms"] > 1.4 * budget["itl_p50_ms"]
    assert budget["output_tok_s"] >= one_chunk["output_tok_s"]
