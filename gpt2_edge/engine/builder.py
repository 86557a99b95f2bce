"""``gpt2-edge build-engine``: a TensorRT engine built on the target GPU from a bundle's graph.

TensorRT's ONNX parser reads the bundle's ``model.onnx``; the builder makes a strongly typed
engine with the decoder's optimization profiles (``runtime.trt.shapes``) and writes
``engine.plan`` + ``engine.json`` (``runtime.trt.plan``, the format the engine backend reads)
atomically to ``BUNDLE/engines/<gpu-key>/``, reusing the timing cache there. Needs ``tensorrt``
(and cuda-python for the GPU's name); never torch.

**Precision** comes from the graph (strongly typed networks, the only kind TensorRT 11 builds):
an ``fp32``, ``fp16`` or ``int8-qdq`` bundle of the ``tensorrt`` target.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..fsutil import check_output, publish_dir, staging_dir
from ..runtime.bundle import Bundle, sha256_file
from ..runtime.trt import api
from ..runtime.trt import system as trt_system
from ..runtime.trt.cuda import DeviceInfo
from ..runtime.trt.errors import EngineError
from ..runtime.trt.plan import (
    ENGINES_DIR,
    MANIFEST,
    PLAN,
    TIMING_CACHE,
    EngineManifest,
    gpu_key,
    model_hashes,
)
from ..runtime.trt.shapes import Limits, decoder_profiles
from . import trt_api

ENGINE_PRECISIONS = ("fp32", "fp16", "int8-qdq")


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


# the build --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildOptions:
    limits: Limits = field(default_factory=Limits)
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
    bundle = Bundle.load(bundle_path)
    precision = engine_precision(bundle)
    limits = options.limits.resolve(bundle.context_length)
    options = BuildOptions(limits, options.workspace_mib, options.timing_cache, options.tf32, options.verbose)
    if trt is None:
        try:
            trt = api.import_tensorrt()
        except api.TensorRTMissingError as e:
            raise EngineError(str(e)) from None
    gpu = gpu or trt_system.current_gpu()
    if gpu is None:
        raise EngineError(
            "no CUDA GPU found (cuda-python and nvidia-smi see none): engines are built on the GPU they "
            "run on"
        )
    trt_version = api.version(trt)
    out = Path(output) if output else bundle.path / ENGINES_DIR / gpu_key(gpu, trt_version)
    real, src = out.expanduser().resolve(), bundle.path.resolve()
    if real == src or real in src.parents:
        raise EngineError(f"the output {out} is or contains the bundle {bundle.path}; choose another -o")
    # An engine directory is a rebuildable cache, replaced freely; any other directory is refused.
    check_output(out, overwrite=True, marker=MANIFEST, what="engine directory")
    profiles = decoder_profiles(bundle.inputs, limits)

    logger = api.make_logger(trt, options.verbose)
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
            bundle={"path": str(bundle.path.resolve()), "model_sha256": model_hashes(bundle)},
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
