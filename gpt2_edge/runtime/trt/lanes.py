"""An engine's lanes and the pool that hands them out (``LanePool``).

A *lane* is one TensorRT execution context with its own optimization profiles (a profile serves
one context at a time) and the CUDA stream its steps run on. Each KV cache holds one lane while
it lives, so ``--lanes N`` at build time lets N caches run at once; a further cache waits up to
``timeout_s`` for a lane to come free. Lanes are made on first use and kept for the next cache.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .cuda import Cuda
from .errors import EngineError
from .shapes import Profile


@dataclass
class Lane:
    """One execution context with its own profiles and the stream its steps run on."""

    index: int
    profiles: list[int]
    context: Any
    stream: Any
    handle: int
    active: int = -1  # the profile selected on the context


class LanePool:
    """The lanes of one engine: ``acquire`` waits for a free one, ``release`` gives it back.

    ``engine`` makes the execution contexts (``create_execution_context``), ``cuda`` the streams;
    ``profiles`` says which lane each of the engine's profiles belongs to. ``logger`` (TensorRT's,
    with ``messages``) lets a failed step say what TensorRT said. ``where`` names the engine in
    messages.
    """

    def __init__(
        self,
        engine: Any,
        cuda: Cuda,
        profiles: Sequence[Profile],
        n_lanes: int,
        timeout_s: float,
        where: str,
        logger: Any = None,
    ) -> None:
        self.engine = engine
        self.cuda = cuda
        self.n_lanes = n_lanes
        self.timeout_s = timeout_s
        self.where = where
        self._profiles = [[k for k, p in enumerate(profiles) if p.lane == i] for i in range(n_lanes)]
        self._logger = logger
        self._lock = threading.Condition()
        self._lanes: dict[int, Lane] = {}
        self._free = list(range(n_lanes))

    @property
    def free(self) -> int:
        """Lanes no cache holds now."""
        with self._lock:
            return len(self._free)

    def acquire(self) -> Lane:
        """A free lane, made on first use; waits up to ``timeout_s`` while every lane is held."""
        with self._lock:
            if not self._lock.wait_for(lambda: bool(self._free), timeout=self.timeout_s):
                raise EngineError(
                    f"all {self.n_lanes} lane(s) of {self.where} stayed busy for {self.timeout_s:.0f} s "
                    "(one per live KV cache: a generate call, an unfinished stream, the server); finish or "
                    "drop one, or rebuild with more `--lanes`"
                )
            index = self._free.pop(0)
            lane = self._lanes.get(index)
            if lane is None:
                lane = self._lanes[index] = self._make(index)
            return lane

    def release(self, lane: Lane) -> None:
        with self._lock:
            self._free.append(lane.index)
            self._lock.notify()

    def _make(self, index: int) -> Lane:
        context = self.engine.create_execution_context()
        if context is None:
            raise EngineError(
                f"TensorRT could not create an execution context for {self.where} (out of GPU memory?); "
                "rebuild with a smaller --max-batch / --max-context, or free GPU memory"
            )
        stream = self.cuda.stream()
        return Lane(index, self._profiles[index], context, stream, self.cuda.handle(stream))

    def said(self) -> str:
        """The last few warnings and errors TensorRT logged ("" without a logger)."""
        if self._logger is None:
            return ""
        return "; ".join(m for _, m in self._logger.messages[-3:])

    def close(self) -> None:
        """Free the free lanes' contexts and streams (lanes still held keep theirs)."""
        with self._lock:
            for i in list(self._free):
                lane = self._lanes.pop(i, None)
                if lane is not None:
                    self.cuda.destroy_stream(lane.stream)
                    del lane.context
