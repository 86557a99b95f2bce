"""Give freed memory back between the stages of an export or a quantization, so each stage's peak
starts from what is still alive, not from the largest stage before it. Torch-free."""

from __future__ import annotations

import gc

from ..runtime.mapped import release_free_memory


def release_memory() -> bool:
    """Collect garbage, then hand the C heap's free pages back to the system (glibc's
    ``malloc_trim``, ``runtime.mapped.release_free_memory``): tensors of a few MiB (a gpt2-medium
    layer's weights) live in glibc's arenas, which keep freed blocks for reuse, so the process's
    resident size would stay at its peak. Returns whether ``malloc_trim`` ran (not off glibc)."""
    gc.collect()
    return release_free_memory()
