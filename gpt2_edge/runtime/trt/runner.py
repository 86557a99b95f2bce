"""One KV cache's share of a TensorRT engine: its lane and device buffers (``EngineRunner``).

Each KV cache (``TrtEngineBackend.new_cache``: a ``generate`` call, or the server's scheduler)
gets its own runner: one *lane* of the engine (an execution context holding its own optimization
profiles, and a CUDA stream) and device buffers allocated once for the cache's largest shapes:

    inputs    input_ids / position_ids [B, chunk]   attention_mask [B, T]    (+ pinned host copies)
    KV set 0  past/present per layer [B, H, T, D]  ┐ a step reads its past from one set and writes
    KV set 1  past/present per layer [B, H, T, D]  ┘ its present into the other: the sets swap
    logits    [B, chunk, V] on the device; only [B, V] (each row's last position) comes back

A tensor of shape [b, H, t, D] is dense at the start of its buffer whatever the buffer's size, so
step n's present is bound unchanged as step n+1's past: no copy, no reallocation. The cache's
slot bookkeeping (joins, releases, beam reorders) is the shared ``ConcatCache``; it sees the
presents as opaque handles, and the rare re-padding of a batch goes through the host.

A runner is given the engine's frozen ``EngineDescription`` (``description.py``) and the
``LanePool`` it takes its lane from (``lanes.py``); it never sees the backend, so
``scripts/device-smoke.py`` drives one on a real GPU with a toy engine in TensorRT's place.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cuda import CudaError
from .description import EngineDescription
from .errors import EngineError
from .lanes import Lane, LanePool
from .plan import rebuild_command


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


class EngineRunner:
    """One cache's lane and buffers: the ``ConcatRunner`` behind ``ConcatCache``."""

    def __init__(self, desc: EngineDescription, lanes: LanePool, n_slots: int, capacity: int) -> None:
        self.desc = desc
        self.cuda = lanes.cuda
        self.pad_id = desc.pad_id
        self._lanes = lanes
        self._n_kv = len(desc.past_names)
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
        self.lane: Lane | None = lanes.acquire()
        self._finalizer = weakref.finalize(
            self, EngineRunner._free_all, lanes, self.lane, self._bufs, self._kv, self._host
        )
        self.allocations = 0  # device allocations made (tests: buffers are allocated once)
        self._reserve(n_slots, min(capacity, desc.prefill_chunk), capacity)

    # buffers ----------------------------------------------------------------------------------
    def _reserve(self, batch: int, seq: int, total: int) -> None:
        """Make the buffers hold ``batch`` x ``seq`` new tokens over ``total`` tokens; the KV sets'
        contents survive a growth (their dense prefix is copied)."""
        cb, cs, ct = self._cap
        if batch <= cb and seq <= cs and total <= ct:
            return
        b = self.desc
        nb, ns, nt = max(batch, cb), max(seq, cs), max(total, ct)
        ids_dt, mask_dt, pos_dt = b.ids_dtype, b.mask_dtype, b.pos_dtype
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
    def _free_all(lanes: LanePool, lane: Lane | None, bufs: dict, kv: list, host: dict) -> None:
        cuda = lanes.cuda
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
            lanes.release(lane)

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
        chunk = self.desc.prefill_chunk
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
        out = np.empty((B, T, self.desc.vocab), np.float32)
        presents = None
        for start in range(0, T, self.desc.prefill_chunk):
            end = min(T, start + self.desc.prefill_chunk)
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
        out = np.empty(shape, self.desc.kv_dtype)
        self.cuda.dtoh(out, self._kv[kv_set][index].ptr, self.lane.stream)
        self.cuda.synchronize(self.lane.stream)
        return out

    def _spill(self, kv_set: int) -> None:
        shape = self._shape[kv_set]
        if shape is not None:
            arrays = [self._download(kv_set, i, shape) for i in range(self._n_kv)]
            self._spilled[kv_set] = (self._gen[kv_set], arrays)

    def from_numpy(self, array: np.ndarray) -> HostKV:
        return HostKV(np.ascontiguousarray(array, dtype=self.desc.kv_dtype))

    # one engine run ---------------------------------------------------------------------------
    def _resolve(self, h: Any) -> int | np.ndarray:
        """Where a present handle's data is: its KV set (on the device), or its spilled host copy."""
        if not isinstance(h, DeviceKV) or h.owner != id(self):
            raise EngineError(f"a KV tensor from another cache or runner was passed in ({type(h).__name__})")
        if h.generation == self._gen[h.kv_set]:
            return h.kv_set
        spilled = self._spilled.get(h.kv_set)
        if spilled is not None and spilled[0] == h.generation:
            return spilled[1][h.index]
        raise EngineError("a KV tensor was used after a later step overwrote it (stale handle)")

    def _profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        profiles = self.desc.profiles
        order = sorted(
            self.lane.profiles,
            key=lambda k: profiles[k].phase != ("decode" if shapes["input_ids"][1] == 1 else "prefill"),
        )
        for k in order:
            if profiles[k].admits(shapes):
                return k
        d = self.desc
        raise EngineError(
            f"shapes {shapes['input_ids']} (new tokens) / {shapes['attention_mask']} (total) are outside "
            "the engine's "
            f"profiles (batch <= {d.max_batch}, context <= {d.max_context}); rebuild: "
            f"`{rebuild_command(d.source)} --max-batch N --max-context L`"
        )

    def _forward(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any] | None, copy: str | None
    ) -> tuple[np.ndarray | None, list[DeviceKV]]:
        b, cuda, lane = self.desc, self.cuda, self.lane
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
            said = self._lanes.said()
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
        if not ctx.set_input_shape(name, shape):
            raise EngineError(f"TensorRT refused shape {shape} for {name} (outside the active profile)")
        ctx.set_tensor_address(name, ptr)
