"""Our tokenizers-based GPT-2 tokenizer against transformers' slow pure-Python GPT2Tokenizer (where
transformers is installed), and on its own."""

from __future__ import annotations

import pytest

from gpt2_edge.runtime.tokenizer import Tokenizer, TokenizerError

BATTERY = [
    "Hello world",
    "Hello, world! It's a test... isn't it?",
    " leading space and trailing space ",
    "café naïve résumé Ångström señor",
    "東京は日本の首都です。中文测试",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦",
    "runs   of    spaces\tand\ttabs",
    "new\nlines\n\n\nand\r\nCRLF\n",
    "<|endoftext|>",
    "text<|endoftext|>more text <|endoftext|> end",
    "numbers 1234567890 3.14159 -42",
    "I'm you're they've we'll she'd",
    "    indented code:\n        return x  # comment",
    "",
]


@pytest.fixture(scope="module")
def ours(gpt2_bpe_files) -> Tokenizer:
    return Tokenizer.from_vocab_merges(*gpt2_bpe_files)


@pytest.fixture(scope="module")
def slow(gpt2_bpe_files):
    """transformers' slow GPT2Tokenizer (the oracle; transformers is a dev dependency, not a device's)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.GPT2Tokenizer(vocab_file=str(gpt2_bpe_files[0]), merges_file=str(gpt2_bpe_files[1]))
    assert not tok.is_fast
    return tok


def test_real_gpt2_vocab(ours):
    assert ours.vocab_size == 50257
    assert ours.eos_token_id == 50256
    assert ours.encode("Hello world") == [15496, 995]  # the published GPT-2 ids


@pytest.mark.parametrize("text", BATTERY)
def test_encode_decode_equal_slow_tokenizer(ours, slow, text):
    ids = ours.encode(text)
    assert ids == slow.encode(text)
    assert ours.decode(ids) == slow.decode(ids) == text


def test_decode_of_split_multibyte_matches_slow(ours, slow):
    ids = ours.encode("😀")
    assert len(ids) > 1  # an emoji spans several byte-level tokens
    assert ours.decode(ids[:1]) == slow.decode(ids[:1])


def test_tokenizer_json_round_trip(ours, tmp_path):
    ours.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    for text in BATTERY:
        assert again.encode(text) == ours.encode(text)
    # transformers can read what we write
    transformers = pytest.importorskip("transformers")
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert fast.encode(BATTERY[5]) == ours.encode(BATTERY[5])


def test_train_small_vocabulary(tiny_tokenizer):
    assert tiny_tokenizer.vocab_size == 300
    assert tiny_tokenizer.eos_token_id == 299  # eos takes the last id, as in GPT-2
    text = "First Citizen: speak, speak! 😀"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text  # byte-level: nothing is unknown


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer: expected tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="vocab_size must exceed 257"):
        Tokenizer.train(["abc"], vocab_size=100)
