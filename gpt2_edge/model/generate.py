"""Reference generation: the shared decode loop over the PyTorch model (the runtime's oracle)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..runtime.constraints import compile_constraint
from ..runtime.generator import GenerationResult, decode
from ..runtime.kv_cache import ConcatCache
from ..runtime.sampling import GenerationConfig, check_logit_bias_vocab
from ..runtime.tokenizer import Tokenizer
from ..runtime.types import Capabilities
from .gpt import GPT


class TorchBackend:
    """The reference model as a backend: concatenating KV cache, tensors kept in torch."""

    capabilities = Capabilities(provider="torch")
    bundle = None  # not read from a bundle

    def __init__(self, model: GPT) -> None:
        self.model = model.eval()
        c = model.config
        self.pad_id = c.eos_token_id if c.eos_token_id < c.vocab_size else 0
        self.n_head, self.head_size = c.n_head, c.head_size
        self.n_ctx = c.n_positions

    @torch.no_grad()
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits ``(B, T, V)``."""
        return self.model(torch.from_numpy(np.asarray(input_ids, np.int64)))[0].float().numpy()

    def new_cache(self, n_slots: int, capacity: int) -> ConcatCache:
        return ConcatCache(self, n_slots, capacity)

    @torch.no_grad()
    def run(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[torch.Tensor] | None
    ) -> tuple[np.ndarray, list[torch.Tensor]]:
        pairs = None if past is None else [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, presents = self.model(
            torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), pairs
        )
        return logits[:, -1].float().numpy(), [t for kv in presents for t in kv]

    def to_numpy(self, value: torch.Tensor) -> np.ndarray:
        return value.numpy()

    def from_numpy(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array))


def generate(
    model: GPT, tokenizer: Tokenizer, prompts: str | Sequence[str], config: GenerationConfig
) -> list[GenerationResult]:
    """Continue one prompt or a batch with the reference model."""
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    vocab = model.config.vocab_size
    check_logit_bias_vocab(config, vocab)
    constraint = None
    if config.constraint is not None:
        constraint = compile_constraint(tokenizer, config.constraint, vocab)
    return decode(
        TorchBackend(model),
        tokenizer.encode_batch(batch) if batch else [],
        config,
        eos_token_id=model.config.eos_token_id,
        n_ctx=model.config.n_positions,
        detokenize=tokenizer.decode,
        constraint=constraint,
    )
