"""Progress bars for long work: tqdm on a terminal, nothing otherwise. Torch-free.

A bar is shown only when asked for (the CLI's ``--quiet`` turns it off) and stderr is a
terminal, so logs, pipes and CI output stay clean. tqdm comes with the ``export`` extra; a
runtime-only install without it runs the same code with no bar.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def shown(enabled: bool) -> bool:
    """Whether a bar asked for with ``enabled`` is drawn here."""
    if not enabled or not sys.stderr.isatty():
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """A tqdm bar (``shown``) or a silent stand-in with the same few methods."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        enabled: bool,
        desc: str,
        total: int | None = None,
        unit: str = "it",
    ) -> None:
        self.iterable = iterable
        self.bar = None
        if shown(enabled):
            from tqdm import tqdm

            self.bar = tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.bar if self.bar is not None else self.iterable or ())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def stage(self, name: str) -> None:
        """Name the step now running (the stage bar of a pipeline)."""
        if self.bar is not None:
            self.bar.set_description(name)

    def set_postfix(self, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def log(self, fn: Callable[[str], object], message: str) -> None:
        """Call ``fn(message)`` (a print) without tearing the bar."""
        if self.bar is None:
            fn(message)
            return
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):
            fn(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
