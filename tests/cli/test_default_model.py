"""The shipped default model: present, small, loadable offline, and as good as its card says."""

from __future__ import annotations

import json
import re

import pytest

from gpt2_edge.cli import main
from gpt2_edge.model.checkpoint import DEFAULT_MODEL_DIR, load_checkpoint, load_tokenizer
from tests.helpers import SHAKESPEARE


def test_shipped_files_and_size():
    names = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md", "training.json"} <= names
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert total <= 16 * 2**20, total


def test_loads_with_its_tokenizer():
    model, tok = load_checkpoint(None), load_tokenizer(None)
    assert model.config.vocab_size == tok.vocab_size
    assert model.config.eos_token_id == tok.eos_token_id


def test_cli_generate_default_model(capsys):
    assert main(["generate", "--prompt", "ROMEO:", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "ms per step" in out.err


@pytest.mark.slow
def test_card_reports_the_measured_validation_perplexity(capsys):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    stated = float(re.search(r"validation perplexity[^\d]*([\d.]+)", card, re.I).group(1))
    assert main(["eval", "--text", str(SHAKESPEARE), "--tail", "0.1", "--json", "--quiet"]) == 0
    measured = json.loads(capsys.readouterr().out)["perplexity"]
    assert measured == pytest.approx(stated, rel=0.005)
