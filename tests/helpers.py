"""What tests share besides fixtures: sample text, tiny configs, random models, server helpers.

Tests import these as ``from tests.helpers import ...``. This module imports without torch (so
do conftest.py and tests/bundles.py): ``random_gpt`` imports it when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gpt2_edge.model.config import GPTConfig

if TYPE_CHECKING:
    from gpt2_edge.model.gpt import GPT

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# A small public-domain text for the tiny tokenizer (no files needed).
SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
    "All:\nWe know't, we know't.\n\nFirst Citizen:\nLet us kill him, and we'll have corn at our own price.\n"
    "Is't a verdict?\n\nAll:\nNo more talking on't; let it be done: away, away!\n\n"
    "Second Citizen:\nOne word, good citizens.\n\nFirst Citizen:\nWe are accounted poor citizens, the "
    "patricians good. What authority surfeits on would relieve us: if they would yield us but the "
    "superfluity, while it were wholesome, we might guess they relieved us humanely.\n"
) * 4

# (n_layer, n_embd, n_head, vocab_size, n_positions): the configs parity tests sweep over.
TINY_CONFIGS = [
    (2, 64, 4, 300, 64),
    (1, 32, 2, 97, 40),
    (3, 48, 6, 128, 80),
]


def tiny_config(
    n_layer: int = 2, n_embd: int = 64, n_head: int = 4, vocab_size: int = 300, n_positions: int = 64
) -> GPTConfig:
    return GPTConfig(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )


def random_gpt(config: GPTConfig, seed: int = 0) -> GPT:
    """A random GPT with non-trivial biases and LayerNorm parameters (zeros would hide bugs)."""
    import torch

    from gpt2_edge.model.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def wait_healthy(proc, url: str, timeout_s: float, poll_s: float = 0.1) -> None:
    """Wait until a server started as ``proc`` answers ``url/health`` with 200; fail with its output
    if it exits or does not come up in ``timeout_s``."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"the server did not come up in {timeout_s:g} s"
        time.sleep(poll_s)
