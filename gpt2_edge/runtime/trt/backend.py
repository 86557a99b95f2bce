"""The native TensorRT backend: a prebuilt engine (``gpt2-edge build-engine``) run with
cuda-python. Torch-free; ``tensorrt`` and ``cuda-python`` are imported when a backend is made,
never when this module is imported (``runtime.backends`` imports it at the top).

One deserialized engine is shared by every caller. Loading it checks the engine against this
machine and the bundle and freezes what running it needs into an ``EngineDescription``
(``description.py``). Each KV cache gets its own ``EngineRunner`` (``runner.py``) on one *lane* of
the engine from the backend's ``LanePool`` (``lanes.py``): an execution context holding its own
optimization profiles, and a CUDA stream. ``--lanes N`` at build time lets N caches run at once;
a further cache waits up to ``lane_timeout_s`` for a lane to come free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, sha256_file
from ..kv_cache import ConcatCache
from ..types import Capabilities
from . import api
from .cuda import Cuda
from .description import EngineDescription
from .errors import EngineError
from .lanes import LanePool
from .plan import check_compatible, engine_bundle, locate_engine, read_manifest
from .runner import EngineRunner


class TrtEngineBackend:
    """A TensorRT engine shared by every caller; each cache runs on its own lane.

    >>> backend = TrtEngineBackend("out/bundle")          # BUNDLE/engines/<this GPU>/ or an engine dir
    >>> model = load_model("out/bundle", provider="trt-engine")  # the same, with its tokenizer
    """

    # The engine's cache concatenates (no rollback) and its batch invariance is checked on the GPU
    # (scripts/gpu-check), not declared here.
    capabilities = Capabilities(provider="trt-engine", device="cuda")

    def __init__(
        self,
        path: str | Path,
        verify: bool = True,
        lane_timeout_s: float = 60.0,
        trt: Any = None,
        cuda: Any = None,
    ) -> None:
        """``path``: a bundle (its engine for this GPU is found under ``engines/``) or an engine
        directory. ``lane_timeout_s``: how long a new cache waits for a free lane when every lane
        is busy (build with ``--lanes N`` for N concurrent caches). ``trt``/``cuda`` default to
        the real modules (tests pass fakes)."""
        if trt is None:
            try:
                trt = api.import_tensorrt()
            except api.TensorRTMissingError as e:
                raise EngineError(str(e)) from None
        self.trt = trt
        self.cuda = cuda if cuda is not None else Cuda()
        gpu = self.cuda.device(0)
        trt_version = api.version(trt)
        self.engine_dir = locate_engine(path, gpu, trt_version)
        self.manifest = read_manifest(self.engine_dir)
        bundle_dir = Path(path) if (Path(path) / "bundle.json").is_file() else None
        self.bundle = Bundle.load(bundle_dir or engine_bundle(self.engine_dir, self.manifest), verify=verify)
        check_compatible(self.manifest, trt_version, gpu, self.bundle, self.engine_dir)

        plan_file = self.engine_dir / self.manifest.plan["file"]
        if not plan_file.is_file() or plan_file.stat().st_size != self.manifest.plan["bytes"]:
            raise EngineError(f"{plan_file} is missing or truncated; rebuild the engine")
        if verify and sha256_file(plan_file) != self.manifest.plan["sha256"]:
            raise EngineError(f"{plan_file} does not match its sha256 in engine.json; rebuild the engine")
        self._logger = api.make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan_file.read_bytes())
        if self.engine is None:
            said = "; ".join(m for _, m in self._logger.messages[-3:])
            raise EngineError(f"TensorRT could not load {plan_file} ({said}); rebuild it on this machine")
        if int(self.engine.num_optimization_profiles) != len(self.manifest.profiles):
            raise EngineError(
                f"{plan_file} has {self.engine.num_optimization_profiles} profiles, engine.json lists "
                f"{len(self.manifest.profiles)}: the files are from different builds; rebuild the engine"
            )

        self.description = EngineDescription.of(
            self.bundle, self.manifest, api.io_tensors(trt, self.engine), plan_file
        )
        self.n_ctx = self.description.n_ctx
        self.lanes = LanePool(
            self.engine,
            self.cuda,
            self.description.profiles,
            self.manifest.lanes,
            lane_timeout_s,
            str(self.engine_dir),
            self._logger,
        )

    # the Backend protocol ---------------------------------------------------------------------
    def new_cache(self, n_slots: int, capacity: int) -> ConcatCache:
        """A KV cache of ``n_slots`` sequences of up to ``capacity`` tokens, on its own lane."""
        max_batch = self.description.max_batch
        if n_slots > max_batch:
            raise EngineError(
                f"{n_slots} sequences at once (batch rows or beams) exceed the engine's --max-batch "
                f"{max_batch}; rebuild with `gpt2-edge build-engine {self.bundle.path} --max-batch "
                f"{n_slots}`"
            )
        if capacity > self.n_ctx:
            raise EngineError(
                f"{capacity} tokens per sequence exceed the engine's --max-context {self.n_ctx}; rebuild "
                f"with `gpt2-edge build-engine {self.bundle.path} --max-context "
                f"{min(capacity, self.bundle.context_length)}`"
            )
        return ConcatCache(EngineRunner(self.description, self.lanes, n_slots, capacity), n_slots, capacity)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits ``(B, T, V)`` from an empty cache (perplexity, parity)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        B, T = input_ids.shape
        runner = EngineRunner(self.description, self.lanes, B, T)
        try:
            return runner.full_logits(input_ids)
        finally:
            runner.close()

    def close(self) -> None:
        """Free the lanes' contexts and streams (runners still open keep theirs)."""
        self.lanes.close()
