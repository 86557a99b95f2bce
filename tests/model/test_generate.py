"""Reference generation: HF-compatible greedy, sampling processors, batching, stops, limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2_edge.model.generate import TorchBackend, generate
from gpt2_edge.runtime.generator import ContextOverflowError, decode
from gpt2_edge.runtime.sampling import (
    GenerationConfig,
    TokenChooser,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
)
from tests.helpers import random_gpt, tiny_config

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as lp  # noqa: E402


def run(model, prompts, cfg, eos=None):
    return decode(
        TorchBackend(model),
        prompts,
        cfg,
        eos_token_id=eos,
        n_ctx=model.config.n_positions,
        detokenize=lambda ids: " ".join(map(str, ids)),
    )


@pytest.fixture(scope="module")
def model_and_hf(tmp_path_factory):
    from gpt2_edge.model.checkpoint import save_checkpoint

    model = random_gpt(tiny_config(), seed=5)
    d = save_checkpoint(model, tmp_path_factory.mktemp("g") / "c")
    return model, transformers.GPT2LMHeadModel.from_pretrained(d).eval()


@pytest.mark.parametrize("prompt", [[1, 2, 3], [17], [250, 3, 9, 9, 9, 40, 41, 42, 2]])
def test_greedy_equals_transformers_generate(model_and_hf, prompt):
    model, hf = model_and_hf
    eos = model.config.eos_token_id
    ours = run(model, [prompt], GenerationConfig(max_new_tokens=20), eos=eos)[0]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=eos,
            eos_token_id=eos,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    assert ours.token_ids == out[0, len(prompt) :].tolist()


def test_padded_batch_equals_each_prompt_alone(model_and_hf):
    model, _ = model_and_hf
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 101, 102]]
    cfg = GenerationConfig(max_new_tokens=12)
    batch = run(model, prompts, cfg)
    for p, r in zip(prompts, batch, strict=True):
        assert r.token_ids == run(model, [p], cfg)[0].token_ids


def test_repetition_penalty_greedy_equals_transformers(model_and_hf):
    model, hf = model_and_hf
    prompt = [4, 4, 8, 15, 16, 23, 42]
    ours = run(model, [prompt], GenerationConfig(max_new_tokens=15, repetition_penalty=1.7))[0]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=15,
            do_sample=False,
            repetition_penalty=1.7,
            pad_token_id=0,
            eos_token_id=None,
            attention_mask=torch.ones(1, 7, dtype=torch.long),
        )
    assert ours.token_ids == out[0, 7:].tolist()


# processors against transformers' own (independent oracle) ----------------------------------
@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 50)).astype(np.float32) * 3


def hf_apply(proc, scores, ids=None):
    ids = torch.zeros((scores.shape[0], 1), dtype=torch.long) if ids is None else torch.tensor(ids)
    return proc(ids, torch.from_numpy(scores.copy())).numpy()


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_temperature_matches_hf(scores, t):
    # Ours shifts each row by its max first (a tiny temperature must not make inf - inf): the same
    # logits up to a per-row constant, so the same softmax, top-k and top-p.
    hf = hf_apply(lp.TemperatureLogitsWarper(t), scores)
    ours = apply_temperature(scores, t)
    np.testing.assert_allclose(
        ours - ours.max(-1, keepdims=True), hf - hf.max(-1, keepdims=True), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("k", [1, 3, 10, 49, 50, 100])
def test_top_k_matches_hf(scores, k):
    np.testing.assert_array_equal(apply_top_k(scores, k), hf_apply(lp.TopKLogitsWarper(k), scores))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999])
def test_top_p_matches_hf(scores, p):
    np.testing.assert_array_equal(apply_top_p(scores, p), hf_apply(lp.TopPLogitsWarper(p), scores))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_hf(scores, penalty):
    ids = [[1, 2, 2, 7], [0, 0, 0, 0], [49, 3, 5, 8], [10, 11, 12, 13]]
    np.testing.assert_allclose(
        apply_repetition_penalty(scores, ids, penalty),
        hf_apply(lp.RepetitionPenaltyLogitsProcessor(penalty), scores, ids),
        rtol=1e-6,
    )


def test_seeded_sampling_is_reproducible_and_seed_dependent(model_and_hf):
    model, _ = model_and_hf
    cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, seed=7)
    a = run(model, [[1, 2, 3]], cfg)[0].token_ids
    assert a == run(model, [[1, 2, 3]], cfg)[0].token_ids
    others = {
        tuple(
            run(
                model,
                [[1, 2, 3]],
                GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, seed=s),
            )[0].token_ids
        )
        for s in range(8, 12)
    }
    assert others - {tuple(a)}


@pytest.mark.parametrize("extra", [dict(top_k=1), dict(top_p=1e-6)])
def test_degenerate_sampling_equals_greedy(model_and_hf, extra):
    model, _ = model_and_hf
    greedy = run(model, [[9, 8, 7]], GenerationConfig(max_new_tokens=12))[0].token_ids
    sampled = run(model, [[9, 8, 7]], GenerationConfig(max_new_tokens=12, do_sample=True, seed=1, **extra))[0]
    assert sampled.token_ids == greedy


def test_sampling_follows_the_distribution():
    chooser = TokenChooser(GenerationConfig(do_sample=True, seed=0), eos_token_id=None)
    logits = np.log(np.array([[0.1, 0.2, 0.7]]))
    draws = np.array([chooser(logits, [[]], 0)[0] for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 4000, [0.1, 0.2, 0.7], atol=0.03)


def test_eos_stops_each_row_and_min_new_tokens_suppresses_it(model_and_hf):
    model, _ = model_and_hf
    first = run(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=5))[0].token_ids
    eos = first[2]  # pretend the third greedy token is eos
    r = run(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=5), eos=eos)[0]
    assert r.finish_reason == "eos" and r.token_ids == first[: first.index(eos) + 1]
    r = run(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=5, min_new_tokens=5), eos=eos)[0]
    assert r.finish_reason == "length" and len(r.token_ids) == 5 and eos not in r.token_ids[:5]


def test_stop_string_truncates_text(model_and_hf):
    model, _ = model_and_hf
    full = run(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=8))[0]
    full_text = " ".join(map(str, full.token_ids))
    stop = " " + str(full.token_ids[-1])
    r = run(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=8, stop=(stop,)))[0]
    assert r.finish_reason == "stop"
    assert r.text == full_text[: full_text.find(stop)]
    assert stop not in r.text and r.token_ids == full.token_ids[: len(r.token_ids)]


def test_context_overflow_refused_or_truncated(model_and_hf):
    model, _ = model_and_hf  # n_positions = 64
    prompt = list(range(60))
    with pytest.raises(
        ContextOverflowError, match=r"60 tokens .* max_new_tokens is 10: 70 > the model's context of 64"
    ):
        run(model, [prompt], GenerationConfig(max_new_tokens=10))
    r = run(model, [prompt], GenerationConfig(max_new_tokens=10, truncate=True))[0]
    assert r.prompt_tokens == 54 and len(r.token_ids) == 10


@pytest.mark.parametrize(
    "bad,msg",
    [
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(num_beams=0), "num_beams must be >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    ],
)
def test_config_validation(bad, msg):
    with pytest.raises(ValueError, match=msg):
        GenerationConfig(**bad)


def test_empty_prompts_refused(model_and_hf, tiny_tokenizer):
    model, _ = model_and_hf
    with pytest.raises(ValueError, match="no prompts"):
        run(model, [], GenerationConfig())
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, tiny_tokenizer, "", GenerationConfig())


# beam search -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=4),
        dict(num_beams=4, length_penalty=0.5),
        dict(num_beams=3, early_stopping=True),
        dict(num_beams=4, early_stopping="never", length_penalty=0.0),
        dict(num_beams=2, repetition_penalty=1.3),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
@pytest.mark.parametrize("eos_rank", [None, 1])
def test_beam_search_equals_transformers(model_and_hf, kw, eos_rank):
    model, hf = model_and_hf
    prompt = [7, 100, 3, 3, 41]
    eos = model.config.eos_token_id
    if eos_rank is not None:  # make eos a likely token so hypotheses finish early
        with torch.no_grad():
            logits = model(torch.tensor([prompt]))[0][0, -1]
        eos = int(torch.argsort(logits, descending=True)[eos_rank])
    cfg = GenerationConfig(max_new_tokens=10, **kw)
    ours = run(model, [prompt], cfg, eos=eos)[0]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, 5, dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=eos,
            eos_token_id=eos,
            **kw,
        )
    theirs = out[0, 5:].tolist()
    if eos in theirs:
        theirs = theirs[: theirs.index(eos) + 1]
    assert ours.token_ids == theirs


def test_beam_search_one_beam_per_prompt_in_a_batch(model_and_hf):
    model, _ = model_and_hf
    prompts = [[1, 2, 3], [50, 60]]
    cfg = GenerationConfig(max_new_tokens=6, num_beams=3)
    both = run(model, prompts, cfg)
    assert [r.token_ids for r in both] == [run(model, [p], cfg)[0].token_ids for p in prompts]
