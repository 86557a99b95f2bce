"""int4 bundles' prompt graph (quantize/int4.py): prompt chunks run the int8 graph, generated tokens
the int4 one, over one KV cache; the gate measures that mix; step invariance turns it off."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from gpt2_edge.errors import Gpt2EdgeError
from gpt2_edge.export.writer import write_manifest
from gpt2_edge.quantize.accuracy import served_perplexity
from gpt2_edge.runtime.bundle import MANIFEST, Bundle
from gpt2_edge.runtime.session import OrtBackend

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def int4(make_bundle):
    return make_bundle(kv_cache="inplace", precision="int4")


@pytest.fixture(scope="module")
def prompt_as_main(int4, tmp_path_factory):
    """The same bundle with its prompt graph as the main graph (and no prompt graph)."""
    d = tmp_path_factory.mktemp("prompt-as-main") / "b"
    shutil.copytree(int4, d)
    m = json.loads((d / MANIFEST).read_text())
    m["model_file"] = m.pop("prompt_model_file")
    (d / "model.onnx").unlink()
    write_manifest(d, {k: v for k, v in m.items() if k not in ("files", "schema_version")})
    return d


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 299, n).tolist()


def test_int4_bundle_carries_a_prompt_graph_of_int8_matmuls(int4):
    import onnx

    b = Bundle.load(int4)
    assert b.prompt_model_file == int4 / "prompt.onnx"
    ops = [n.op_type for n in onnx.load(str(b.prompt_model_file)).graph.node]
    # the blocks' MatMuls in per-row int8; the LM head (the only MatMulNBits left) stays int4
    assert ops.count("MatMulIntegerToFloat") == 4 * b.dims.n_layer and ops.count("MatMulNBits") == 1
    assert "GatherBlockQuantized" in ops  # the int4 graph's embedding tables
    assert OrtBackend(b, threads=2).capabilities.prompt_graph


def test_prompts_run_the_prompt_graph_and_generated_tokens_the_int4_graph(int4, prompt_as_main):
    """prefill == the prompt graph alone, bitwise; the decode steps after it == the int4 graph over
    the KV cache the prompt graph wrote."""
    mixed = OrtBackend(Bundle.load(int4), threads=2)
    int8 = OrtBackend(Bundle.load(prompt_as_main), threads=2)
    plain = OrtBackend(Bundle.load(int4), threads=2, prompt_graph=False)
    assert not plain.capabilities.prompt_graph
    p, tokens = prompt(13), [5, 77, 123, 9]
    cache = mixed.new_cache(1, 32)
    got = [cache.prefill([0], [p])[0]] + [cache.decode([0], [t])[0] for t in tokens]
    ref_cache = int8.new_cache(1, 32)
    want = [ref_cache.prefill([0], [p])[0]]
    np.testing.assert_array_equal(got[0], want[0])
    dec = plain.new_cache(1, 32)
    for a, b in zip(dec.buffers, ref_cache.buffers, strict=True):
        a[...] = b
    dec._len[0] = len(p)
    want += [dec.decode([0], [t])[0] for t in tokens]
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(a, b)
    # the int8 prompt pass is not the int4 one (else the test above proves nothing)
    assert not np.array_equal(got[0], plain.new_cache(1, 32).prefill([0], [p])[0])


def test_a_prompt_in_chunks_is_the_same_as_whole(int4):
    """The server feeds long prompts in chunks (extend): every chunk runs the prompt graph, and a
    chunk of one token too, so the first token's logits do not depend on the chunking."""
    backend = OrtBackend(Bundle.load(int4), threads=2)
    p = prompt(17, seed=1)
    whole = backend.new_cache(1, 32).prefill([0], [p])[0]
    for cuts in ((5, 16), (8,), (16,)):
        cache = backend.new_cache(1, 32)
        edges = (0, *cuts, len(p))
        out = cache.prefill([0], [p[: edges[1]]])
        for lo, hi in itertools.pairwise(edges[1:]):
            out = cache.extend([0], [p[lo:hi]])
        np.testing.assert_array_equal(out[0], whole)


def test_step_invariance_runs_one_graph(int4):
    b = Bundle.load(int4)
    assert not OrtBackend(b, threads=2, step_invariant=True).capabilities.prompt_graph
    with pytest.raises(Gpt2EdgeError, match="step invariance needs every pass through one graph"):
        OrtBackend(b, threads=2, step_invariant=True, prompt_graph=True)


def test_asking_for_a_prompt_graph_a_bundle_lacks_says_what_to_do(make_bundle):
    b = Bundle.load(make_bundle(kv_cache="inplace", precision="int8-dynamic"))
    with pytest.raises(Gpt2EdgeError, match="has no prompt graph .* quantize it again"):
        OrtBackend(b, threads=2, prompt_graph=True)


def test_served_perplexity_scores_decode_steps_after_a_prompt(int4):
    """On the plain int4 graph the served perplexity is the full-sequence one up to the decode
    step's other summation order; with the prompt graph it differs (the context ran int8)."""
    from gpt2_edge.model.evaluate import sliding_windows
    from gpt2_edge.runtime.sampling import log_softmax

    ids = np.asarray(prompt(60, seed=2), np.int64)
    wins = sliding_windows(len(ids), 32, 16)
    plain = OrtBackend(Bundle.load(int4), threads=2, prompt_graph=False)
    nll, n = 0.0, 0
    for begin, end, n_target in wins:
        w = ids[begin:end]
        lq = log_softmax(np.asarray(plain.logits(w[None])[0], np.float64))[-n_target - 1 : -1]
        nll -= float(lq[np.arange(n_target), w[-n_target:]].sum())
        n += n_target
    full = float(np.exp(nll / n))
    assert served_perplexity(plain, ids, wins) == pytest.approx(full, rel=1e-3)
    mixed = OrtBackend(Bundle.load(int4), threads=2)
    served = served_perplexity(mixed, ids, wins)
    assert np.isfinite(served) and served != served_perplexity(plain, ids, wins)


def test_the_prefix_cache_reuses_only_what_a_prompt_would_have_written(int4):
    """A follow-up prompt that goes on past an earlier prompt and its generated tokens reuses the
    earlier prompt's positions only (the generated ones were written by the int4 graph), and gets
    the tokens of a run without the prefix cache."""
    from gpt2_edge.runtime.generator import Generator
    from gpt2_edge.runtime.sampling import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    cached = Generator.from_bundle(str(int4), threads=2, prefix_cache=256)
    plain = Generator.from_bundle(str(int4), threads=2)
    p = prompt(36, seed=3)  # the tiny model's context is 64 tokens; the store reuses 32+
    first = cached.generate([p], cfg)[0]
    follow = p + first.token_ids + prompt(5, seed=4)
    again = cached.generate([follow], cfg)[0]
    assert 32 <= again.timings["prefix_reused_tokens"] <= len(p)
    assert again.token_ids == plain.generate([follow], cfg)[0].token_ids
