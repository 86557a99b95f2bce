"""The native TensorRT backend: a prebuilt engine (``gpt2-edge build-engine``) run with
cuda-python. Torch-free; ``tensorrt`` and ``cuda-python`` are imported when a backend is made,
never when this module is imported (``runtime.backends`` imports it at the top).

One deserialized engine is shared by every caller. Each KV cache gets its own ``EngineRunner``
(``runner.py``) on one *lane* of the engine: an execution context holding its own optimization
profiles, and a CUDA stream. ``--lanes N`` at build time lets N caches run at once; a further
cache waits up to ``lane_timeout_s`` for a lane to come free.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, sha256_file
from ..kv_cache import ConcatCache
from ..types import Capabilities
from . import api
from .cuda import Cuda
from .errors import EngineError
from .plan import check_compatible, engine_bundle, locate_engine, read_manifest
from .runner import EngineRunner, Lane


class TrtEngineBackend:
    """A TensorRT engine shared by every caller; each cache runs on its own lane.

    >>> backend = TrtEngineBackend("out/bundle")          # BUNDLE/engines/<this GPU>/ or an engine dir
    >>> Generator(backend, backend.bundle.tokenizer(), backend.bundle.eos_token_id, backend.n_ctx)
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

        io = {t.name: t for t in api.io_tensors(trt, self.engine)}
        want_in = [s.name for s in self.bundle.inputs]
        want_out = [s.name for s in self.bundle.outputs]
        got_in = [n for n, t in io.items() if t.is_input]
        got_out = [n for n, t in io.items() if not t.is_input]
        if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
            raise EngineError(
                f"{plan_file}'s inputs/outputs differ from {self.bundle.path}'s bundle.json; "
                "rebuild the engine"
            )
        self.io = io
        self.past_names = [n for n in want_in if n.startswith("past_key_values.")]
        self.present_names = ["present." + n[len("past_key_values.") :] for n in self.past_names]
        if any(n not in io for n in self.present_names):
            raise EngineError(
                f"{plan_file} lacks present outputs matching its past inputs; rebuild the engine"
            )
        self.kv_dtype = io[self.past_names[0]].dtype
        self.logits_dtype = io["logits"].dtype
        d = self.bundle.dims
        self.n_head, self.head_size, self.vocab = d.n_head, d.head_size, d.vocab_size
        self.max_batch = self.manifest.max_batch
        self.n_ctx = min(self.bundle.context_length, self.manifest.max_context)
        self.pad_id = self.bundle.eos_token_id if self.bundle.eos_token_id is not None else 0
        self.prefill_chunk = max(
            (p.shapes["input_ids"].opt[1] for p in self.manifest.profiles if p.phase == "prefill"),
            default=self.n_ctx,
        )
        self.lane_timeout_s = lane_timeout_s
        self._lock = threading.Condition()
        self._lanes: dict[int, Lane] = {}
        self._free = list(range(self.manifest.lanes))

    @classmethod
    def from_path(cls, path: str | Path, **options: Any) -> TrtEngineBackend:
        return cls(path, **options)

    # lanes ------------------------------------------------------------------------------------
    def _acquire_lane(self) -> Lane:
        with self._lock:
            if not self._lock.wait_for(lambda: bool(self._free), timeout=self.lane_timeout_s):
                raise EngineError(
                    f"all {self.manifest.lanes} lane(s) of {self.engine_dir} stayed busy for "
                    f"{self.lane_timeout_s:.0f} s (one per live KV cache: a generate call, an unfinished "
                    "stream, the server); finish or drop one, or rebuild with more `--lanes`"
                )
            index = self._free.pop(0)
            lane = self._lanes.get(index)
            if lane is None:
                lane = self._lanes[index] = self._make_lane(index)
            return lane

    def _make_lane(self, index: int) -> Lane:
        context = self.engine.create_execution_context()
        if context is None:
            raise EngineError(
                f"TensorRT could not create an execution context for {self.engine_dir} (out of GPU memory?); "
                "rebuild with a smaller --max-batch / --max-context, or free GPU memory"
            )
        stream = self.cuda.stream()
        profiles = [k for k, p in enumerate(self.manifest.profiles) if p.lane == index]
        return Lane(index, profiles, context, stream, self.cuda.handle(stream))

    def _release_lane(self, lane: Lane) -> None:
        with self._lock:
            self._free.append(lane.index)
            self._lock.notify()

    # the Backend protocol ---------------------------------------------------------------------
    def new_cache(self, n_slots: int, capacity: int) -> ConcatCache:
        """A KV cache of ``n_slots`` sequences of up to ``capacity`` tokens, on its own lane."""
        if n_slots > self.max_batch:
            raise EngineError(
                f"{n_slots} sequences at once (batch rows or beams) exceed the engine's --max-batch "
                f"{self.max_batch}; rebuild with `gpt2-edge build-engine {self.bundle.path} --max-batch "
                f"{n_slots}`"
            )
        if capacity > self.n_ctx:
            raise EngineError(
                f"{capacity} tokens per sequence exceed the engine's --max-context {self.n_ctx}; rebuild "
                f"with `gpt2-edge build-engine {self.bundle.path} --max-context "
                f"{min(capacity, self.bundle.context_length)}`"
            )
        return ConcatCache(EngineRunner(self, n_slots, capacity), n_slots, capacity)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits ``(B, T, V)`` from an empty cache (perplexity, parity)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        B, T = input_ids.shape
        runner = EngineRunner(self, B, T)
        try:
            return runner.full_logits(input_ids)
        finally:
            runner.close()

    def close(self) -> None:
        """Free the lanes' contexts and streams (runners still open keep theirs)."""
        with self._lock:
            for i in list(self._free):
                lane = self._lanes.pop(i, None)
                if lane is not None:
                    self.cuda.destroy_stream(lane.stream)
                    del lane.context
