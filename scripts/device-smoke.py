#!/usr/bin/env python3
"""Exercise gpt2-edge's CUDA layer on a real NVIDIA GPU, without TensorRT. Under a minute.

    python scripts/device-smoke.py        (from the repository root; nothing to install)
    python scripts/device-smoke.py --fake (no GPU: checks the script itself against a fake CUDA)

Needs numpy and cuda-python (either import path: ``cuda.bindings.runtime`` or ``cuda.cudart``).
gpt2_edge is imported from this checkout. Part 1 checks ``gpt2_edge.runtime.trt.cuda.Cuda`` call by
call: device query, device and pinned memory, synchronous and stream-ordered copies, the strided
copy that brings back last-position logits. Part 2 runs the TensorRT backend's ``EngineRunner``
(real device buffers, ping-pong KV sets, chunked prefill, slot joins, releases and reorders) with
a toy "engine" in place of TensorRT: it reads its inputs from device memory, computes a decoder
step whose outputs depend on the whole KV history, and writes the presents and logits back to
the bound device addresses; the logits must equal a pure-numpy run of the same steps.

Prints one PASS/FAIL line per check; exits 1 if any failed.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

RESULTS: list[tuple[str, bool, str]] = []
T0 = time.perf_counter()


def check(name: str):
    """Run the decorated function now; record PASS, or FAIL with the exception."""

    def run(fn):
        t = time.perf_counter()
        try:
            detail = fn() or ""
            ok = True
        except Exception as e:  # a smoke test reports every failure and carries on
            ok, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc(limit=3, file=sys.stdout)
        RESULTS.append((name, ok, detail))
        ms = 1000 * (time.perf_counter() - t)
        print(f"{'PASS' if ok else 'FAIL'}  {name} ({ms:.0f} ms){': ' + detail if detail else ''}")
        sys.stdout.flush()
        return fn

    return run


print(f"device-smoke: python {sys.version.split()[0]}, numpy {np.__version__}")
from gpt2_edge.runtime.trt.cuda import Cuda, CudaError, import_runtime  # noqa: E402

state: dict = {}


# part 1: the CUDA layer ---------------------------------------------------------------------------
FAKE = "--fake" in sys.argv  # the script's own logic on a machine without a GPU (tests' fake CUDA)


@check("import cuda-python runtime")
def _():
    if FAKE:
        from tests.engine.engine_fakes import FakeCuda

        state["cuda"] = FakeCuda()
        return "FAKE CUDA (--fake): this run proves nothing about a GPU"
    rt = import_runtime()
    state["cuda"] = Cuda(rt)
    return f"module {rt.__name__}"


cuda: Cuda = state.get("cuda")  # type: ignore[assignment]
if cuda is None:
    print("FAIL  cannot continue without cuda-python")
    sys.exit(1)


@check("device query")
def _():
    n = cuda.device_count()
    assert n >= 1, "no CUDA device"
    d = cuda.device(0)
    free, total = cuda.mem_info()
    assert d.name and d.major >= 3 and total > 0 and 0 < free <= total
    state["free0"] = free
    return (
        f"{n} device(s); 0: {d.name}, sm{d.major}{d.minor}, {d.total_memory / 2**30:.1f} GiB; driver CUDA "
        f"{cuda.driver_version()}, runtime {cuda.runtime_version()}; free {free / 2**30:.1f} GiB"
    )


@check("malloc / free, zero-size allocation gets an address")
def _():
    ptrs = [cuda.malloc(n) for n in (0, 1, 4096, 3 << 20)]
    assert all(isinstance(p, int) and p for p in ptrs) and len(set(ptrs)) == 4
    for p in ptrs:
        cuda.free(p)


@check("stream create / handle / synchronize / destroy")
def _():
    s = cuda.stream()
    h = cuda.handle(s)
    assert isinstance(h, int) and h != 0
    cuda.synchronize(s)
    state["stream"] = s
    return f"handle {h:#x}"


stream = state.get("stream")


@check("htod / dtoh round trip (float32, int64, float16) on a stream")
def _():
    rng = np.random.default_rng(0)
    for arr in (
        rng.standard_normal((3, 5, 7)).astype(np.float32),
        rng.integers(-(2**40), 2**40, (4, 9)).astype(np.int64),
        rng.standard_normal((2, 4, 6, 8)).astype(np.float16),
    ):
        p = cuda.malloc(arr.nbytes)
        cuda.htod(p, arr, stream)
        back = np.empty_like(arr)
        cuda.dtoh(back, p, stream)
        cuda.synchronize(stream)
        cuda.free(p)
        assert np.array_equal(arr, back), arr.dtype


@check("pinned host arrays: async copies in and out, device-to-device")
def _():
    src, p_src = cuda.pinned((1024, 256), np.float32)
    dst, p_dst = cuda.pinned((1024, 256), np.float32)
    src[...] = np.arange(src.size, dtype=np.float32).reshape(src.shape)
    a, b = cuda.malloc(src.nbytes), cuda.malloc(src.nbytes)
    cuda.htod(a, src, stream)
    cuda.dtod(b, a, src.nbytes, stream)
    cuda.dtoh(dst, b, stream)
    cuda.synchronize(stream)
    ok = np.array_equal(src, dst)
    for p in (a, b):
        cuda.free(p)
    cuda.free_pinned(p_src)
    cuda.free_pinned(p_dst)
    assert ok


@check("strided copy of last-position logits (cudaMemcpy2DAsync) and memset")
def _():
    B, S, V = 3, 5, 11
    logits = np.random.default_rng(1).standard_normal((B, S, V)).astype(np.float32)
    p = cuda.malloc(logits.nbytes)
    cuda.htod(p, logits, stream)
    out = np.empty((B, V), np.float32)
    row = S * V * 4
    cuda.dtoh_rows(out, p + row - V * 4, row, stream)
    cuda.synchronize(stream)
    assert np.array_equal(out, logits[:, -1]), "rows differ"
    cuda.memset(p, 0, logits.nbytes, stream)
    back = np.empty_like(logits)
    cuda.dtoh(back, p, stream)
    cuda.synchronize(stream)
    cuda.free(p)
    assert not back.any()


@check("a failing call raises CudaError with the CUDA message")
def _():
    if FAKE:
        return "skipped with --fake"
    try:
        cuda.free(0xDEAD0)
    except CudaError as e:
        assert "cudaFree" in str(e)
        return str(e)[:80]
    raise AssertionError("cudaFree of a bad pointer did not raise")


# part 2: the engine backend's runner with a toy engine -------------------------------------------------
L_LAYERS, HEADS, HEAD, VOCAB, CONTEXT = 2, 2, 4, 11, 32


def toy_forward(ids, mask, pos, past):
    """A decoder step whose logits depend on every cached key (a broken KV flow shows)."""
    B, S = ids.shape
    h = np.arange(HEADS)[None, :, None, None] * 1e-2
    d = np.arange(HEAD)[None, None, None, :] * 1e-3
    presents = []
    for j in range(2 * L_LAYERS):
        new = (ids[:, None, :, None] % 7) * 0.25 + pos[:, None, :, None] * 0.125 + j + h + d
        old = past[j] if past is not None else np.zeros((B, HEADS, 0, HEAD), np.float32)
        presents.append(np.concatenate([old, new.astype(np.float32)], axis=2))
    T = presents[0].shape[2]
    P = T - S
    keys = presents[0][:, 0, :, 0] * mask  # (B, T)
    causal = np.arange(T)[None, :] <= (P + np.arange(S))[:, None]  # (S, T)
    ctx = (keys[:, None, :] * causal[None]).sum(-1)  # (B, S)
    logits = ctx[..., None] * (1 + np.arange(VOCAB) % 3) + np.arange(VOCAB) * 0.5
    return logits.astype(np.float32), presents


class HostToy:
    """The reference: the same steps in numpy (a ConcatRunner)."""

    pad_id = 0

    def run(self, ids, mask, pos, past):
        logits, presents = toy_forward(ids, mask, pos, past)
        return logits[:, -1], presents

    def to_numpy(self, v):
        return v

    def from_numpy(self, a):
        return np.ascontiguousarray(a)


class ToyContext:
    """Stands in for a TensorRT execution context: device memory in, toy step, device memory out."""

    def __init__(self, cuda, stream, names):
        self.cuda, self.stream, self.names = cuda, stream, names
        self.shapes, self.addr, self.profile, self.log = {}, {}, None, []

    def set_optimization_profile_async(self, k, handle):
        self.profile = k
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(int(s) for s in shape)
        return True

    def set_tensor_address(self, name, ptr):
        assert ptr, name
        self.addr[name] = ptr
        return True

    def get_tensor_shape(self, name):
        B, S = self.shapes["input_ids"]
        return (B, S, VOCAB) if name == "logits" else None

    def _read(self, name, dtype):
        a = np.empty(self.shapes[name], dtype)
        self.cuda.dtoh(a, self.addr[name], self.stream)
        return a

    def execute_async_v3(self, handle):
        c = self.cuda
        c.synchronize(self.stream)
        ids, mask, pos = (self._read(n, np.int64) for n in ("input_ids", "attention_mask", "position_ids"))
        past = [self._read(n, np.float32) for n in self.names["past"]]
        c.synchronize(self.stream)
        logits, presents = toy_forward(ids, mask, pos, past)
        for n, p in zip(self.names["present"], presents, strict=True):
            assert (
                self.addr[n] not in {self.addr[m] for m in self.names["past"]} or p.shape[2] == ids.shape[1]
            )
            c.htod(self.addr[n], np.ascontiguousarray(p), self.stream)
        c.htod(self.addr["logits"], logits, self.stream)
        c.synchronize(self.stream)
        self.log.append({n: self.addr[n] for n in (self.names["past"][0], self.names["present"][0])})
        return True


class ToyEngine:
    """Stands in for a deserialized TensorRT engine: it makes the one lane's execution context."""

    def __init__(self, names):
        self.names, self.contexts = names, []

    def create_execution_context(self):
        self.contexts.append(ToyContext(cuda, None, self.names))  # its stream: the lane's, below
        return self.contexts[-1]


