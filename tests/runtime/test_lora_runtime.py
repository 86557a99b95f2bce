"""Run-time LoRA adapters on a bundle exported with ``--lora-slots``: rows without an adapter keep the
plain bundle's logits bitwise, rows of different adapters decode in one batch exactly as each alone,
an adapter's output equals the bundle with it merged at export (torch: the merged bundle is exported
here), and bad adapters are refused by name at load.

Torch-free but for the merged comparison: the slot bundles come from tests/bundles.py and the
adapters are written with numpy in PEFT's layout (tests/lora_helpers.py ``write_adapter``)."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_edge import tolerances
from gpt2_edge.errors import Gpt2EdgeError
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.loader import load_model
from gpt2_edge.runtime.lora import LoraError
from gpt2_edge.runtime.sampling import GenerationConfig
from tests.bundles import CONCAT, INPLACE, LORA_SLOTS, LORA_SLOTS_CONCAT
from tests.lora_helpers import write_adapter

pytestmark = pytest.mark.filterwarnings("ignore")

TOL = tolerances.TOLERANCES["fp32"].max_abs_logits
PROMPTS = [[5, 17, 42, 99], [64, 2, 200], [7, 7, 8, 9, 10], [120, 3]]
FORMS = {"inplace": (LORA_SLOTS, INPLACE), "concat": (LORA_SLOTS_CONCAT, CONCAT)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a1": write_adapter(root / "a1", seed=1, r=4, alpha=8),
        # a smaller set of targets, the slots' full rank, another alpha
        "a2": write_adapter(root / "a2", seed=2, r=8, alpha=4, targets=("attn.c_attn", "mlp.c_fc")),
    }


@pytest.fixture(scope="module", params=list(FORMS))
def form(request):
    return request.param


@pytest.fixture(scope="module")
def served(form, make_bundle, adapters):
    return load_model(make_bundle(FORMS[form][0]), lora=adapters)


def prefill(model, prompt, adapter=None):
    cache = model.backend.new_cache(1, 16)
    cache.set_adapter(0, model.adapter_id(adapter))
    return cache.prefill([0], [prompt])[0]


def test_rows_without_an_adapter_keep_the_plain_bundles_logits_bitwise(served, form, make_bundle):
    plain = load_model(make_bundle(FORMS[form][1]))
    ids = np.array([PROMPTS[0], PROMPTS[0][::-1]], np.int64)
    assert np.array_equal(served.backend.logits(ids), plain.backend.logits(ids))
    for p in PROMPTS:
        assert np.array_equal(prefill(served, p), prefill(plain, p))


def test_an_adapter_changes_the_logits(served):
    for name in served.adapters:
        assert np.abs(prefill(served, PROMPTS[0], name) - prefill(served, PROMPTS[0])).max() > 100 * TOL


def test_mixed_batch_equals_each_row_alone(served):
    gen = Generator(served)
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    rows = ["a1", None, "a2", "a1"]
    mixed = gen.generate(PROMPTS, cfg, adapter=rows)
    alone = [gen.generate([p], cfg, adapter=a)[0] for p, a in zip(PROMPTS, rows, strict=True)]
    assert [r.token_ids for r in mixed] == [r.token_ids for r in alone]
    # and the first step's logits, row by row
    cache = served.backend.new_cache(len(PROMPTS), 16)
    for slot, a in enumerate(rows):
        cache.set_adapter(slot, served.adapter_id(a))
    together = cache.prefill(list(range(len(PROMPTS))), PROMPTS)
    for row, p, a in zip(together, PROMPTS, rows, strict=True):
        assert np.abs(row - prefill(served, p, a)).max() <= TOL


def test_stream_takes_an_adapter(served):
    gen = Generator(served)
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    text = "".join(gen.stream(PROMPTS[0], cfg, adapter="a1"))
    assert gen.last_result.token_ids == gen.generate([PROMPTS[0]], cfg, adapter="a1")[0].token_ids
    assert text == gen.last_result.text


def test_unknown_adapter_and_beams_refused(served):
    gen = Generator(served)
    with pytest.raises(Gpt2EdgeError, match="unknown LoRA adapter 'nope'; this model serves: a1, a2"):
        gen.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=2), adapter="nope")
    with pytest.raises(Gpt2EdgeError, match="beam search runs without LoRA adapters"):
        gen.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=2, num_beams=2), adapter="a1")
    with pytest.raises(Gpt2EdgeError, match="2 adapters given for 1 prompts"):
        gen.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=2), adapter=["a1", "a2"])


def test_bad_adapters_refused_at_load(make_bundle, tmp_path, adapters):
    slots = make_bundle(LORA_SLOTS)
    big = write_adapter(tmp_path / "big", r=16)
    with pytest.raises(
        LoraError, match="adapter 'big' has rank 16 at h.0.attn.c_attn, over the slots' rank 8"
    ):
        load_model(slots, lora={"big": big})
    wide = write_adapter(tmp_path / "wide", n_embd=32)
    with pytest.raises(LoraError, match="adapter 'wide' does not fit this base model"):
        load_model(slots, lora={"wide": wide})
    with pytest.raises(LoraError, match="adapter 'gone'.*lacks adapter_config.json"):
        load_model(slots, lora={"gone": tmp_path})
    many = {f"x{i}": adapters["a1"] for i in range(5)}
    with pytest.raises(Gpt2EdgeError, match="5 LoRA adapters given; .* has 4 slots"):
        load_model(slots, lora=many)
    with pytest.raises(
        Gpt2EdgeError, match="takes no LoRA adapters at run time: export it with --lora-slots"
    ):
        load_model(make_bundle(INPLACE), lora=adapters)


def test_manifest_declares_the_slots(make_bundle):
    m = load_model(make_bundle(LORA_SLOTS)).manifest
    assert m.lora_slots is not None and (m.lora_slots.slots, m.lora_slots.rank) == (4, 8)
    names = [s.name for s in m.inputs]
    assert names[names.index("adapter_ids") + 1 : names.index("adapter_ids") + 3] == [
        "lora_a.0.attn.c_attn",
        "lora_b.0.attn.c_attn",
    ]
    plain = load_model(make_bundle(INPLACE)).manifest
    assert plain.lora_slots is None and not any(
        s.name == "adapter_ids" or "lora" in s.name for s in plain.inputs
    )


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_checkpoint, adapters, form):
    """The tiny checkpoint with each adapter merged at export (torch)."""
    from gpt2_edge.export.bundle import export_bundle

    root = tmp_path_factory.mktemp(f"merged-{form}")
    return {
        name: load_model(
            export_bundle(tiny_checkpoint, root / name, kv_cache=form, lora=path, log=lambda _: None)
        )
        for name, path in adapters.items()
    }


def test_runtime_adapter_equals_the_merged_bundle(served, merged):
    pytest.importorskip("torch")
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    for name, model in merged.items():
        for p in PROMPTS:
            assert np.abs(prefill(served, p, name) - prefill(model, p)).max() <= TOL
        got = Generator(served).generate(PROMPTS, cfg, adapter=name)
        want = Generator(model).generate(PROMPTS, cfg)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_speculative_decoding_with_an_adapter_is_exact(served, form):
    if form != "inplace":
        pytest.skip("speculative decoding verifies on the in-place cache only")
    gen = Generator(served)
    prompt = [5, 17, 42, 5, 17, 42, 5, 17]  # repeats: prompt lookup drafts
    for adapter in ("a1", "a2", None):
        plain = gen.generate([prompt], GenerationConfig(max_new_tokens=12, ignore_eos=True), adapter=adapter)
        spec = gen.generate(
            [prompt], GenerationConfig(max_new_tokens=12, ignore_eos=True, prompt_lookup=4), adapter=adapter
        )
        assert spec[0].token_ids == plain[0].token_ids
