"""gpt2-edge: GPT-2 from a PyTorch checkpoint to ONNX, quantized variants and a torch-free runtime.

``from gpt2_edge import Generator, GenerationConfig`` is the runtime's front door (``load_model``
gives the ``Model`` it, the server and every command build on; ``Constraint`` says what the output
must match). The names are
loaded on first use, so importing the package costs nothing and never pulls in torch.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The small GPT-2 shipped with the package: every command's model when none is given.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

_LAZY = {
    "Generator": "gpt2_edge.runtime.generator",
    "GenerationConfig": "gpt2_edge.runtime.sampling",
    "Constraint": "gpt2_edge.runtime.constraints",
    "Bundle": "gpt2_edge.runtime.bundle",
    "Tokenizer": "gpt2_edge.runtime.tokenizer",
    "Model": "gpt2_edge.runtime.loader",
    "load_model": "gpt2_edge.runtime.loader",
}
__all__ = [
    "DEFAULT_MODEL_DIR",
    "Bundle",
    "Constraint",
    "GenerationConfig",
    "Generator",
    "Model",
    "Tokenizer",
    "__version__",
    "load_model",
]

if TYPE_CHECKING:
    from .runtime.bundle import Bundle
    from .runtime.constraints import Constraint
    from .runtime.generator import Generator
    from .runtime.loader import Model, load_model
    from .runtime.sampling import GenerationConfig
    from .runtime.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'gpt2_edge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
