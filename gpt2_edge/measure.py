"""Measurement helpers shared by ``gpt2-edge bench`` and ``benchmarks/``: written once.

Timings on a shared machine drift, so comparisons interleave their subjects round by round and
report the median of per-round figures with their spread (``summary``).
"""

from __future__ import annotations

import resource
import statistics
from collections.abc import Sequence
from pathlib import Path


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """Peak resident set (Linux ``VmHWM``) of process ``pid`` (default: this one), MiB; ``None``
    where /proc has no such line. For this process off Linux, ``getrusage``'s peak."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return None


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum of a measurement's rounds."""
    if not values:
        raise ValueError("no values to summarise")
    return statistics.median(values), min(values), max(values)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]
