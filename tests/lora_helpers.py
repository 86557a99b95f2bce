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


def write_adapter(
    out: Path,
    n_layer: int = 2,
    n_embd: int = 64,
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 1,
    targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
) -> Path:
    """A PEFT-layout LoRA adapter written with numpy alone (the torch-free tests' adapters): the
    files and keys PEFT's ``save_pretrained`` writes for GPT-2, random A and B."""
    import numpy as np
    from safetensors.numpy import save_file

    from gpt2_edge.contract import LORA_TARGETS

    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(n_layer):
        for t in targets:
            fan_in, fan_out = (k * n_embd for k in LORA_TARGETS[t])
            key = f"base_model.model.transformer.h.{i}.{t}"
            tensors[f"{key}.lora_A.weight"] = (0.2 * rng.standard_normal((r, fan_in))).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (0.2 * rng.standard_normal((fan_out, r))).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "fan_in_fan_out": True,
        "target_modules": sorted({t.split(".")[1] for t in targets}),
        "bias": "none",
        "modules_to_save": None,
        "use_rslora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def edit_config(adapter: Path, **changes: Any) -> None:
    """Change keys of an adapter's adapter_config.json in place."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
