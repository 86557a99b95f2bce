"""Every precision is batch-invariant and causal on the CPU provider (DESIGN: "Guarantees").

Batch invariance: a row's logits are the same alone and beside rows of other lengths and
contents: in one ``Generator`` call, in full-sequence logits, and as a KV-cache slot joining a
running batch. Causality: a position's logits do not change when later prompt tokens change.

Measured (ONNX Runtime 1.32, CPU provider; tiny, default and 124M-shaped models):
- in-place KV cache (the ``ort`` target's default): bitwise, every precision it takes (fp32,
  int8-dynamic, int8-weight, int8-qdq, int4; fp16 is refused there, it is for CUDA / TensorRT).
- concatenating KV cache: causal and, for rows of one length, batch-invariant, bitwise. Rows of
  other lengths are left-padded: attention then sums over a longer row with zeros in it, a
  reordered float sum (fp32 logits within 1.1e-5 at |logits| <= 21; fp16 within one fp16 step). A
  variant that quantizes activations (int8-*, int4 at accuracy_level 4) can turn such an ulp into
  a quantization step (measured 0.03 on the default model), so for those only the unpadded
  properties are asserted here.
The int8-dynamic graph before per-row scales (``DynamicQuantizeLinear``: one activation scale
per tensor) failed every one of these, in both forms.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.loader import Model
from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.runtime.session import OrtBackend

pytestmark = pytest.mark.filterwarnings("ignore")  # fp16 on the CPU provider warns it is slow

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-weight", "int8-qdq", "int4")
CASES = [("inplace", p) for p in PRECISIONS if p != "fp16"] + [("concat", p) for p in PRECISIONS]


@pytest.fixture(scope="module")
def bundles(make_bundle):
    """Each (kv form, precision) bundle of the tiny model (tests/bundles.py), loaded on first use."""
    made: dict[tuple[str, str], OrtBackend] = {}

    def get(form: str, precision: str) -> OrtBackend:
        if (form, precision) not in made:
            calib = "sample-x2" if precision == "int8-qdq" else None
            path = make_bundle(kv_cache=form, precision=precision, calib=calib)
            made[form, precision] = OrtBackend(Bundle.load(path), threads=2)
        return made[form, precision]

    return get


QUANTIZED_ACTIVATIONS = ("int8-dynamic", "int8-weight", "int8-qdq", "int4")


def check(form: str, precision: str, alone: np.ndarray, beside: np.ndarray, padded: bool = False) -> None:
    """Bitwise; where the concatenating cache left-pads a row, the measured tolerance."""
    assert np.isfinite(beside).all()
    if form == "concat" and padded:
        rtol = 2**-10 if precision == "fp16" else 1e-6  # fp16 logits: one fp16 step
        np.testing.assert_allclose(beside, alone, rtol=rtol, atol=1e-5)
    else:
        np.testing.assert_array_equal(beside, alone)


def padded_cases() -> list:
    """Rows of other lengths: every in-place case; concatenating, the float-activation ones."""
    return [
        pytest.param(f, p, marks=pytest.mark.skip(reason="left padding: see the module docstring"))
        if f == "concat" and p in QUANTIZED_ACTIVATIONS
        else (f, p)
        for f, p in CASES
    ]


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, vocab - 1, n).tolist() for n in (7, 15, 3, 11, 1)]


class Recording:
    """A backend whose caches keep every slot's logits, step by step."""

    def __init__(self, backend: OrtBackend) -> None:
        self.backend = backend
        self.n_ctx, self.capabilities, self.bundle = backend.n_ctx, backend.capabilities, backend.bundle
        self.logits: dict[int, list[np.ndarray]] = defaultdict(list)

    def new_cache(self, n_slots: int, capacity: int):
        return _RecordingCache(self.backend.new_cache(n_slots, capacity), self.logits)


class _RecordingCache:
    def __init__(self, cache, log: dict[int, list[np.ndarray]]) -> None:
        self.cache, self.log = cache, log
        self.n_slots, self.capacity = cache.n_slots, cache.capacity

    def _keep(self, slots, out):
        for i, s in enumerate(slots):
            self.log[s].append(np.array(out[i]))
        return out

    def prefill(self, slots, prompts):
        return self._keep(slots, self.cache.prefill(slots, prompts))

    def decode(self, slots, tokens):
        return self._keep(slots, self.cache.decode(slots, tokens))

    def length(self, slot):
        return self.cache.length(slot)

    def release(self, slot):
        self.cache.release(slot)

    def reorder(self, sources):
        self.cache.reorder(sources)


