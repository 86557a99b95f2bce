"""Calibration and evaluation text: read, check, tokenize, cut into windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import Gpt2EdgeError


class CalibrationError(Gpt2EdgeError):
    """A calibration / evaluation text is unusable."""


def read_tokens(path: str | Path, tokenizer, min_tokens: int, what: str = "calibration") -> list[int]:
    """Token ids of a UTF-8 text file with at least ``min_tokens`` tokens."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{what} file {p} not found")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{what} file {p} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise CalibrationError(f"{what} file {p} is empty")
    ids = tokenizer.encode(text)
    if len(ids) < min_tokens:
        raise CalibrationError(
            f"{what} file {p} has {len(ids)} tokens; at least {min_tokens} are needed (give a longer text)"
        )
    return ids


def windows(ids: list[int], length: int, count: int) -> list[np.ndarray]:
    """``count`` windows of ``length`` tokens spread evenly over ``ids`` (shape (1, length) each)."""
    arr = np.asarray(ids, dtype=np.int64)
    length = min(length, len(arr))
    starts = np.linspace(0, len(arr) - length, num=max(1, count)).astype(int)
    return [arr[s : s + length][None, :] for s in sorted(set(starts.tolist()))]
