"""``EngineError``, the error of the TensorRT engine path (run and build alike).

Its own module because ``shapes`` (limits, ranges) and ``plan`` (the manifest, which holds
profiles) both raise it, and ``plan`` imports ``shapes``.
"""

from __future__ import annotations

from ...errors import Gpt2EdgeError


class EngineError(Gpt2EdgeError):
    """An engine cannot be built or used here; the message says what to run instead."""
