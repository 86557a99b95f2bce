"""Give freed memory back between the stages of an export or a quantization, so each stage's peak
starts from what is still alive, not from the largest stage before it. Torch-free."""

from __future__ import annotations

import ctypes
import gc


def release_memory() -> bool:
    """Collect garbage, then hand the C heap's free pages back to the system (glibc's
    ``malloc_trim``): tensors of a few MiB (a gpt2-medium layer's weights) live in glibc's arenas,
    which keep freed blocks for reuse, so the process's resident size would stay at its peak.
    Returns whether ``malloc_trim`` ran (not off glibc)."""
    gc.collect()
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS, Windows: other allocators
            return False
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        return False
    return True