def generate(backend: OrtBackend, batch: list[list[int]], tokenizer) -> tuple[list, dict]:
    rec = Recording(backend)
    # eos never ends a row early: every row runs the same steps alone and batched
    gen = Generator(Model(rec, tokenizer, None))
    return gen.generate(batch, GenerationConfig(max_new_tokens=6)), rec.logits


@pytest.mark.parametrize("form,precision", padded_cases())
def test_a_row_is_the_same_alone_and_in_a_generate_batch(bundles, tiny_tokenizer, form, precision):
    backend = bundles(form, precision)
    ps = prompts(tiny_tokenizer.vocab_size)
    batched, logits = generate(backend, ps, tiny_tokenizer)
    for row in (0, 2):  # a middle-length row and the shortest of the batch
        alone, alone_logits = generate(backend, [ps[row]], tiny_tokenizer)
        assert batched[row].token_ids == alone[0].token_ids
        assert len(logits[row]) == len(alone_logits[0]) == 6
        for a, b in zip(alone_logits[0], logits[row], strict=True):
            check(form, precision, a, b, padded=True)


@pytest.mark.parametrize("form,precision", padded_cases())
def test_a_slot_joining_a_running_batch_is_the_same_as_alone(bundles, tiny_tokenizer, form, precision):
    backend = bundles(form, precision)
    ps = prompts(tiny_tokenizer.vocab_size)
    me, others = ps[0], ps[1:4]
    tokens = [5, 17, 3, 99, 42, 8]

    cache = backend.new_cache(1, 40)
    alone = [cache.prefill([0], [me])[0]] + [cache.decode([0], [t])[0] for t in tokens]

    # slot 1 joins while 0, 2 and 3 run (a slot range with a newcomer in the middle), then a
    # released slot is taken again by the same sequence
    for reuse in (False, True):
        cache = backend.new_cache(4, 60)
        cache.prefill([0, 2, 3], others)
        for t in range(3):
            cache.decode([0, 2, 3], [11 + t, 12, 13])
        if reuse:
            cache.prefill([1], [others[0]])
            cache.decode([0, 1, 2], [20, 21, 22])
            cache.release(1)
        got = [cache.prefill([1], [me])[0]]
        for i, t in enumerate(tokens):
            if i % 2:  # now beside the others, now alone
                got.append(cache.decode([0, 1, 2, 3], [30 + i, t, 31, 32])[1])
            else:
                got.append(cache.decode([1], [t])[0])
        for a, b in zip(alone, got, strict=True):
            check(form, precision, a, b, padded=True)


@pytest.mark.parametrize("form,precision", CASES)
def test_full_sequence_logits_are_causal_and_batch_invariant(bundles, tiny_tokenizer, form, precision):
    backend = bundles(form, precision)
    rng = np.random.default_rng(3)
    V = tiny_tokenizer.vocab_size
    ids = rng.integers(0, V - 1, (1, 24))
    changed = ids.copy()
    changed[0, 12:] = rng.integers(0, V - 1, 12)
    full = backend.logits(ids)
    # causal: the first 12 positions do not see the 12 tokens after them
    check(form, precision, full[0, :12], backend.logits(changed)[0, :12])
    # the prefix alone (a shorter sequence) gives the same logits too
    check(form, precision, full[0, :12], backend.logits(ids[:, :12])[0])
    # batch-invariant: a row beside another row of other contents
    both = backend.logits(np.concatenate([ids, rng.integers(0, V - 1, (1, 24))]))
    check(form, precision, full[0], both[0])


def test_per_row_int8_keeps_rows_apart():
    """The int8-dynamic rewrite on one MatMul: a row's output is its own (alone or beside others,
    zero or NaN rows beside it), a zero row gives zeros, and a shared input is quantized once."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gpt2_edge.quantize.int8 import per_row_int8

    rng = np.random.default_rng(0)
    K, N = 64, 32
    w = numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w")
    out = [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["B", "S", N]) for y in ("y", "y2")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], [y], name=y) for y in ("y", "y2")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K])],
        out,
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert per_row_int8(model) == 2
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("Abs") == 1  # one quantization of x
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, 5, K)).astype(np.float32)
    x[1, 2] = 0.0
    x[2, 4] = np.nan
    y, y2 = session.run(None, {"x": x})
    assert np.array_equal(y, y2, equal_nan=True)
    assert not y[1, 2].any() and np.isnan(y[2, 4]).all()
    assert np.isfinite(np.delete(y.reshape(15, N), 14, axis=0)).all()
    ref = x[0] @ numpy_helper.to_array(w)
    assert np.abs(y[0] - ref).max() < 0.02 * np.abs(ref).max()
    for b in range(3):
        for t in range(5):
            alone = session.run(None, {"x": x[b : b + 1, t : t + 1]})[0]
            np.testing.assert_array_equal(alone[0, 0], y[b, t])
