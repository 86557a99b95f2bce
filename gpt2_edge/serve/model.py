"""What the server serves: a runtime ``Model`` (``runtime.load_model``, the one loader), loaded with
the server's settings. The model declares what the server must know (``Model.capabilities``: step
invariance, why rows may not be batch-invariant); the server asks, it never judges the backend."""

from __future__ import annotations

from pathlib import Path

from ..runtime.loader import Model, load_model
from .settings import ServeSettings

__all__ = ["Model", "load_served_model"]


def load_served_model(bundle: str | Path, settings: ServeSettings) -> Model:
    """Load ``bundle`` as ``settings`` say (provider, threads, name, draft model, step invariance,
    LoRA adapters)."""
    return load_model(
        bundle,
        settings.provider,
        threads=settings.threads,
        name=settings.model_name,
        draft=settings.draft,
        draft_tokens=settings.draft_tokens,
        step_invariant=settings.step_invariance(),
        lora=settings.lora_adapters() or None,
    )
