"""GPT-2 configuration: the model's dataclass, its public presets, Hugging Face config.json I/O,
and the training run's hyper-parameters. Torch-free."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Gpt2EdgeError

EOS_TOKEN_ID = 50256  # `<|endoftext|>` in the original GPT-2 vocabulary


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 model. Defaults are GPT-2 124M."""

    vocab_size: int = 50257  # byte-level BPE: 256 bytes + 50,000 merges + <|endoftext|>
    n_positions: int = 1024  # context length; positions are learned, so it is fixed at training
    n_embd: int = 768  # residual stream width
    n_layer: int = 12
    n_head: int = 12  # head size = n_embd / n_head (64 in every public GPT-2)
    layer_norm_epsilon: float = 1e-5  # the value the public checkpoints were trained with
    dropout: float = 0.0  # resid/attn/embd dropout; only used while training
    bos_token_id: int = EOS_TOKEN_ID  # GPT-2 uses <|endoftext|> for both ends
    eos_token_id: int = EOS_TOKEN_ID

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise Gpt2EdgeError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise Gpt2EdgeError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise Gpt2EdgeError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def bundle_dims(self) -> dict[str, int]:
        """The dims a bundle's manifest records under ``model`` (the runtime reads them there)."""
        return {
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "head_size": self.head_size,
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
        }

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)

    # Hugging Face config.json -------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that `transformers.GPT2LMHeadModel` reads."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Read a Hugging Face GPT-2 config.json; refuses what this model cannot represent.

        Errors name the key (``'n_head' must be an integer, got 'four'``); ``load`` adds the file.
        """
        if not isinstance(d, dict):
            kind = "list" if isinstance(d, list) else type(d).__name__
            raise Gpt2EdgeError(f"config.json holds a {kind}, not an object")
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise Gpt2EdgeError(f"config.json has model_type {model_type!r}; only 'gpt2' is supported")
        n_embd = _integer(d, "n_embd", "hidden_size")
        n_inner = d.get("n_inner")
        if n_inner not in (None, 4 * n_embd):
            raise Gpt2EdgeError(f"config.json has n_inner={n_inner}; only 4*n_embd is supported")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise Gpt2EdgeError(
                f"config.json has activation_function={act!r}; GPT-2 uses the tanh GELU (gelu_new)"
            )
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag):
                raise Gpt2EdgeError(f"config.json sets {flag}=true, which this model does not implement")
        if d.get("scale_attn_weights") is False:
            raise Gpt2EdgeError(
                "config.json sets scale_attn_weights=false, which this model does not implement"
            )
        if d.get("tie_word_embeddings") is False:
            raise Gpt2EdgeError("config.json has an untied LM head; GPT-2 ties it to wte")
        eos = _integer(d, "eos_token_id", default=EOS_TOKEN_ID, null_is_default=True)
        bos = _integer(d, "bos_token_id", default=eos, null_is_default=True)
        return cls(
            vocab_size=_integer(d, "vocab_size"),
            n_positions=_integer(d, "n_positions", "n_ctx", default=1024),
            n_embd=n_embd,
            n_layer=_integer(d, "n_layer", "num_hidden_layers", default=12),
            n_head=_integer(d, "n_head", "num_attention_heads", default=12),
            layer_norm_epsilon=_number(d, "layer_norm_epsilon", 1e-5),
            bos_token_id=bos,
            eos_token_id=eos,
        )

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> GPTConfig:
        """Read ``directory/config.json``; errors name the file and the key."""
        path = Path(directory, "config.json")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: a checkpoint directory needs config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Gpt2EdgeError(f"{path} is not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d)
        except ValueError as e:
            msg = str(e)
            raise Gpt2EdgeError(
                str(path) + msg.removeprefix("config.json") if msg.startswith("config.json") else msg
            ) from None


_MISSING = object()


def _integer(
    d: dict[str, Any],
    key: str,
    alias: str | None = None,
    default: Any = _MISSING,
    null_is_default: bool = False,
) -> int:
    """``d[key]`` (or ``d[alias]``, Hugging Face's other name) as an int; bools and strings refused."""
    name = key if key in d or alias is None or alias not in d else alias
    value = d.get(name, _MISSING)
    if value is _MISSING or (value is None and null_is_default):
        if default is _MISSING:
            raise Gpt2EdgeError(f"config.json: {key!r} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise Gpt2EdgeError(f"config.json: {name!r} must be an integer, got {value!r}")
    return value


def _number(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Gpt2EdgeError(f"config.json: {key!r} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (defaults: the shipped default model).

    Here, beside ``GPTConfig``, and not in ``train.py``: the CLI builds its flags from it without
    importing torch.
    """

    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 8
    vocab_size: int = 8192  # only used when a new tokenizer is trained
    dropout: float = 0.2  # the corpus is small (~280k tokens): regularise
    # Training window, and so the model's context (n_positions): position embeddings past the
    # window would never receive a gradient.
    block_size: int = 128
    batch_size: int = 32
    max_steps: int = 1200
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 16
    val_fraction: float = 0.1  # the last fraction of the text is held out
    seed: int = 1337
    save_dtype: str = "float16"  # storage dtype of the written checkpoint

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise Gpt2EdgeError(f"block_size must be >= 2, got {self.block_size}")
        if not 0 < self.val_fraction < 1:
            raise Gpt2EdgeError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("batch_size", "max_steps", "eval_interval", "eval_batches"):
            if getattr(self, name) <= 0:
                raise Gpt2EdgeError(f"{name} must be positive, got {getattr(self, name)}")
        if self.save_dtype not in ("float16", "float32", "bfloat16"):
            raise Gpt2EdgeError(f"save_dtype must be float16, bfloat16 or float32, got {self.save_dtype}")


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(),
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPTConfig(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPTConfig(n_embd=1600, n_layer=48, n_head=25),
    "distilgpt2": GPTConfig(n_layer=6),
}


def preset(name: str) -> GPTConfig:
    """One of the public GPT-2 shapes by its Hugging Face name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise Gpt2EdgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
