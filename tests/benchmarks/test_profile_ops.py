"""benchmarks/profile_ops.py: time by operator type of a prefill, for a bundle's graph or its
prompt graph (a tiny int4 bundle: a few milliseconds)."""

from __future__ import annotations

import re

import pytest

from benchmarks.profile_ops import main

pytestmark = pytest.mark.filterwarnings("ignore")


def shares(out: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^  (\w+)\s+[\d.]+ ms\s+([\d.]+)%$", out, re.M)}


@pytest.mark.parametrize("graph,matmul", [("model", "MatMulNBits"), ("prompt", "MatMulIntegerToFloat")])
def test_profile_ops_prints_each_operator_types_share(make_bundle, capsys, graph, matmul):
    bundle = make_bundle(kv_cache="inplace", precision="int4")
    main([str(bundle), "24", "--graph", graph, "--rounds", "2", "--top", "50"])
    out = capsys.readouterr().out
    assert out.startswith(f"{bundle.name} ({graph}.onnx, int4): prefill of 24 tokens, 2 threads, median ")
    got = shares(out)
    assert matmul in got and "GroupQueryAttention" in got
    # every operator type listed (each share rounded to 0.1%)
    assert sum(got.values()) == pytest.approx(100, abs=0.05 * len(got) + 0.01)
    assert not list(bundle.glob("*profile*"))  # the profiler's trace is removed


def test_profile_ops_refuses_what_it_cannot_run(make_bundle, capsys):
    fp32 = make_bundle(kv_cache="inplace")
    with pytest.raises(SystemExit):
        main([str(fp32), "8", "--graph", "prompt"])
    assert "has no prompt graph" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(fp32), "100000"])
    assert "the prompt length must be 1.." in capsys.readouterr().err
