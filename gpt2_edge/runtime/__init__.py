"""Torch-free runtime: numpy + onnxruntime (or tensorrt) + tokenizers only.

``load_model(path, ...)`` (``runtime.loader``) gives the ``Model`` that ``Generator``, the server
and the CLI build on. The names load on first use: importing one runtime module (the tokenizer, the
manifest) does not import the others.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_LAZY = {
    "load_model": "gpt2_edge.runtime.loader",
    "Model": "gpt2_edge.runtime.loader",
    "Generator": "gpt2_edge.runtime.generator",
}
__all__ = ["Generator", "Model", "load_model"]

if TYPE_CHECKING:
    from .generator import Generator
    from .loader import Model, load_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpt2_edge.runtime' has no attribute {name!r}")
