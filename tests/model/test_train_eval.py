"""Training lowers validation loss; sliding-window perplexity is exact on known models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gpt2_edge.cli import main
from gpt2_edge.model.checkpoint import load_checkpoint
from gpt2_edge.model.evaluate import perplexity, sliding_windows, torch_logits_fn
from gpt2_edge.model.train import TrainConfig, lr_at, read_text, train
from tests.helpers import SAMPLE_TEXT

SMALL = dict(
    n_layer=1,
    n_embd=32,
    n_head=2,
    block_size=32,
    batch_size=8,
    warmup_steps=5,
    eval_interval=10,
    eval_batches=2,
    lr=3e-3,
    dropout=0.0,
    save_dtype="float32",
)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "sample.txt"
    p.write_text(SAMPLE_TEXT * 3)
    return p


def test_training_lowers_validation_loss_and_writes_checkpoint(text_file, tmp_path, tiny_tokenizer):
    res = train(
        text_file,
        tmp_path / "ckpt",
        TrainConfig(max_steps=40, **SMALL),
        tokenizer=tiny_tokenizer,
        progress=False,
    )
    first, best = res.history[0]["val_loss"], res.best_val_loss
    assert first < math.log(tiny_tokenizer.vocab_size) + 0.5  # learnt something by step 10
    assert best < first - 0.3, res.history
    meta = json.loads((tmp_path / "ckpt" / "training.json").read_text())
    assert meta["step"] == res.best_step and meta["val_loss"] == pytest.approx(best)
    model = load_checkpoint(tmp_path / "ckpt")  # a loadable Hugging Face checkpoint
    assert model.config.n_layer == 1
    assert model.config.n_positions == 32  # the context is the training window


def test_training_is_reproducible(text_file, tmp_path, tiny_tokenizer):
    cfg = TrainConfig(max_steps=10, **SMALL)
    a = train(text_file, tmp_path / "a", cfg, tokenizer=tiny_tokenizer, progress=False)
    b = train(text_file, tmp_path / "b", cfg, tokenizer=tiny_tokenizer, progress=False)
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
    assert a.best_val_loss == b.best_val_loss


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(5.5e-4)
    assert lr_at(100, cfg) == pytest.approx(1e-4)


def test_too_short_or_bad_text(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="at least 64 are needed"):
        train(short, tmp_path / "x", TrainConfig(**SMALL), progress=False)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc" * 50)
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_text(tmp_path / "missing.txt")


# perplexity -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,max_len,stride", [(100, 32, 16), (100, 32, 32), (33, 32, 8), (5, 32, 16), (64, 16, 5)]
)
def test_every_token_after_the_first_is_scored_once(n, max_len, stride):
    scored = []
    for begin, end, n_target in sliding_windows(n, max_len, stride):
        assert end - begin <= max_len
        scored.extend(range(end - n_target, end))
    assert scored == list(range(1, n))


def test_uniform_logits_give_perplexity_equal_to_vocab_size():
    rep = perplexity(lambda w: np.zeros((1, w.shape[1], 321)), list(range(200)), max_length=50, stride=20)
    assert rep.perplexity == pytest.approx(321, rel=1e-9)
    assert rep.tokens == 199


def test_perplexity_of_a_known_distribution():
    # A model that puts probability 1/2 on the true next token (rest uniform) scores ppl 2.
    ids = np.arange(50) % 7

    def fn(w):
        out = np.full((1, w.shape[1], 7), -np.inf)
        for t in range(w.shape[1]):
            nxt = (w[0, t] + 1) % 7
            out[0, t, :] = math.log(0.5 / 6)
            out[0, t, nxt] = math.log(0.5)
        return out

    assert perplexity(fn, ids, max_length=10, stride=3).perplexity == pytest.approx(2.0)


def test_window_size_does_not_change_perplexity_without_context_dependence(tiny_model):
    ids = np.random.default_rng(0).integers(0, 299, 90)
    fn = torch_logits_fn(tiny_model)
    full = perplexity(fn, ids, max_length=64, stride=64).perplexity
    overlapping = perplexity(fn, ids, max_length=64, stride=16).perplexity
    assert math.isfinite(full) and math.isfinite(overlapping)
    assert overlapping != full  # more context per token changes the score of a real model


def test_eval_cli(tiny_checkpoint, text_file, capsys):
    assert main(["eval", str(tiny_checkpoint), "--text", str(text_file), "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tokens"] > 100 and 1 < rep["perplexity"] < 1e4 and rep["tokens_per_s"] > 0
