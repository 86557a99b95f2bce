"""The engine directory: its file names, ``engine.json`` (``EngineManifest``), the checks that
refuse a plan made for another TensorRT, GPU or graph, and finding a bundle's engine.

An engine is tied to the exact TensorRT version and the GPU model it was built on, so it is built
where it runs (``gpt2-edge build-engine BUNDLE``, ``gpt2_edge.engine.builder``) into
``BUNDLE/engines/<gpu-key>/``:

    engines/nvidia-jetson-orin-nano-sm87-trt10.3.0/
        engine.plan      the serialized engine
        engine.json      TensorRT version, GPU, profiles, limits, precision, the bundle's hashes
        timing.cache     kernel timings: a rebuild on this GPU skips measuring them again

The builder writes this format and the engine backend reads it; neither needs ``tensorrt`` here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..bundle import Bundle
from .cuda import DeviceInfo
from .errors import EngineError
from .shapes import Profile

ENGINE_SCHEMA = 1
PLAN = "engine.plan"
MANIFEST = "engine.json"
TIMING_CACHE = "timing.cache"
ENGINES_DIR = "engines"


# keys --------------------------------------------------------------------------------------------
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


def model_hashes(bundle: Bundle) -> dict[str, str]:
    """sha256 of the graph and its external data, as the bundle's manifest records them."""
    return {n: f.sha256 for n, f in bundle.manifest.model_files().items()}


# the engine manifest -------------------------------------------------------------------------------
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
        have = model_hashes(bundle)
        if have != manifest.bundle.get("model_sha256"):
            raise EngineError(
                f"{engine_dir} was built from another model.onnx than {bundle.path} has now (the bundle was "
                f"re-exported or re-quantized): {fix}"
            )
        if manifest.precision != bundle.precision:
            raise EngineError(
                f"{engine_dir} is a {manifest.precision} engine; {bundle.path} is {bundle.precision}: {fix}"
            )


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
