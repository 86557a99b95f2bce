"""What the server serves: one backend (any provider), its tokenizer, eos id, context and name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runtime.backends import load_backend
from ..runtime.types import Backend


class ServedModel:
    """A backend (shared by the scheduler and prompt scoring; thread-safe), its tokenizer, eos id,
    the tokens one sequence may hold (``n_ctx``) and the id clients call it by."""

    def __init__(
        self, backend: Backend, tokenizer: Any, eos_token_id: int | None, n_ctx: int, name: str
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.n_ctx = n_ctx
        self.name = name
        self.vocab_size: int = tokenizer.vocab_size
        # No text longer than this fits the context, whatever it tokenizes to: a prompt or a
        # /tokenize text is refused by its length before any tokenizing (a 1 MB body stays cheap).
        self.max_prompt_chars: int = n_ctx * tokenizer.max_token_bytes

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        name: str | None = None,
        verify: bool = True,
        **options: Any,
    ) -> ServedModel:
        """Load and verify the bundle at ``path`` on ``provider`` (any of
        ``runtime.backends.PROVIDERS``: ONNX Runtime's cpu, cuda, tensorrt, auto, or the native
        TensorRT engine, trt-engine); ``options`` go to the backend (``load_backend``)."""
        backend: Any = load_backend(path, provider, threads=threads, verify=verify, **options)
        bundle = backend.bundle
        return cls(backend, bundle.tokenizer(), bundle.eos_token_id, backend.n_ctx, name or bundle.path.name)
