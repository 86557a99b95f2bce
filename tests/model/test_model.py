"""The reference model against transformers.GPT2LMHeadModel with the same weights."""

from __future__ import annotations

import pytest
import torch

from gpt2_edge.model.checkpoint import reference_to_hf, save_checkpoint
from gpt2_edge.model.config import PRESETS, GPTConfig, preset
from gpt2_edge.model.gpt import GPT
from tests.helpers import TINY_CONFIGS, random_gpt, tiny_config

transformers = pytest.importorskip("transformers")
TOL = 1e-4  # DESIGN.md: reference vs Hugging Face, logits max abs diff


def hf_twin(model: GPT, tmp_path) -> transformers.GPT2LMHeadModel:
    save_checkpoint(model, tmp_path / "ckpt")
    return transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, (
        f"{what}: max |diff| {diff:.3g} > {TOL}; first ours {ours.flatten()[:4]} vs {theirs.flatten()[:4]}"
    )


@pytest.mark.parametrize("dims", TINY_CONFIGS, ids=lambda d: "L{}-E{}-H{}-V{}".format(*d[:4]))
def test_full_sequence_matches_hf(dims, tmp_path):
    model = random_gpt(tiny_config(*dims))
    hf = hf_twin(model, tmp_path)
    ids = torch.randint(0, dims[3], (3, 17))
    with torch.no_grad():
        assert_close(model(ids)[0], hf(ids).logits, "full sequence")
        # The masked (explicit) attention path too: an all-ones mask.
        assert_close(model(ids, torch.ones_like(ids))[0], hf(ids).logits, "full sequence, masked path")


@pytest.mark.parametrize("dims", TINY_CONFIGS, ids=lambda d: "L{}-E{}-H{}-V{}".format(*d[:4]))
def test_prefill_then_decode_with_past_matches_hf(dims, tmp_path):
    model = random_gpt(tiny_config(*dims))
    hf = hf_twin(model, tmp_path)
    ids = torch.randint(0, dims[3], (2, 14))
    with torch.no_grad():
        full_hf = hf(ids).logits
        logits, past = model(ids[:, :6])
        assert_close(logits, full_hf[:, :6], "prefill")
        for t in range(6, 14):
            logits, past = model(ids[:, t : t + 1], past_key_values=past)
            assert_close(logits[:, 0], full_hf[:, t], f"decode step {t}")
        k, v = past[0]
        hs = dims[1] // dims[2]
        assert k.shape == v.shape == (2, dims[2], 14, hs)  # [batch, heads, total, head_size]
        # Several new tokens against a past (speculative-style chunk) work too.
        logits, _ = model(ids[:, 10:], past_key_values=[(k[:, :, :10], v[:, :, :10]) for k, v in past])
        assert_close(logits, full_hf[:, 10:], "chunk after past")


def test_left_padded_batch_matches_unpadded_runs_and_hf(tmp_path):
    cfg = tiny_config()
    model = random_gpt(cfg)
    hf = hf_twin(model, tmp_path)
    lengths = [9, 4, 6]
    prompts = [torch.randint(0, cfg.vocab_size - 1, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.full((3, width), cfg.eos_token_id)
    mask = torch.zeros((3, width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = p
        mask[b, width - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded, past = model(ids, mask, pos)
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
        for b, p in enumerate(prompts):
            alone, _ = model(p[None])
            real = slice(width - len(p), width)
            assert_close(padded[b, real], alone[0], f"row {b} padded vs alone")
            assert_close(padded[b, real], theirs[b, real], f"row {b} vs HF")
        # One decode step with the mask over past + new tokens.
        nxt = torch.randint(0, cfg.vocab_size - 1, (3, 1))
        mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        step, _ = model(nxt, mask2, pos[:, -1:] + 1, past)
        for b, p in enumerate(prompts):
            alone, _ = model(torch.cat([p, nxt[b]])[None])
            assert_close(step[b, 0], alone[0, -1], f"row {b} decode after padding")


def test_positions_default_from_mask():
    model = random_gpt(tiny_config())
    ids = torch.tensor([[299, 299, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    with torch.no_grad():
        a, _ = model(ids, mask)
        b, _ = model(ids[:, 2:])
    assert_close(a[0, 2:], b[0], "derived positions")


def test_context_overflow_is_refused():
    model = random_gpt(tiny_config(n_positions=16))
    with pytest.raises(ValueError, match="exceed the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "name,params",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("distilgpt2", 81_912_576)],
)
def test_presets_have_public_parameter_counts(name, params):
    with torch.device("meta"):
        assert GPT(preset(name)).num_parameters() == params


def test_all_presets_listed():
    assert set(PRESETS) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
    assert preset("gpt2-xl").n_embd == 1600
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt5")


@pytest.mark.parametrize("bad", [dict(n_embd=65, n_head=4), dict(n_layer=0), dict(dropout=1.0)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        GPTConfig(**bad)


def test_hf_layout_transposes_exactly_the_conv1d_weights():
    model = random_gpt(tiny_config())
    hf_sd = reference_to_hf(model)
    assert hf_sd["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D: [in, out]
    assert hf_sd["transformer.h.0.mlp.c_proj.weight"].shape == (256, 64)
    assert hf_sd["transformer.wte.weight"].shape == (300, 64)
