"""A fake TensorRT module and a fake CUDA runtime, so the engine stage's logic runs on a CPU.

The fakes implement the documented calls the kit makes, and check what real TensorRT and CUDA
would punish: shapes outside the active profile, a profile held by two contexts at once, unset
addresses, reads or writes past the end of an allocation, a present written over the past it is
computed from, use after free. The "engine" runs the bundle's ONNX graph with onnxruntime's CPU
provider on the bytes in fake device memory, so greedy parity against the ORT backend is real.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gpt2_edge.runtime.trt.cuda import DeviceInfo

FAKE_GPU = DeviceInfo("NVIDIA Fake Orin", 8, 7, 8 * 2**30, 0)


# CUDA -------------------------------------------------------------------------------------------
class FakeCuda:
    """Device memory is a dict of numpy byte arrays addressed by int pointers."""

    def __init__(self, gpu: DeviceInfo = FAKE_GPU) -> None:
        self.gpu = gpu
        self.heap: dict[int, np.ndarray] = {}
        self.pinned_live: dict[int, np.ndarray] = {}
        self._next = 0x1000_0000
        self.mallocs = 0
        self.frees = 0
        self.d2h_bytes = 0
        self.h2d_bytes = 0
        self.streams: set[int] = set()

    # devices
    def device_count(self) -> int:
        return 1

    def device(self, index: int = 0) -> DeviceInfo:
        assert index == 0
        return self.gpu

    def set_device(self, index: int) -> None:
        assert index == 0

    def driver_version(self) -> str:
        return "12.6"

    def runtime_version(self) -> str:
        return "12.6"

    def mem_info(self) -> tuple[int, int]:
        used = sum(a.nbytes for a in self.heap.values())
        return self.gpu.total_memory - used, self.gpu.total_memory

    # memory
    def malloc(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        ptr = self._next
        self._next += (nbytes + 511) // 256 * 256  # a gap after each block: overruns are caught
        self.heap[ptr] = np.zeros(nbytes, np.uint8)
        self.mallocs += 1
        return ptr

    def free(self, ptr: int) -> None:
        assert ptr in self.heap, f"free of unknown or freed pointer {ptr:#x}"
        del self.heap[ptr]
        self.frees += 1

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, int]:
        array = np.zeros(shape, dtype)
        ptr = id(array)
        self.pinned_live[ptr] = array
        return array, ptr

    def free_pinned(self, ptr: int) -> None:
        assert ptr in self.pinned_live, "free_pinned of an unknown pointer"
        del self.pinned_live[ptr]

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        """The bytes ``[ptr, ptr + nbytes)``, which must lie inside one live allocation."""
        for base, block in self.heap.items():
            if base <= ptr < base + block.nbytes or (nbytes == 0 and ptr == base):
                off = ptr - base
                assert off + nbytes <= block.nbytes, (
                    f"access of {nbytes} bytes at +{off} overruns an allocation of {block.nbytes}"
                )
                return block[off : off + nbytes]
        raise AssertionError(f"pointer {ptr:#x} is not in any live allocation")

    # streams
    def stream(self) -> int:
        s = 7000 + len(self.streams) + self.frees
        while s in self.streams:
            s += 1
        self.streams.add(s)
        return s

    def destroy_stream(self, stream: int) -> None:
        self.streams.discard(stream)

    def synchronize(self, stream: int) -> None:
        assert stream in self.streams, "synchronize on a destroyed stream"

    def handle(self, stream: int) -> int:
        return int(stream)

    # copies
    def htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        assert src.flags.c_contiguous
        self.view(dst, src.nbytes)[:] = src.view(np.uint8).reshape(-1)
        self.h2d_bytes += src.nbytes

    def dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        assert dst.flags.c_contiguous
        dst.view(np.uint8).reshape(-1)[:] = self.view(src, dst.nbytes)
        self.d2h_bytes += dst.nbytes

    def dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.view(dst, nbytes)[:] = self.view(src, nbytes)

    def dtoh_rows(self, dst: np.ndarray, src: int, src_pitch: int, stream: int) -> None:
        rows = dst.shape[0]
        width = dst.nbytes // rows
        flat = dst.view(np.uint8).reshape(rows, width)
        for r in range(rows):
            flat[r] = self.view(src + r * src_pitch, width)
        self.d2h_bytes += dst.nbytes

    def memset(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self.view(ptr, nbytes)[:] = value


# TensorRT ------------------------------------------------------------------------------------------
class DataType(enum.Enum):
    FLOAT = np.float32
    HALF = np.float16
    INT64 = np.int64
    INT32 = np.int32


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 0


class BuilderFlag(enum.IntEnum):
    TF32 = 7


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


_ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 7: DataType.INT64, 6: DataType.INT32}


class ILogger:
    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass


class Logger(ILogger):
    WARNING = ILogger.Severity.WARNING

    def __init__(self, severity: Any = None) -> None:
        super().__init__()

    def log(self, severity: Any, msg: str) -> None:
        pass


@dataclass
class FakeParserError:
    message: str
    node_index: int = -1
    name: str = ""
    op: str = ""

    def desc(self) -> str:
        return self.message

    def node(self) -> int:
        return self.node_index

    def node_name(self) -> str:
        return self.name

    def node_operator(self) -> str:
        return self.op

    def code(self) -> str:
        return "ErrorCode.UNSUPPORTED_NODE"


@dataclass
class _Tensor:
    name: str


@dataclass
class FakeNetwork:
    flags: int
    inputs: list[str] = field(default_factory=list)
    model: str | None = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return _Tensor(self.inputs[i])

    @property
    def num_layers(self) -> int:
        return 42


class FakeOnnxParser:
    fail_with: ClassVar[list[FakeParserError]] = []  # set by a test to make parsing fail

    def __init__(self, network: FakeNetwork, logger: Any) -> None:
        self.network = network
        self.errors: list[FakeParserError] = []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        if self.fail_with:
            self.errors = list(self.fail_with)
            return False
        model = onnx.load(path, load_external_data=False)
        self.network.inputs = [i.name for i in model.graph.input]
        self.network.model = path
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> FakeParserError:
        return self.errors[i]


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, min: tuple, opt: tuple, max: tuple) -> None:
        assert all(lo <= o <= hi for lo, o, hi in zip(min, opt, max, strict=True)), (name, min, opt, max)
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+timings"


class FakeConfig:
    def __init__(self) -> None:
        self.pool: dict[Any, int] = {}
        self.cleared: set[Any] = set()
        self.profiles: list[FakeProfile] = []
        self.timing_cache: FakeTimingCache | None = None

    def set_memory_pool_limit(self, pool: Any, nbytes: int) -> None:
        self.pool[pool] = nbytes

    def clear_flag(self, flag: Any) -> None:
        self.cleared.add(flag)

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.timing_cache


class FakeBuilder:
    fail_build = False  # set by a test to make the build fail
    version = "10.3.0.30"
    last: FakeBuilder | None = None

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.network: FakeNetwork | None = None
        self.config: FakeConfig | None = None
        type(self).last = self

    def create_network(self, flags: int) -> FakeNetwork:
        self.network = FakeNetwork(flags)
        return self.network

    def create_builder_config(self) -> FakeConfig:
        self.config = FakeConfig()
        return self.config

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes | None:
        if self.fail_build:
            self.logger.log(
                ILogger.Severity.ERROR, "Requested amount of GPU memory (4096 bytes) could not be allocated"
            )
            return None
        plan = {
            "model": network.model,
            "profiles": [p.shapes for p in config.profiles],
            "version": self.version,
        }
        return json.dumps(plan).encode()


class FakeRuntime:
    cuda: FakeCuda

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine | None:
        try:
            d = json.loads(plan)
        except ValueError:
            self.logger.log(ILogger.Severity.ERROR, "Serialization assertion failed: magic tag mismatch")
            return None
        return FakeEngine(d, self.cuda)


class FakeEngine:
    """Runs the graph with onnxruntime's CPU provider over fake device memory."""

    def __init__(self, plan: dict, cuda: FakeCuda) -> None:
        import onnx
        import onnxruntime as ort

        self.cuda = cuda
        self.profiles = [{n: tuple(tuple(s) for s in r) for n, r in p.items()} for p in plan["profiles"]]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(plan["model"], so, providers=["CPUExecutionProvider"])
        model = onnx.load(plan["model"], load_external_data=False)
        self.tensors: dict[str, tuple[TensorIOMode, DataType, tuple[int, ...]]] = {}
        for mode, values in (
            (TensorIOMode.INPUT, model.graph.input),
            (TensorIOMode.OUTPUT, model.graph.output),
        ):
            for v in values:
                t = v.type.tensor_type
                shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
                self.tensors[v.name] = (mode, _ONNX_TO_TRT[t.elem_type], shape)
        self.names = list(self.tensors)
        self.profile_owner: dict[int, FakeContext] = {}
        self.contexts: list[FakeContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.tensors[name][1]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][2]

    def create_execution_context(self) -> FakeContext:
        ctx = FakeContext(self)
        if not self.contexts:  # TensorRT gives the first context profile 0
            ctx.set_optimization_profile_async(0, 0)
        self.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.profile: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.runs: list[dict] = []  # per execute: profile, shapes, addresses

    def set_optimization_profile_async(self, k: int, stream: int) -> bool:
        owner = self.engine.profile_owner.get(k)
        assert owner is None or owner is self, f"profile {k} is already used by another execution context"
        if self.profile is not None:
            self.engine.profile_owner.pop(self.profile, None)
        self.engine.profile_owner[k] = self
        self.profile = k
        self.shapes = {}  # a profile switch invalidates the input shapes
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        assert self.profile is not None, "no optimization profile selected"
        lo, _, hi = self.engine.profiles[self.profile][name]
        shape = tuple(int(s) for s in shape)
        if not all(a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        assert name in self.engine.tensors, name
        assert ptr, f"null address for {name}"
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        B, S = self.shapes["input_ids"]
        T = self.shapes["attention_mask"][1]
        if name == "logits":
            return (B, S, self.engine.tensors[name][2][-1])
        if name.startswith("present."):
            past = self.shapes["past_key_values." + name[len("present.") :]]
            return (B, past[1], T, past[3])
        return self.shapes[name]

    def execute_async_v3(self, stream_handle: int) -> bool:
        cuda = self.engine.cuda
        feeds = {}
        for name, (mode, dt, _) in self.engine.tensors.items():
            if mode is not TensorIOMode.INPUT:
                continue
            assert name in self.shapes, f"input shape of {name} not set"
            shape = self.shapes[name]
            dtype = np.dtype(dt.value)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            feeds[name] = cuda.view(self.addresses[name], nbytes).view(dtype).reshape(shape).copy()
        B, S = self.shapes["input_ids"]
        assert self.shapes["attention_mask"][0] == B and self.shapes["position_ids"] == (B, S)
        past_len = self.shapes["past_key_values.0.key"][2]
        assert self.shapes["attention_mask"][1] == past_len + S, "total != past + new"
        names = [n for n, (m, _, _) in self.engine.tensors.items() if m is TensorIOMode.OUTPUT]
        outs = self.engine.session.run(names, feeds)
        past_addrs = {self.addresses[n] for n in self.shapes if n.startswith("past_key_values.")}
        for name, value in zip(names, outs, strict=True):
            assert name in self.addresses, f"output address of {name} not set"
            if name.startswith("present.") and past_len > 0:
                assert self.addresses[name] not in past_addrs, f"{name} is written over a past input"
            assert tuple(value.shape) == self.get_tensor_shape(name), (name, value.shape)
            arr = np.ascontiguousarray(value, dtype=np.dtype(self.engine.tensors[name][1].value))
            cuda.view(self.addresses[name], arr.nbytes)[:] = arr.view(np.uint8).reshape(-1)
        self.runs.append(
            {"profile": self.profile, "shapes": dict(self.shapes), "addresses": dict(self.addresses)}
        )
        return True


class FakeTrt:
    """Stands in for the ``tensorrt`` module (only what the kit calls)."""

    __version__ = "10.3.0.30"
    ILogger = ILogger
    Logger = Logger
    Builder = FakeBuilder
    OnnxParser = FakeOnnxParser
    Runtime = FakeRuntime
    DataType = DataType
    TensorIOMode = TensorIOMode
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    BuilderFlag = BuilderFlag
    MemoryPoolType = MemoryPoolType


def fake_stack(version: str = "10.3.0.30", gpu: DeviceInfo = FAKE_GPU) -> tuple[type[FakeTrt], FakeCuda]:
    """A fresh fake TensorRT module and CUDA runtime that share one fake device."""
    cuda = FakeCuda(gpu)
    trt = type(
        "FakeTrtModule",
        (FakeTrt,),
        {
            "__version__": version,
            "Builder": type("Builder", (FakeBuilder,), {"version": version}),
            "OnnxParser": type("OnnxParser", (FakeOnnxParser,), {"fail_with": []}),
            "Runtime": type("Runtime", (FakeRuntime,), {"cuda": cuda}),
        },
    )
    return trt, cuda


def plan_model(engine_dir: Path) -> str:
    return json.loads((engine_dir / "engine.plan").read_bytes())["model"]
