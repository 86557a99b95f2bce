"""TensorRT engines built on the target GPU: shape profiles, the build, the engine manifest, and
the checks that refuse a plan made for another TensorRT or GPU. Needs ``tensorrt`` (and
cuda-python for the GPU's name); never torch.

An engine is tied to the exact TensorRT version and the GPU model it was built on, so it is built
where it runs (``gpt2-edge build-engine BUNDLE``) into ``BUNDLE/engines/<gpu-key>/``:

    engines/nvidia-jetson-orin-nano-sm87-trt10.3.0/
        engine.plan      the serialized engine
        engine.json      TensorRT version, GPU, profiles, limits, precision, the bundle's hashes
        timing.cache     kernel timings: a rebuild on this GPU skips measuring them again

**Profiles.** The decoder's past grows every step, so every dynamic input gets an explicit range:
batch 1..max_batch, new tokens 1..max_context, past 0..max_context-1, total 1..max_context. By
default each *lane* has two profiles over those ranges, one tuned (``opt``) for prefill chunks
and one for single-token decode. TensorRT lets each execution context in concurrent use hold a
different profile only, so a lane is one context: ``--lanes N`` caches decode at the same time.

**Precision** comes from the graph (strongly typed networks, the only kind TensorRT 11 builds):
an ``fp32``, ``fp16`` or ``int8-qdq`` bundle of the ``tensorrt`` target.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import contract
from ..errors import Gpt2EdgeError
from ..runtime.bundle import Bundle
from .cuda import DeviceInfo
from .trt_api import TensorRTMissingError

ENGINE_SCHEMA = 1
PLAN = "engine.plan"
MANIFEST = "engine.json"
TIMING_CACHE = "timing.cache"
ENGINES_DIR = "engines"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8-qdq")
PREFILL_CHUNK = 256  # prefill profile's opt length; the backend feeds longer prompts in chunks of it
DEFAULT_MAX_BATCH = 8


class EngineError(Gpt2EdgeError):
    """An engine cannot be built or used here; the message says what to run instead."""


def engine_precision(bundle: Bundle) -> str:
    """The precision an engine of ``bundle`` runs in, or EngineError saying which bundle to use.

    fp32 builds fp32 (TF32 off unless asked); fp16 bundles carry fp16 weights and KV with fp32
    islands; int8-qdq carries explicit Q/DQ. The other variants use ONNX Runtime contrib ops.
    """
    if bundle.target != "tensorrt" or bundle.kv_form != "concat":
        raise EngineError(
            f"{bundle.path} is a `{bundle.target}`-target bundle ({bundle.kv_form} KV cache, ONNX Runtime "
            "operators); TensorRT engines need the standard-op graph: `gpt2-edge export MODEL --target "
            "tensorrt -o DIR` (then `gpt2-edge quantize DIR --precision fp16|int8-qdq` for a variant)"
        )
    if bundle.precision not in ENGINE_PRECISIONS:
        raise EngineError(
            f"{bundle.path} is {bundle.precision}, which TensorRT cannot build (ONNX Runtime contrib ops); "
            f"use an {', '.join(ENGINE_PRECISIONS)} bundle of the tensorrt target"
        )
    return bundle.precision


# profiles ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """The shapes an engine accepts (and ONNX Runtime's TensorRT provider is told about)."""

    max_batch: int = DEFAULT_MAX_BATCH  # sequences decoded together (server slots, beams)
    max_context: int | None = None  # tokens per sequence; None = the model's context
    opt_batch: int = 1  # the batch TensorRT tunes its kernels for
    lanes: int = 1  # caches that can run at the same time (one execution context each)
    split_phases: bool = True  # separate prefill and decode profiles per lane

    def resolve(self, context_length: int) -> Limits:
        """Fill ``max_context`` and check every field against the model."""
        L = context_length if self.max_context is None else self.max_context
        for name, value, low in (("max_batch", self.max_batch, 1), ("lanes", self.lanes, 1)):
            if not isinstance(value, int) or value < low:
                raise EngineError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(L, int) or not 2 <= L <= context_length:
            raise EngineError(f"max_context must be in 2..{context_length} (the model's context), got {L!r}")
        if not isinstance(self.opt_batch, int) or not 1 <= self.opt_batch <= self.max_batch:
            raise EngineError(f"opt_batch must be in 1..max_batch ({self.max_batch}), got {self.opt_batch!r}")
        return Limits(self.max_batch, L, self.opt_batch, self.lanes, self.split_phases)


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def admits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max, strict=True)
        )

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict[str, list[int]]) -> ShapeRange:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