def make_runner(n_slots, capacity):
    """An ``EngineRunner`` over the toy engine: the description and lane pool the backend would make."""
    from gpt2_edge import contract
    from gpt2_edge.runtime.trt.description import EngineDescription
    from gpt2_edge.runtime.trt.lanes import LanePool
    from gpt2_edge.runtime.trt.runner import EngineRunner
    from gpt2_edge.runtime.trt.shapes import Limits, decoder_profiles

    past = tuple(contract.past_names(L_LAYERS))
    present = tuple(contract.present_names(L_LAYERS))
    limits = Limits(max_batch=4, max_context=CONTEXT).resolve(CONTEXT)
    profiles = tuple(decoder_profiles(contract.inputs(L_LAYERS, HEADS, HEAD), limits))
    i64, f32 = np.dtype(np.int64), np.dtype(np.float32)
    desc = EngineDescription(
        source=Path("toy"),
        ids_dtype=i64,
        mask_dtype=i64,
        pos_dtype=i64,
        past_names=past,
        present_names=present,
        kv_dtype=f32,
        logits_dtype=f32,
        n_head=HEADS,
        head_size=HEAD,
        vocab=VOCAB,
        profiles=profiles,
        max_batch=4,
        max_context=CONTEXT,
        n_ctx=CONTEXT,
        pad_id=0,
        prefill_chunk=4,  # prompts longer than 4 tokens run in chunks over the presents
    )
    engine = ToyEngine({"past": past, "present": present})
    lanes = LanePool(engine, cuda, profiles, n_lanes=1, timeout_s=1.0, where="toy engine")
    runner = EngineRunner(desc, lanes, n_slots, capacity)
    # TensorRT runs a context's work on the stream execute_async_v3 is given; the toy, which
    # copies through the host, synchronizes that stream (the lane's) before reading its inputs.
    runner.lane.context.stream = runner.lane.stream
    return runner, engine, lanes


