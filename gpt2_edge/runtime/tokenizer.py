"""GPT-2 byte-level BPE through Hugging Face ``tokenizers`` (fast, no torch).

Loads ``tokenizer.json`` or the original ``vocab.json`` + ``merges.txt`` pair; bundles always
carry ``tokenizer.json``. Small models can train their own vocabulary on a text file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ..errors import Gpt2EdgeError
from ..fsutil import atomic_write_text

EOS_TOKEN = "<|endoftext|>"


class TokenizerError(Gpt2EdgeError):
    """A tokenizer file is missing or unreadable."""


def _byte_level(model: models.Model) -> _HFTokenizer:
    tok = _HFTokenizer(model)
    # GPT-2: no prefix space, the GPT-2 split regex, bytes mapped to printable characters.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


class Tokenizer:
    """A GPT-2 tokenizer: ``encode`` text to ids and ``decode`` ids to text."""

    def __init__(self, tokenizer: _HFTokenizer, eos_token: str = EOS_TOKEN) -> None:
        self._tok = tokenizer
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise TokenizerError(f"the tokenizer has no {eos_token!r} token")
        self.eos_token = eos_token
        self.eos_token_id: int = eos_id
        self._max_token_bytes: int | None = None

    # construction ---------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json``."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path} not found")
        try:
            return cls(_HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({e})") from None

    @classmethod
    def from_vocab_merges(cls, vocab: str | Path, merges: str | Path) -> Tokenizer:
        """Build from the original GPT-2 ``vocab.json`` (encoder.json) and ``merges.txt`` (vocab.bpe)."""
        for p in (vocab, merges):
            if not Path(p).is_file():
                raise TokenizerError(f"{p} not found")
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:
            raise TokenizerError(f"cannot read BPE files {vocab}, {merges} ({e})") from None
        tok = _byte_level(bpe)
        tok.add_special_tokens([EOS_TOKEN])
        return cls(tok)

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Load the tokenizer of a checkpoint or bundle directory."""
        d = Path(directory)
        if (d / "tokenizer.json").is_file():
            return cls.from_file(d / "tokenizer.json")
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return cls.from_vocab_merges(d / "vocab.json", d / "merges.txt")
        raise TokenizerError(f"{d} has no tokenizer: expected tokenizer.json, or vocab.json + merges.txt")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE vocabulary of ``vocab_size`` tokens (``<|endoftext|>`` last)."""
        if vocab_size <= 257:
            raise TokenizerError(f"vocab_size must exceed 257 (256 bytes + eos), got {vocab_size}")
        tok = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 1,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        # Like GPT-2, the end-of-text token takes the last id.
        tok.add_special_tokens([EOS_TOKEN])
        return cls(tok)

    # use --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_bytes(self) -> int:
        """The longest token's length in UTF-8 bytes: text of more than ``n * max_token_bytes``
        characters cannot fit in ``n`` tokens (a character is at least one byte), so a length
        check needs no tokenization."""
        if self._max_token_bytes is None:
            vocab = self._tok.get_vocab(with_added_tokens=True)
            longest = 1
            for i in vocab.values():
                longest = max(longest, len(self._tok.decode([i], skip_special_tokens=False).encode()))
            self._max_token_bytes = longest
        return self._max_token_bytes

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write ``tokenizer.json`` (and a ``tokenizer_config.json`` transformers understands)."""
        d = Path(directory)
        atomic_write_text(d / "tokenizer.json", self.to_json())
        cfg = {
            "tokenizer_class": "GPT2TokenizerFast",
            "bos_token": self.eos_token,
            "eos_token": self.eos_token,
            "unk_token": self.eos_token,
            "add_prefix_space": False,
        }
        if model_max_length is not None:
            cfg["model_max_length"] = model_max_length
        atomic_write_text(d / "tokenizer_config.json", json.dumps(cfg, indent=2) + "\n")
