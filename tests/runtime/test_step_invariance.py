"""Step invariance (``OrtBackend(step_invariant=True)``, export.fusions.add_step_invariance).

ONNX Runtime's CPU attention multiplies probabilities by V with MLAS's one-row kernel for a row
with one query and with its GEMM for two or more; the sums run in another order, so without help
a position's logits differ in the last bits between a decode step, a verified speculative chunk,
a prefill, and a one-token row padded beside another row's chunk. With the graph's
``step_invariant`` input at 1 every active row gets one more (dummy) query row, so all of these
take the GEMM and agree bitwise, for every precision: greedy speculative decoding is then plain
decoding, token for token, and a served row does not depend on whether a neighbour verifies.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from gpt2_edge.errors import Gpt2EdgeError
from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.runtime.session import OrtBackend
from gpt2_edge.runtime.speculative import DraftModel
from tests.bundles import ModelSpec, spec

pytestmark = pytest.mark.filterwarnings("ignore")
PRECISIONS = ("fp32", "int8-dynamic", "int8-weight", "int8-qdq", "int4")


@pytest.fixture(scope="module")
def backends(make_bundle):
    made: dict[tuple[str, bool], OrtBackend] = {}

    def get(precision: str, invariant: bool = True) -> OrtBackend:
        if (precision, invariant) not in made:
            calib = "sample-x2" if precision == "int8-qdq" else None
            path = make_bundle(precision=precision, calib=calib)
            made[precision, invariant] = OrtBackend(Bundle.load(path), threads=2, step_invariant=invariant)
        return made[precision, invariant]

    return get


def ids(n: int, seed: int, vocab: int = 300) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab - 1, n).tolist()


def three_ways(backend: OrtBackend, prompt: list[int], toks: list[int]) -> tuple[np.ndarray, ...]:
    """Logits at the positions of ``toks``: decoded one by one, verified as one chunk, prefilled."""
    cap = len(prompt) + len(toks)
    c = backend.new_cache(1, cap)
    c.prefill([0], [prompt])
    plain = np.stack([c.decode([0], [t])[0].copy() for t in toks])
    c = backend.new_cache(1, cap)
    c.prefill([0], [prompt])
    verified = c.verify([0], [toks])[0]
    c = backend.new_cache(1, cap)
    prefilled = c.full_logits(np.array([prompt + toks]))[0, len(prompt) - 1 : -1]
    return plain, verified, prefilled


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_position_is_the_same_decoded_verified_or_prefilled(backends, precision):
    backend = backends(precision)
    for n, seed in ((1, 0), (9, 1), (30, 2)):
        prompt, toks = ids(n, seed), ids(7, seed + 10)
        plain, verified, prefilled = three_ways(backend, prompt, toks)
        assert np.isfinite(plain).all()
        np.testing.assert_array_equal(verified, plain)
        # a prefill's row i is the logits after token i: the position of toks[i + 1]
        np.testing.assert_array_equal(prefilled[1:], plain[:-1])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_one_token_row_beside_chunks_is_the_same_as_alone(backends, precision):
    backend = backends(precision)
    prompts = [ids(9, 3), ids(6, 4), ids(12, 5), ids(4, 6)]
    batch = backend.new_cache(4, 40)
    batch.prefill([0, 1, 2, 3], prompts)
    alone = []
    for p in prompts:
        c = backend.new_cache(1, 40)
        c.prefill([0], [p])
        alone.append(c)
    # slot 0 one token, slot 1 a chunk of 5, slot 2 idle, slot 3 a chunk of 2: one padded pass
    chunks = {0: [17], 1: ids(5, 7), 3: ids(2, 8)}
    out = batch.verify(list(chunks), list(chunks.values()))
    for i, (slot, chunk) in enumerate(chunks.items()):
        want = np.stack([alone[slot].decode([0], [t])[0].copy() for t in chunk])
        np.testing.assert_array_equal(out[i, : len(chunk)], want)
    # the idle slot was left as it was
    np.testing.assert_array_equal(batch.decode([2], [42])[0], alone[2].decode([0], [42])[0])


def test_a_slot_fills_to_its_capacity(backends):
    backend = backends("fp32")
    c = backend.new_cache(2, 16)
    c.prefill([0, 1], [ids(10, 9), ids(15, 10)])
    for t in range(6):
        slots = [0, 1] if c.length(1) < 16 else [0]
        logits = c.decode(slots, [t + 1] * len(slots))
        assert np.isfinite(logits).all()
    assert (c.length(0), c.length(1)) == (16, 16)
    c.truncate(0, 12)
    assert np.isfinite(c.verify([0], [ids(4, 11)])).all()


def test_off_is_the_graph_as_before(backends):
    """``step_invariant=0`` leaves the one-row kernel in place: the same logits up to its rounding."""
    on, off = backends("fp32"), backends("fp32", invariant=False)
    prompt, toks = ids(20, 12), ids(6, 13)
    for a, b in zip(three_ways(on, prompt, toks), three_ways(off, prompt, toks), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # the chunk paths (verify, prefill) are the same kernels either way: bitwise
    np.testing.assert_array_equal(three_ways(on, prompt, toks)[1], three_ways(off, prompt, toks)[1])
    plain, verified, _ = three_ways(off, prompt, toks)
    if np.array_equal(plain, verified):
        pytest.skip("this CPU's MLAS has no separate one-row kernel: nothing to make invariant")
    # what step invariance is for: off, a decode step and a verified chunk differ in the last bits
    assert 0 < np.abs(plain - verified).max() < 1e-5


@pytest.mark.parametrize("precision", ("fp32", "int8-dynamic", "int4"))
def test_greedy_speculation_is_plain_decoding(make_bundle, tiny_tokenizer, precision):
    gen = Generator.from_bundle(str(make_bundle(spec(precision=precision))), threads=1, step_invariant=True)
    assert gen.model.capabilities.step_invariant
    other = DraftModel.from_bundle(make_bundle(spec(model=ModelSpec(seed=5))), max_tokens=3)
    ps = [ids(n, n) + ids(3, n) for n in (5, 12, 3)]
    cfg = dict(max_new_tokens=30, ignore_eos=True)
    plain = [r.token_ids for r in gen.generate(ps, GenerationConfig(**cfg))]
    for draft, lookup in ((None, 4), (other, 0)):
        g = Generator(replace(gen.model, draft=draft))
        assert [r.token_ids for r in g.generate(ps, GenerationConfig(**cfg, prompt_lookup=lookup))] == plain


def test_a_bundle_without_the_input_or_off_the_cpu_is_refused(concat_bundle, make_bundle):
    with pytest.raises(Gpt2EdgeError, match="no `step_invariant` input") as e:
        OrtBackend(Bundle.load(concat_bundle), threads=1, step_invariant=True)
    assert "\n" not in str(e.value)
    with pytest.raises(Gpt2EdgeError, match="CPU provider") as e:
        Generator.from_bundle(str(make_bundle(spec())), provider="cuda", step_invariant=True)
    assert "\n" not in str(e.value)
