"""Merge a LoRA adapter (``runtime.lora.Adapter``, already checked) into the reference model's weights.

The reference model's projections are ``nn.Linear`` (``[out, in]``), so each adapted weight gains
``scale * B @ A`` as it is: no transpose (PEFT's ``fan_in_fan_out`` transposes for GPT-2's Conv1D,
which stores ``[in, out]``). Computed in float32, as PEFT's ``merge_and_unload`` does.
"""

from __future__ import annotations

import torch

from ..errors import Gpt2EdgeError
from ..runtime.lora import Adapter
from .gpt import GPT


def merge_adapter(model: GPT, adapter: Adapter) -> GPT:
    """Add ``adapter``'s change to ``model``'s weights in place; returns ``model``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module, lora in adapter.modules.items():
            w = params.get(f"transformer.{module}.weight")
            delta = torch.from_numpy(lora.b) @ torch.from_numpy(lora.a) * lora.scale
            if w is None or w.shape != delta.shape:
                raise Gpt2EdgeError(
                    f"adapter {adapter.name!r}: {module} is {list(delta.shape)}, the model's is "
                    f"{None if w is None else list(w.shape)}"
                )
            w.add_(delta.to(w.dtype))
    return model