@dataclass(frozen=True)
class Profile:
    """One optimization profile: a shape range for every input."""

    phase: str  # "prefill", "decode" or "any"
    lane: int
    shapes: dict[str, ShapeRange]

    def admits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return all(self.shapes[n].admits(s) for n, s in shapes.items())

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "lane": self.lane,
            "shapes": {n: r.as_dict() for n, r in self.shapes.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(d["phase"], int(d["lane"]), {n: ShapeRange.from_dict(r) for n, r in d["shapes"].items()})


def _dim_ranges(limits: Limits, phase: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each symbolic dim of the contract, for one phase."""
    L = limits.max_context
    assert L is not None, "resolve() the limits first"
    b = (1, limits.opt_batch, limits.max_batch)
    if phase == "decode":  # one new token after a past of any length: the hot loop
        past_opt = L // 2
        return {
            contract.BATCH: b,
            contract.SEQ: (1, 1, 1),
            contract.PAST: (0, past_opt, L - 1),
            contract.TOTAL: (1, past_opt + 1, L),
        }
    chunk = min(PREFILL_CHUNK, L)
    if phase == "prefill":  # a prompt (or a chunk of one) after a past of any length, opt = a chunk
        return {
            contract.BATCH: b,
            contract.SEQ: (1, chunk, L),
            contract.PAST: (0, 0, L - 1),
            contract.TOTAL: (1, chunk, L),
        }
    # one range for both (ONNX Runtime's provider, or --single-profile): tuned for decode
    return {
        contract.BATCH: b,
        contract.SEQ: (1, 1, L),
        contract.PAST: (0, L // 2, L - 1),
        contract.TOTAL: (1, L // 2 + 1, L),
    }


def shape_ranges(
    inputs: list[contract.TensorSpec], limits: Limits, phase: str = "any"
) -> dict[str, ShapeRange]:
    """Each input's range from its symbolic dims (read from the bundle's ``io``, never assumed)."""
    dims = _dim_ranges(limits, phase)
    out = {}
    for spec in inputs:
        lo, opt, hi = [], [], []
        for d in spec.shape:
            if isinstance(d, int):
                r = (d, d, d)
            elif d in dims:
                r = dims[d]
            else:
                raise EngineError(
                    f"input {spec.name} has a dimension {d!r} this builder has no range for (the contract's "
                    f"are {', '.join(dims)}); is the bundle's graph from another exporter?"
                )
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        out[spec.name] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
    return out


def decoder_profiles(inputs: list[contract.TensorSpec], limits: Limits) -> list[Profile]:
    """The engine's profiles: per lane, prefill + decode (or one range with ``split_phases=False``)."""
    phases = ("prefill", "decode") if limits.split_phases else ("any",)
    return [
        Profile(phase, lane, shape_ranges(inputs, limits, phase))
        for lane in range(limits.lanes)
        for phase in phases
    ]


def ort_profile_options(ranges: dict[str, ShapeRange]) -> dict[str, str]:
    """ONNX Runtime's ``trt_profile_{min,opt,max}_shapes``: ``name:1x12x0x64,name2:...``."""

    def fmt(pick: Callable[[ShapeRange], tuple[int, ...]]) -> str:
        return ",".join(f"{n}:{'x'.join(str(d) for d in pick(r))}" for n, r in ranges.items())

    return {
        "trt_profile_min_shapes": fmt(lambda r: r.min),
        "trt_profile_opt_shapes": fmt(lambda r: r.opt),
        "trt_profile_max_shapes": fmt(lambda r: r.max),
    }


def digest(obj: Any, n: int = 12) -> str:
    """A short stable hash of JSON-able ``obj`` (profiles, options) for cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def gpu_key(gpu: DeviceInfo | None, trt_version: str | None) -> str:
    """``nvidia-h100-80gb-hbm3-sm90-trt10.8.0.43``: what an engine is tied to, as a directory name."""
    if gpu is None:
        head = "unknown-gpu"
    else:
        head = f"{slug(gpu.name)}-sm{gpu.major}{gpu.minor}"
    return f"{head}-trt{trt_version or 'unknown'}"


# the engine manifest ----------------------------------------------------------------------------
def _model_hashes(bundle: Bundle) -> dict[str, str]:
    """sha256 of the graph and its external data, as the bundle's manifest records them."""
    files = bundle.manifest["files"]
    names = [bundle.manifest["model_file"], bundle.manifest["model_file"] + ".data"]
    return {n: files[n]["sha256"] for n in names if n in files}


@dataclass(frozen=True)
class EngineManifest:
    """``engine.json``: what a plan was built from, for what, and how."""

    tensorrt_version: str
    gpu: dict[str, Any]  # name, compute_capability, total_memory
    profiles: list[Profile]
    limits: dict[str, Any]
    precision: str
    bundle: dict[str, Any]  # path, model hashes
    plan: dict[str, Any]  # file, bytes, sha256
    builder: dict[str, Any] = field(default_factory=dict)  # workspace, tf32, timing cache, seconds
    producers: dict[str, str] = field(default_factory=dict)
    schema_version: int = ENGINE_SCHEMA

    @property
    def max_batch(self) -> int:
        return int(self.limits["max_batch"])

    @property
    def max_context(self) -> int:
        return int(self.limits["max_context"])

    @property
    def lanes(self) -> int:
        return int(self.limits["lanes"])

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = [p.as_dict() for p in self.profiles]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: Path) -> EngineManifest:
        if not isinstance(d, dict) or d.get("schema_version") != ENGINE_SCHEMA:
            version = d.get("schema_version") if isinstance(d, dict) else None
            raise EngineError(
                f"{where} has engine schema {version!r}, this gpt2-edge reads {ENGINE_SCHEMA}: "
                "rebuild the engine"
            )
        try:
            return cls(
                tensorrt_version=str(d["tensorrt_version"]),
                gpu=dict(d["gpu"]),
                profiles=[Profile.from_dict(p) for p in d["profiles"]],
                limits=dict(d["limits"]),
                precision=str(d["precision"]),
                bundle=dict(d["bundle"]),
                plan=dict(d["plan"]),
                builder=dict(d.get("builder", {})),
                producers=dict(d.get("producers", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(
                f"{where} is incomplete ({type(e).__name__}: {e}); rebuild the engine"
            ) from None


def read_manifest(engine_dir: Path) -> EngineManifest:
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise EngineError(f"{engine_dir} is not an engine directory ({MANIFEST} is missing)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{path} is not valid JSON ({e}); rebuild the engine") from None
    return EngineManifest.from_dict(data, path)


def rebuild_command(bundle_path: Path | str, limits: dict[str, Any] | None = None) -> str:
    cmd = f"gpt2-edge build-engine {bundle_path}"
    if limits:
        cmd += f" --max-batch {limits['max_batch']} --max-context {limits['max_context']}"
        if int(limits.get("lanes", 1)) > 1:
            cmd += f" --lanes {limits['lanes']}"
    return cmd


def check_compatible(
    manifest: EngineManifest,
    trt_version: str,
    gpu: DeviceInfo | None,
    bundle: Bundle | None,
    engine_dir: Path,
) -> None:
    """Refuse a plan built by another TensorRT, for another GPU, or from another graph.

    TensorRT plans are not portable across TensorRT versions (patch releases included) or GPU
    models; deserializing one anyway fails, or worse, runs kernels tuned for another chip.
    """
    where = manifest.bundle.get("path", "BUNDLE") if bundle is None else bundle.path
    fix = f"rebuild it here: `{rebuild_command(where, manifest.limits)}`"
    if manifest.tensorrt_version != trt_version:
        raise EngineError(
            f"{engine_dir} was built with TensorRT {manifest.tensorrt_version}; this machine has TensorRT "
            f"{trt_version}, which cannot load it: {fix}"
        )
    if gpu is not None:
        built = manifest.gpu
        if built.get("compute_capability") != gpu.compute_capability or built.get("name") != gpu.name:
            raise EngineError(
                f"{engine_dir} was built for {built.get('name')} (compute capability "
                f"{built.get('compute_capability')}); this GPU is {gpu.name} ({gpu.compute_capability}): "
                f"{fix}"
            )
    if bundle is not None:
        have = _model_hashes(bundle)
        if have != manifest.bundle.get("model_sha256"):
            raise EngineError(
                f"{engine_dir} was built from another model.onnx than {bundle.path} has now (the bundle was "
                f"re-exported or re-quantized): {fix}"
            )
        if manifest.precision != bundle.precision:
            raise EngineError(
                f"{engine_dir} is a {manifest.precision} engine; {bundle.path} is {bundle.precision}: {fix}"
            )


# the build --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildOptions:
    limits: Limits = Limits()
    workspace_mib: int | None = None  # cap on the builder's scratch memory (Jetsons: 512)
    timing_cache: Path | None = None  # default: timing.cache inside the engine directory
    tf32: bool = False  # let fp32 engines use TF32 math (faster, ~1e-3 off)
    verbose: bool = False


class EngineBuildError(EngineError):
    """TensorRT could not parse the graph or build the engine."""


def _parser_failure(issues: list, model_file: Path) -> EngineBuildError:
    lines = [f"TensorRT's ONNX parser rejected {model_file}:"]
    for it in issues[:8]:
        where = (
            f"node {it.node_name or '?'} ({it.op or 'op ?'}, #{it.node_index})"
            if it.node_index >= 0
            else "graph"
        )
        lines.append(f"  {where}: {it.desc}")
    ops = sorted({it.op for it in issues if it.op})
    lines.append(
        "What to do: engines need a `tensorrt`-target bundle of standard ONNX operators "
        "(`gpt2-edge export MODEL --target tensorrt`, then quantize to fp16 or int8-qdq only)"
        + (
            f"; if {', '.join(ops)} is in the support matrix of a newer TensorRT, upgrade TensorRT, or "
            "re-export with an older --opset"
            if ops
            else ""
        )
    )
    return EngineBuildError("\n".join(lines))


def _build_failure(messages: list[tuple[str, str]], options: BuildOptions) -> EngineBuildError:
    errors = [m for level, m in messages if level in ("ERROR", "INTERNAL_ERROR")] or [
        m for _, m in messages[-5:]
    ]
    lines = ["TensorRT could not build the engine:"] + [f"  {m}" for m in errors[-8:]]
    lim = options.limits
    lines.append(
        f"What to do: lower --max-batch ({lim.max_batch}) or --max-context ({lim.max_context}), or --lanes "
        f"({lim.lanes}); raise --workspace-mib ({options.workspace_mib or 'unlimited'}) if a tactic lacked "
        "scratch memory, or free GPU memory (on an 8 GB Jetson stop other GPU processes, and try "
        "--max-batch 1 --max-context 512 --workspace-mib 512)"
    )
    return EngineBuildError("\n".join(lines))


def build_engine(
    bundle_path: str | Path,
    output: str | Path | None = None,
    options: BuildOptions = BuildOptions(),
    trt: Any = None,
    gpu: DeviceInfo | None = None,
    log: Callable[[str], object] = print,
) -> Path:
    """Parse the bundle's graph with TensorRT's ONNX parser, build a strongly typed engine with
    the decoder profiles, and write ``engine.plan`` + ``engine.json`` (atomically) to ``output``
    (default ``BUNDLE/engines/<gpu-key>``). ``trt`` / ``gpu`` default to the real ones."""
    from ..fsutil import check_output, publish_dir, staging_dir
    from ..runtime.bundle import sha256_file
    from . import system, trt_api

    bundle = Bundle.load(bundle_path)
    precision = engine_precision(bundle)
    limits = options.limits.resolve(bundle.context_length)
    options = BuildOptions(limits, options.workspace_mib, options.timing_cache, options.tf32, options.verbose)
    if trt is None:
        try:
            trt = trt_api.import_tensorrt()
        except TensorRTMissingError as e:
            raise EngineError(str(e)) from None
    gpu = gpu or system.current_gpu()
    if gpu is None:
        raise EngineError(
            "no CUDA GPU found (cuda-python and nvidia-smi see none): engines are built on the GPU they "
            "run on"
        )
    trt_version = trt_api.version(trt)
    out = Path(output) if output else bundle.path / ENGINES_DIR / gpu_key(gpu, trt_version)
    real, src = out.expanduser().resolve(), bundle.path.resolve()
    if real == src or real in src.parents:
        raise EngineError(f"the output {out} is or contains the bundle {bundle.path}; choose another -o")
    # An engine directory is a rebuildable cache, replaced freely; any other directory is refused.
    check_output(out, overwrite=True, marker=MANIFEST, what="engine directory")
    profiles = decoder_profiles(bundle.inputs, limits)

    logger = trt_api.make_logger(trt, options.verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(trt_api.network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(bundle.model_file)):  # reads external data beside the file
        raise _parser_failure(trt_api.parser_issues(parser), bundle.model_file)
    parsed = [network.get_input(i).name for i in range(network.num_inputs)]
    expected = [s.name for s in bundle.inputs]
    if sorted(parsed) != sorted(expected):
        raise EngineBuildError(
            f"{bundle.model_file} parsed with inputs {parsed[:5]}..., bundle.json lists {expected[:5]}...: "
            "the graph does not match its manifest; re-export the bundle"
        )
    log(f"parsed {bundle.model_file.name} ({network.num_layers} layers) in {time.perf_counter() - t0:.1f} s")

    config = builder.create_builder_config()
    if options.workspace_mib:
        trt_api.set_workspace(trt, config, options.workspace_mib * 2**20)
    tf32_off = precision == "fp32" and not options.tf32 and trt_api.disable_tf32(trt, config)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, r in p.shapes.items():
            prof.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(prof)
    cache_file = Path(options.timing_cache) if options.timing_cache else out / TIMING_CACHE
    cache_in = cache_file.read_bytes() if cache_file.is_file() else b""
    trt_api.attach_timing_cache(config, cache_in)

    log(
        f"building a strongly typed {precision} engine for {gpu.name} (sm{gpu.major}{gpu.minor}), TensorRT "
        f"{trt_version}: {len(profiles)} profile(s), batch <= {limits.max_batch}, context <= "
        f"{limits.max_context}{', timing cache ' + str(cache_file) if cache_in else ''}"
    )
    t1 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise _build_failure(logger.messages, options)
    build_s = time.perf_counter() - t1
    plan = trt_api.plan_bytes(serialized)
    cache_out = trt_api.serialize_timing_cache(config)

    with staging_dir(out) as tmp:
        (tmp / PLAN).write_bytes(plan)
        if options.timing_cache is None and cache_out:
            (tmp / TIMING_CACHE).write_bytes(cache_out)
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("gpt2-edge")
        except PackageNotFoundError:
            ours = "unknown"
        manifest = EngineManifest(
            tensorrt_version=trt_version,
            gpu={
                "name": gpu.name,
                "compute_capability": gpu.compute_capability,
                "total_memory": gpu.total_memory,
            },
            profiles=profiles,
            limits=asdict(limits),
            precision=precision,
            bundle={"path": str(bundle.path.resolve()), "model_sha256": _model_hashes(bundle)},
            plan={"file": PLAN, "bytes": len(plan), "sha256": sha256_file(tmp / PLAN)},
            builder={
                "strongly_typed": True,
                "workspace_mib": options.workspace_mib,
                "tf32": not tf32_off,
                "timing_cache": str(cache_file),
                "timing_cache_reused": bool(cache_in),
                "build_s": round(build_s, 2),
            },
            producers={"gpt2-edge": ours, "tensorrt": trt_version},
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.as_dict(), indent=2) + "\n")
        publish_dir(tmp, out, overwrite=True)  # an engine directory is a rebuildable cache
    if options.timing_cache is not None and cache_out:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_bytes(cache_out)
    log(f"engine written: {out} ({len(plan) / 2**20:.1f} MiB, built in {build_s:.1f} s)")
    return out


# finding an engine ----------------------------------------------------------------------------------
def locate_engine(path: str | Path, gpu: DeviceInfo | None, trt_version: str) -> Path:
    """An engine directory given itself, or a bundle (its ``engines/<gpu-key>`` for this machine)."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    if not (p / "bundle.json").is_file():
        raise EngineError(f"{p} is neither an engine directory ({MANIFEST}) nor a bundle (bundle.json)")
    key = gpu_key(gpu, trt_version)
    candidate = p / ENGINES_DIR / key
    if (candidate / MANIFEST).is_file():
        return candidate
    others = sorted(d.name for d in (p / ENGINES_DIR).glob("*") if (d / MANIFEST).is_file())
    found = f" (engines there were built for: {', '.join(others)})" if others else ""
    raise EngineError(
        f"{p} has no TensorRT engine for this GPU and TensorRT ({key}){found}: build one with "
        f"`{rebuild_command(p)}`"
    )


def engine_bundle(engine_dir: Path, manifest: EngineManifest) -> Path:
    """The bundle an engine belongs to: the directory two levels up (the default layout), else
    the path recorded at build time."""
    parent = engine_dir.resolve().parent.parent
    if (parent / "bundle.json").is_file():
        return parent
    recorded = Path(manifest.bundle.get("path", ""))
    if (recorded / "bundle.json").is_file():
        return recorded
    raise EngineError(
        f"cannot find the bundle of {engine_dir}: not at {parent} nor at {recorded}; keep engines in "
        "BUNDLE/engines/ or pass the bundle"
    )
