"""The native TensorRT backend: a prebuilt engine (``gpt2-edge build-engine``) run with
cuda-python. Torch-free; ``tensorrt`` and ``cuda-python`` are imported when it is made.

One deserialized engine is shared by every caller. Each KV cache (``new_cache``: a ``generate``
call, or the server's scheduler) gets its own ``EngineRunner``: one *lane* of the engine (an
execution context holding its own optimization profiles, and a CUDA stream) and device buffers
allocated once for the cache's largest shapes:

    inputs    input_ids / position_ids [B, chunk]   attention_mask [B, T]    (+ pinned host copies)
    KV set 0  past/present per layer [B, H, T, D]  ┐ a step reads its past from one set and writes
    KV set 1  past/present per layer [B, H, T, D]  ┘ its present into the other: the sets swap
    logits    [B, chunk, V] on the device; only [B, V] (each row's last position) comes back

A tensor of shape [b, H, t, D] is dense at the start of its buffer whatever the buffer's size, so
step n's present is bound unchanged as step n+1's past: no copy, no reallocation. The cache's
slot bookkeeping (joins, releases, beam reorders) is the shared ``ConcatCache``; it sees the
presents as opaque handles, and the rare re-padding of a batch goes through the host.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, sha256_file
from .kv_cache import ConcatCache


@dataclass(frozen=True)
class DeviceKV:
    """A present tensor left on the device, in one of a runner's two KV sets."""

    owner: int  # id of the runner
    kv_set: int
    index: int  # position among the past/present tensors
    shape: tuple[int, int, int, int]
    generation: int  # the set's write count when this was made: a later write invalidates it


@dataclass(frozen=True)
class HostKV:
    """A past tensor the cache rebuilt on the host (a slot joined, left, or beams reordered)."""

    array: np.ndarray


@dataclass
class _Buffer:
    ptr: int
    nbytes: int


@dataclass
class _Lane:
    """One execution context with its own profiles (TensorRT: a profile serves one context at a
    time) and the stream its steps run on."""

    index: int
    profiles: list[int]
    context: Any
    stream: Any
    handle: int
    active: int = -1  # the profile selected on the context


class TrtEngineBackend:
    """A TensorRT engine shared by every caller; each cache runs on its own lane.

    >>> backend = TrtEngineBackend("out/bundle")          # BUNDLE/engines/<this GPU>/ or an engine dir
    >>> Generator(backend, backend.bundle.tokenizer(), backend.bundle.eos_token_id, backend.n_ctx)
    """

    provider = "trt-engine"
    device = "cuda"

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
        from ..engine import trt_api
        from ..engine.cuda import Cuda
        from ..engine.tensorrt import (
            EngineError,
            check_compatible,
            engine_bundle,
            locate_engine,
            read_manifest,
        )

        if trt is None:
            try:
                trt = trt_api.import_tensorrt()
            except trt_api.TensorRTMissingError as e:
                raise EngineError(str(e)) from None
        self.trt = trt
        self.cuda = cuda if cuda is not None else Cuda()
        gpu = self.cuda.device(0)
        trt_version = trt_api.version(trt)
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
        self._logger = trt_api.make_logger(trt)
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

        io = {t.name: t for t in trt_api.io_tensors(trt, self.engine)}
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
        self.n_head, self.head_size, self.vocab = d["n_head"], d["head_size"], d["vocab_size"]
        self.max_batch = self.manifest.max_batch
        self.n_ctx = min(self.bundle.context_length, self.manifest.max_context)
        self.pad_id = self.bundle.eos_token_id if self.bundle.eos_token_id is not None else 0
        self.prefill_chunk = max(
            (p.shapes["input_ids"].opt[1] for p in self.manifest.profiles if p.phase == "prefill"),
            default=self.n_ctx,
        )
        self.lane_timeout_s = lane_timeout_s
        self._lock = threading.Condition()
        self._lanes: dict[int, _Lane] = {}
        self._free = list(range(self.manifest.lanes))

    @classmethod
    def from_path(cls, path: str | Path, **options: Any) -> TrtEngineBackend:
        return cls(path, **options)

    # lanes ------------------------------------------------------------------------------------
    def _acquire_lane(self) -> _Lane:
        from ..engine.tensorrt import EngineError

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

    def _make_lane(self, index: int) -> _Lane:
        from ..engine.tensorrt import EngineError

        context = self.engine.create_execution_context()
        if context is None:
            raise EngineError(
                f"TensorRT could not create an execution context for {self.engine_dir} (out of GPU memory?); "
                "rebuild with a smaller --max-batch / --max-context, or free GPU memory"
            )
        stream = self.cuda.stream()
        profiles = [k for k, p in enumerate(self.manifest.profiles) if p.lane == index]
        return _Lane(index, profiles, context, stream, self.cuda.handle(stream))

    def _release_lane(self, lane: _Lane) -> None:
        with self._lock:
            self._free.append(lane.index)
            self._lock.notify()

    # the Backend protocol ---------------------------------------------------------------------
    def new_cache(self, n_slots: int, capacity: int) -> ConcatCache:
        """A KV cache of ``n_slots`` sequences of up to ``capacity`` tokens, on its own lane."""
        from ..engine.tensorrt import EngineError

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


