"""PEFT LoRA adapters for the tiny test model, made with PEFT itself (torch, transformers, peft).

Imports without them: the functions import them when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGETS = ["c_attn", "c_proj", "c_fc"]


def make_peft_adapter(
    checkpoint: Path, out: Path, seed: int = 1, r: int = 4, alpha: float = 8.0, **config: Any
) -> Path:
    """A PEFT LoRA adapter on the HF twin of ``checkpoint``, with random non-zero A and B (PEFT
    starts B at zero, which would make the adapter a no-op), saved to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(str(checkpoint))
    config.setdefault("target_modules", TARGETS)
    lcfg = LoraConfig(r=r, lora_alpha=alpha, fan_in_fan_out=True, lora_dropout=0.0, **config)
    model = get_peft_model(base, lcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    return out


def peft_merged(checkpoint: Path, adapter: Path):
    """PEFT's own merge: the HF model with ``adapter`` loaded and ``merge_and_unload``ed (eval)."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(str(checkpoint))
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def edit_config(adapter: Path, **changes: Any) -> None:
    """Change keys of an adapter's adapter_config.json in place."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
