"""Measurement helpers shared by ``gpt2-edge bench`` and ``benchmarks/``: written once.

Timings on a shared machine drift, so comparisons interleave their subjects round by round and
report the median of per-round figures with their spread (``summary``).
"""

from __future__ import annotations

import math
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


def ratios(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> list[float]:
    """Round by round ``a / b`` of two subjects measured in the same rounds; a round where either
    is missing (``None``) or ``b`` is 0 is left out."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} rounds against {len(denominators)}: the rounds must pair")
    return [a / b for a, b in zip(numerators, denominators, strict=True) if a is not None and b]


def ratio_summary(
    numerators: Sequence[float | None], denominators: Sequence[float | None]
) -> tuple[float, float, float]:
    """Median, minimum and maximum of the per-round ratios ``a / b`` (``ratios``): both sides of each
    ratio saw the same round's load, which a ratio of the two medians does not promise."""
    return summary(ratios(numerators, denominators))


def geometric_mean(values: Sequence[float]) -> float:
    """The geometric mean: how two ratios measured in opposite orders combine (a bias that makes the
    second of a pair faster multiplies one and divides the other, and cancels)."""
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"a geometric mean needs positive values, got {list(values)}")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile (inclusive method); one value is all three."""
    if not values:
        raise ValueError("no values to summarise")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3
