"""Write a bundle's manifest and publish its directory atomically (fill a temporary directory,
hash it, then rename it into place). Torch-free: the export and the quantizers both write bundles.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..fsutil import OWNER_FILE, publish_dir
from ..runtime.bundle import MANIFEST, SCHEMA_VERSION, sha256_file

# Bytes of weights past which a bundle's are ONNX external data (model.onnx.data, 4 KiB-aligned,
# memory-mapped): below protobuf's 2 GiB limit, and low enough that gpt2-medium (1.42 GB) goes out
# too: writing and re-reading one 1.4 GB protobuf made its export peak 3.5x its weights, 1.8x as
# external data (docs/export.md, "The paper's sizes").
EXTERNAL_DATA_THRESHOLD = 1_000_000_000


def producer_versions() -> dict[str, str]:
    """Versions of the packages that made a bundle (those installed)."""
    out = {}
    for pkg in ("gpt2-edge", "torch", "onnx", "onnxruntime", "onnxscript", "tokenizers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in ``directory`` and write its ``bundle.json``; returns the full manifest."""
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name not in (MANIFEST, OWNER_FILE):
            files[f.relative_to(directory).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def finalize(tmp: Path, target: Path, manifest: dict[str, Any], overwrite: bool = False) -> Path:
    """Hash every file in ``tmp``, write ``bundle.json``, and move ``tmp`` to ``target``."""
    write_manifest(tmp, manifest)
    return publish_dir(tmp, target, overwrite)