@check("engine runner: device buffers, ping-pong KV sets, chunked prefill, joins, releases, reorders")
def _():
    from gpt2_edge.runtime.kv_cache import ConcatCache

    runner, engine, lanes = make_runner(3, 24)
    ctx = engine.contexts[0]
    dev, ref = ConcatCache(runner, 3, 24), ConcatCache(HostToy(), 3, 24)
    n = [0]

    def both(op, *args):
        a, b = getattr(dev, op)(*args), getattr(ref, op)(*args)
        if a is not None:
            n[0] += 1
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5, err_msg=f"{op}{args}")

    both("prefill", [0, 1], [[5, 6, 7, 8, 9, 10, 11], [3, 2, 1]])  # 7 tokens: two chunks
    allocs = runner.allocations
    for t in range(4):
        both("decode", [0, 1], [t + 1, t + 2])
    assert runner.allocations == allocs, "decode steps reallocated buffers"
    pasts = [r[runner.desc.past_names[0]] for r in ctx.log[-4:]]
    presents = [r[runner.desc.present_names[0]] for r in ctx.log[-4:]]
    assert len(set(presents)) == 2 and all(pasts[i + 1] == presents[i] for i in range(3)), "no ping-pong"
    both("prefill", [2], [[9, 8, 7, 6, 5]])  # joins the running batch (re-padded through the host)
    for t in range(3):
        both("decode", [0, 1, 2], [t, t + 3, t + 5])
    both("release", 1)
    for t in range(2):
        both("decode", [0, 2], [t + 4, t + 6])
    both("reorder", [2, 0])  # beam search's move
    for t in range(2):
        both("decode", [0, 1], [t + 1, t])
    runner._reserve(4, 4, 30)  # growth keeps the cache
    both("decode", [0, 1], [3, 3])
    runner.close()
    assert lanes.free == 1, "the lane was not given back"
    lanes.close()
    return f"{n[0]} logits arrays equal to numpy; {runner.allocations} device allocations"


@check("stale KV handles are refused")
def _():
    from gpt2_edge.runtime.trt.errors import EngineError

    r, _, lanes = make_runner(1, 8)
    ids = np.array([[1, 2]], np.int64)
    one, pos = np.ones_like(ids), np.arange(2, dtype=np.int64)[None]
    _, old = r.run(ids, one, pos, None)
    r.run(ids, one, pos, None)
    r.run(ids, one, pos, None)
    try:
        r.to_numpy(old[0])
    except EngineError:
        r.close()
        lanes.close()
        return
    raise AssertionError("a stale handle was accepted")


@check("memory is returned")
def _():
    import gc

    gc.collect()
    free, _ = cuda.mem_info()
    lost = state["free0"] - free
    assert lost < 64 * 2**20, f"{lost / 2**20:.0f} MiB not returned"
    return f"{lost / 2**20:+.1f} MiB vs start"


failed = [name for name, ok, _ in RESULTS if not ok]
print(
    f"\ndevice-smoke: {len(RESULTS) - len(failed)}/{len(RESULTS)} passed in {time.perf_counter() - T0:.1f} s"
    + (f"; FAILED: {', '.join(failed)}" if failed else "")
)
sys.exit(1 if failed else 0)