class EngineRunner:
    """One cache's lane and buffers: the ``ConcatRunner`` behind ``ConcatCache``."""

    def __init__(self, backend: TrtEngineBackend, n_slots: int, capacity: int) -> None:
        self.backend = backend
        self.cuda = backend.cuda
        self.pad_id = backend.pad_id
        self._n_kv = len(backend.past_names)
        self._bufs: dict[str, _Buffer] = {}
        self._kv: list[list[_Buffer]] = [[], []]
        self._host: dict[str, tuple[np.ndarray, int]] = {}
        self._cap = (0, 0, 0)  # batch, new tokens, total tokens the buffers hold
        self._gen = [0, 0]  # writes into each KV set
        self._newest: int | None = None  # the set written last
        self._shape: list[tuple[int, int, int, int] | None] = [None, None]  # its presents' shape
        # Presents copied to the host before their set was reused (a chunked prompt joining a
        # running batch needs both sets): kv_set -> (generation, arrays); handles still read them.
        self._spilled: dict[int, tuple[int, list[np.ndarray]]] = {}
        self.lane: _Lane | None = backend._acquire_lane()
        self._finalizer = weakref.finalize(
            self, EngineRunner._free_all, backend, self.lane, self._bufs, self._kv, self._host
        )
        self.allocations = 0  # device allocations made (tests: buffers are allocated once)
        self._reserve(n_slots, min(capacity, backend.prefill_chunk), capacity)

    # buffers ----------------------------------------------------------------------------------
    def _reserve(self, batch: int, seq: int, total: int) -> None:
        """Make the buffers hold ``batch`` x ``seq`` new tokens over ``total`` tokens; the KV sets'
        contents survive a growth (their dense prefix is copied)."""
        from ..engine.cuda import CudaError
        from ..engine.tensorrt import EngineError

        cb, cs, ct = self._cap
        if batch <= cb and seq <= cs and total <= ct:
            return
        b = self.backend
        nb, ns, nt = max(batch, cb), max(seq, cs), max(total, ct)
        ids_dt = b.io["input_ids"].dtype
        mask_dt = b.io["attention_mask"].dtype
        pos_dt = b.io["position_ids"].dtype
        kv_bytes = nb * b.n_head * nt * b.head_size * b.kv_dtype.itemsize
        sizes = {
            "input_ids": nb * ns * ids_dt.itemsize,
            "position_ids": nb * ns * pos_dt.itemsize,
            "attention_mask": nb * nt * mask_dt.itemsize,
            "logits": nb * ns * b.vocab * b.logits_dtype.itemsize,
        }
        stream = self.lane.stream
        try:
            for name, nbytes in sizes.items():
                old = self._bufs.get(name)
                if old is None or old.nbytes < nbytes:
                    self._bufs[name] = _Buffer(self.cuda.malloc(nbytes), nbytes)
                    self.allocations += 1
                    if old is not None:
                        self.cuda.free(old.ptr)
            for s in (0, 1):
                for i in range(self._n_kv):
                    old = self._kv[s][i] if i < len(self._kv[s]) else None
                    if old is not None and old.nbytes >= kv_bytes:
                        continue
                    new = _Buffer(self.cuda.malloc(kv_bytes), kv_bytes)
                    self.allocations += 1
                    if old is None:
                        self._kv[s].append(new)
                    else:
                        self.cuda.dtod(new.ptr, old.ptr, old.nbytes, stream)
                        self.cuda.synchronize(stream)
                        self.cuda.free(old.ptr)
                        self._kv[s][i] = new
            for name, shape, dt in (
                ("input_ids", (nb * ns,), ids_dt),
                ("position_ids", (nb * ns,), pos_dt),
                ("attention_mask", (nb * nt,), mask_dt),
                ("logits", (nb, b.vocab), b.logits_dtype),
            ):
                old_host = self._host.get(name)
                if old_host is None or old_host[0].size < int(np.prod(shape)):
                    self._host[name] = self.cuda.pinned(shape, dt)
                    if old_host is not None:
                        self.cuda.free_pinned(old_host[1])
        except CudaError as e:
            total_mib = (sum(sizes.values()) + 2 * self._n_kv * kv_bytes) / 2**20
            raise EngineError(
                f"allocating {total_mib:.0f} MiB of buffers for {nb} sequences x {nt} tokens failed ({e}); "
                "use fewer sequences or a shorter context, or free GPU memory"
            ) from None
        self._cap = (nb, ns, nt)

    @staticmethod
    def _free_all(backend: TrtEngineBackend, lane: _Lane | None, bufs: dict, kv: list, host: dict) -> None:
        cuda = backend.cuda
        try:
            if lane is not None:
                cuda.synchronize(lane.stream)
            for buf in list(bufs.values()) + [x for s in kv for x in s]:
                cuda.free(buf.ptr)
            for _, ptr in host.values():
                cuda.free_pinned(ptr)
        except Exception:  # at interpreter exit the CUDA context may already be gone
            pass
        bufs.clear()
        kv[0].clear()
        kv[1].clear()
        host.clear()
        if lane is not None:
            backend._release_lane(lane)

    def close(self) -> None:
        """Free the buffers and give the lane back (also done when the runner is collected)."""
        self._finalizer()
        self.lane = None

    # the ConcatRunner protocol ----------------------------------------------------------------
    def run(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any] | None
    ) -> tuple[np.ndarray, list[Any]]:
        """Last-position logits ``(B, V)`` and the presents (handles into a KV set). A prompt
        longer than the prefill chunk runs in chunks, each over the presents of the one before."""
        S = ids.shape[1]
        P = mask.shape[1] - S
        chunk = self.backend.prefill_chunk
        if past is not None:
            self._spilled.clear()  # the caller has moved on to this past: older presents are dropped
        if S <= chunk:
            logits, presents = self._forward(ids, mask, pos, past, "last")
            assert logits is not None
            return logits, presents
        if past is None and self._newest is not None:
            # The chunks ping-pong between both sets; keep the newest presents (a running batch
            # this prompt joins) readable on the host. The join reads them there anyway.
            self._spill(self._newest)
        start, presents, logits = 0, past, None
        while start < S:
            end = min(S, start + chunk)
            logits, presents = self._forward(
                ids[:, start:end],
                mask[:, : P + end],
                pos[:, start:end],
                presents,
                "last" if end == S else None,
            )
            start = end
        assert logits is not None and presents is not None
        return logits, presents

    def full_logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits at every position ``(B, T, V)`` of unpadded sequences, chunk by chunk."""
        B, T = ids.shape
        mask = np.ones((B, T), np.int64)
        pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
        out = np.empty((B, T, self.backend.vocab), np.float32)
        presents = None
        for start in range(0, T, self.backend.prefill_chunk):
            end = min(T, start + self.backend.prefill_chunk)
            chunk_logits, presents = self._forward(
                ids[:, start:end], mask[:, :end], pos[:, start:end], presents, "all"
            )
            out[:, start:end] = chunk_logits
        return out

    def to_numpy(self, value: Any) -> np.ndarray:
        if isinstance(value, HostKV):
            return value.array
        where = self._resolve(value)
        if isinstance(where, np.ndarray):
            return where
        return self._download(where, value.index, value.shape)

    def _download(self, kv_set: int, index: int, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty(shape, self.backend.kv_dtype)
        self.cuda.dtoh(out, self._kv[kv_set][index].ptr, self.lane.stream)
        self.cuda.synchronize(self.lane.stream)
        return out

    def _spill(self, kv_set: int) -> None:
        shape = self._shape[kv_set]
        if shape is not None:
            arrays = [self._download(kv_set, i, shape) for i in range(self._n_kv)]
            self._spilled[kv_set] = (self._gen[kv_set], arrays)

    def from_numpy(self, array: np.ndarray) -> HostKV:
        return HostKV(np.ascontiguousarray(array, dtype=self.backend.kv_dtype))

    # one engine run ---------------------------------------------------------------------------
    def _resolve(self, h: Any) -> int | np.ndarray:
        """Where a present handle's data is: its KV set (on the device), or its spilled host copy."""
        from ..engine.tensorrt import EngineError

        if not isinstance(h, DeviceKV) or h.owner != id(self):
            raise EngineError(f"a KV tensor from another cache or runner was passed in ({type(h).__name__})")
        if h.generation == self._gen[h.kv_set]:
            return h.kv_set
        spilled = self._spilled.get(h.kv_set)
        if spilled is not None and spilled[0] == h.generation:
            return spilled[1][h.index]
        raise EngineError("a KV tensor was used after a later step overwrote it (stale handle)")

    def _profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        from ..engine.tensorrt import EngineError, rebuild_command

        profiles = self.backend.manifest.profiles
        order = sorted(
            self.lane.profiles,
            key=lambda k: profiles[k].phase != ("decode" if shapes["input_ids"][1] == 1 else "prefill"),
        )
        for k in order:
            if profiles[k].admits(shapes):
                return k
        m = self.backend.manifest
        raise EngineError(
            f"shapes {shapes['input_ids']} (new tokens) / {shapes['attention_mask']} (total) are outside "
            "the engine's "
            f"profiles (batch <= {m.max_batch}, context <= {m.max_context}); rebuild: "
            f"`{rebuild_command(self.backend.bundle.path)} --max-batch N --max-context L`"
        )

    def _forward(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any] | None, copy: str | None
    ) -> tuple[np.ndarray | None, list[DeviceKV]]:
        from ..engine.tensorrt import EngineError

        b, cuda, lane = self.backend, self.cuda, self.lane
        if lane is None:
            raise EngineError("this cache was closed")
        B, S = ids.shape
        T = mask.shape[1]
        P = T - S
        kv_shape = (B, b.n_head, P, b.head_size)
        shapes = {"input_ids": (B, S), "attention_mask": (B, T), "position_ids": (B, S)}
        shapes.update({n: kv_shape for n in b.past_names})
        profile = self._profile_for(shapes)
        self._reserve(B, S, T)

        # Which KV set the past is read from and which the present goes to: never the one holding
        # the newest presents unless they are this step's past (the cache may still read them).
        uploads: list[np.ndarray] = []
        if past is None:
            out_set = 1 - self._newest if self._newest is not None else 1
            in_set = 1 - out_set
        else:
            if len(past) != self._n_kv:
                raise EngineError(f"{len(past)} past tensors given, the model has {self._n_kv}")
            where = [self._resolve(h) if isinstance(h, DeviceKV) else h.array for h in past]
            for i, h in enumerate(past):
                shape = h.shape if isinstance(h, DeviceKV) else h.array.shape
                if shape != kv_shape or (isinstance(h, DeviceKV) and h.index != i):
                    raise EngineError(f"past tensor {i} has shape {shape}, this step needs {kv_shape}")
            if all(isinstance(w, int) for w in where) and len(set(where)) == 1:
                in_set = int(where[0])  # the usual step: the last step's presents, still on the device
                out_set = 1 - in_set
            else:  # rebuilt on the host (a join, release or reorder), or spilled: upload
                uploads = [
                    w if isinstance(w, np.ndarray) else self._download(w, i, kv_shape)
                    for i, w in enumerate(where)
                ]
                in_set = 1 - self._newest if self._newest is not None else 0
                out_set = 1 - in_set
                self._gen[in_set] += 1
        self._gen[out_set] += 1
        self._newest = out_set
        self._shape[out_set] = (B, b.n_head, T, b.head_size)

        ctx, stream = lane.context, lane.stream
        if lane.active != profile:
            if not ctx.set_optimization_profile_async(profile, lane.handle):
                raise EngineError(f"TensorRT refused to switch to optimization profile {profile}")
            lane.active = profile
        for i, array in enumerate(uploads):
            cuda.htod(self._kv[in_set][i].ptr, array, stream)
        for name, value in (("input_ids", ids), ("position_ids", pos), ("attention_mask", mask)):
            host, _ = self._host[name]
            staged = host[: value.size].reshape(value.shape)
            staged[...] = value  # casts to the engine's integer type
            cuda.htod(self._bufs[name].ptr, staged, stream)
            self._set_input(ctx, name, value.shape, self._bufs[name].ptr)
        for i, (pname, oname) in enumerate(zip(b.past_names, b.present_names, strict=True)):
            self._set_input(ctx, pname, kv_shape, self._kv[in_set][i].ptr)
            ctx.set_tensor_address(oname, self._kv[out_set][i].ptr)
        ctx.set_tensor_address("logits", self._bufs["logits"].ptr)
        got = tuple(int(d) for d in ctx.get_tensor_shape("logits"))
        if got != (B, S, b.vocab):
            raise EngineError(f"the engine's logits shape is {got}, expected {(B, S, b.vocab)}")
        if not ctx.execute_async_v3(lane.handle):
            said = "; ".join(m for _, m in b._logger.messages[-3:])
            raise EngineError(f"TensorRT failed to run a step ({said or 'no message'})")

        logits = None
        row = S * b.vocab * b.logits_dtype.itemsize
        if copy == "last":
            host, _ = self._host["logits"]
            dst = host[:B]
            cuda.dtoh_rows(
                dst, self._bufs["logits"].ptr + row - b.vocab * b.logits_dtype.itemsize, row, stream
            )
            cuda.synchronize(stream)
            logits = dst.astype(np.float32, copy=True)  # the pinned buffer is reused next step
        elif copy == "all":
            full = np.empty((B, S, b.vocab), b.logits_dtype)
            cuda.dtoh(full, self._bufs["logits"].ptr, stream)
            cuda.synchronize(stream)
            logits = full.astype(np.float32, copy=False)
        else:
            cuda.synchronize(stream)  # the staged inputs are rewritten by the next step
        total_shape = (B, b.n_head, T, b.head_size)
        presents = [
            DeviceKV(id(self), out_set, i, total_shape, self._gen[out_set]) for i in range(self._n_kv)
        ]
        return logits, presents

    @staticmethod
    def _set_input(ctx: Any, name: str, shape: tuple[int, ...], ptr: int) -> None:
        from ..engine.tensorrt import EngineError

        if not ctx.set_input_shape(name, shape):
            raise EngineError(f"TensorRT refused shape {shape} for {name} (outside the active profile)")
        ctx.set_tensor_address(name, ptr)
