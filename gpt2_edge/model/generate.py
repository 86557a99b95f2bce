"""Reference generation: the shared decode loop over the PyTorch model (the runtime's oracle)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..runtime.generator import GenerationResult, decode
from ..runtime.sampling import GenerationConfig
from .gpt import GPT, KV
from .tokenizer import Tokenizer


class TorchBackend:
    """Runs ``GPT`` one step at a time, keeping the present KV as the next past."""

    def __init__(self, model: GPT) -> None:
        self.model = model.eval()
        self.past: list[KV] | None = None

    def start(self, batch_size: int) -> None:
        self.past = None

    def reorder(self, rows: np.ndarray) -> None:
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        self.past = [(k[idx], v[idx]) for k, v in self.past or []]

    @torch.no_grad()
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        logits, self.past = self.model(
            torch.from_numpy(input_ids),
            torch.from_numpy(attention_mask),
            torch.from_numpy(position_ids),
            self.past,
        )
        return logits[:, -1].float().numpy()


def generate(
    model: GPT, tokenizer: Tokenizer, prompts: str | Sequence[str], config: GenerationConfig
) -> list[GenerationResult]:
    """Continue one prompt or a batch with the reference model."""
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    return decode(
        TorchBackend(model),
        tokenizer.encode_batch(batch) if batch else [],
        config,
        eos_token_id=model.config.eos_token_id,
        n_ctx=model.config.n_positions,
        detokenize=tokenizer.decode,
    )
