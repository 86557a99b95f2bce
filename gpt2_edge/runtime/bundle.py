"""Read and verify a bundle: ``bundle.json`` + ``model.onnx`` (+ data) + ``tokenizer.json``. No torch.

Loading checks the schema version, the manifest against its schema (``manifest.py``), that every
listed file is a plain name inside the bundle and exists with its recorded size and sha256, and
refuses anything else with a message naming the file or key and what to do. The graph itself is
checked against the manifest's IO when a session opens it (``check_session``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract import TensorSpec
from ..errors import Gpt2EdgeError
from .manifest import SCHEMA_VERSION, Manifest, ManifestError, ModelDims, SchemaVersionError, kind_of
from .tokenizer import Tokenizer

MANIFEST = "bundle.json"
__all__ = ["MANIFEST", "SCHEMA_VERSION", "Bundle", "BundleError", "sha256_file"]


class BundleError(Gpt2EdgeError):
    """A bundle is missing, incomplete, corrupt, or from an unknown schema."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk; everything the runtime needs is read from its manifest."""

    path: Path
    manifest: Manifest

    # model dims and contract ---------------------------------------------------------------
    @property
    def model_file(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def prompt_model_file(self) -> Path | None:
        """The graph prompt chunks run through (int4 bundles; quantize/int4.py), or None."""
        name = self.manifest.prompt_model_file
        return self.path / name if name is not None else None

    @property
    def dims(self) -> ModelDims:
        return self.manifest.model

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self.manifest.inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self.manifest.outputs)

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def kv_form(self) -> str:
        """``concat`` (present = past + new, fresh tensors) or ``inplace`` (one buffer per slot)."""
        return self.manifest.kv_cache

    @property
    def eos_token_id(self) -> int | None:
        return self.manifest.generation.eos_token_id

    @property
    def context_length(self) -> int:
        return self.manifest.generation.context_length

    def tokenizer(self) -> Tokenizer:
        """The bundle's ``tokenizer.json`` (the tokenizer module is torch-free)."""
        return Tokenizer.from_file(self.path / "tokenizer.json")

    # Hugging Face's tokenizer settings, read only from files the manifest lists (so verified):
    # an export that keeps them lists them; a file copied in by hand beside them is not the bundle's.
    TOKENIZER_CONFIG = "tokenizer_config.json"
    CHAT_TEMPLATE = "chat_template.jinja"  # where transformers >= 4.43 saves a chat template

    def has_file(self, name: str) -> bool:
        """Whether ``name`` is one of the bundle's files (listed in the manifest, hence verified)."""
        return name in self.manifest.files

    def tokenizer_config(self) -> dict[str, Any]:
        """The bundle's ``tokenizer_config.json`` (``{}`` when the bundle carries none)."""
        if not self.has_file(self.TOKENIZER_CONFIG):
            return {}
        f = self.path / self.TOKENIZER_CONFIG
        try:
            config = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{f} is not valid JSON ({e}); re-export the bundle") from None
        if not isinstance(config, dict):
            raise BundleError(f"{f} is a JSON {kind_of(config)}, not an object; re-export the bundle")
        return config

    def chat_template(self) -> str | None:
        """The model's Hugging Face chat template (Jinja source), or None when it has none: a
        ``chat_template.jinja`` file, else ``tokenizer_config.json``'s ``chat_template`` (a string,
        or a list of ``{"name", "template"}`` of which the one named ``default`` counts)."""
        if self.has_file(self.CHAT_TEMPLATE):
            return (self.path / self.CHAT_TEMPLATE).read_text(encoding="utf-8")
        t = self.tokenizer_config().get("chat_template")
        if isinstance(t, list):
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
            t = named.get("default")
        if t is not None and not isinstance(t, str):
            raise BundleError(
                f"{self.path / self.TOKENIZER_CONFIG}: chat_template must be a string or a list of "
                "{name, template}; re-export the bundle"
            )
        return t or None

    def check_session(self, session: Any, file: Path | None = None) -> None:
        """Refuse a graph whose inputs/outputs (names, element types, ranks) differ from ``io``:
        a ``model.onnx`` from another model or export would otherwise fail on its first step.
        ``file``: the graph's file, where it is not ``model_file`` (the prompt graph)."""
        onnx_types = {
            "tensor(int64)": "int64",
            "tensor(float)": "float32",
            "tensor(float16)": "float16",
            "tensor(int32)": "int32",
            "tensor(bfloat16)": "bfloat16",
        }
        graph = file or self.model_file
        for kind, got, want in (
            ("inputs", session.get_inputs(), self.inputs),
            ("outputs", session.get_outputs(), self.outputs),
        ):
            got_names, want_names = [g.name for g in got], [w.name for w in want]
            if got_names != want_names:
                missing = [n for n in want_names if n not in got_names]
                extra = [n for n in got_names if n not in want_names]
                raise BundleError(
                    f"{graph} does not match {MANIFEST}: the graph's {kind} differ (missing "
                    f"{missing[:4] or 'none'}, unexpected {extra[:4] or 'none'}); the file is from another "
                    "export: re-export the bundle"
                )
            for g, w in zip(got, want, strict=True):
                gtype = onnx_types.get(g.type, g.type)
                if gtype != w.dtype or len(g.shape) != len(w.shape):
                    raise BundleError(
                        f"{graph} does not match {MANIFEST}: {g.name} is {gtype} of rank "
                        f"{len(g.shape)}, the manifest says {w.dtype} of rank {len(w.shape)}; "
                        "re-export the bundle"
                    )
                for gd, wd in zip(g.shape, w.shape, strict=True):
                    if isinstance(wd, int) and isinstance(gd, int) and gd != wd:
                        raise BundleError(
                            f"{graph} does not match {MANIFEST}: {g.name} has shape "
                            f"{list(g.shape)}, the manifest says {list(w.shape)} (another model's dims); "
                            "re-export the bundle"
                        )

    # loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        """Open a bundle; ``verify`` re-hashes every file (sizes are always checked)."""
        root = Path(path)
        if root.is_file():
            hint = f"; pass its directory {root.parent}" if root.name == MANIFEST else ""
            raise BundleError(
                f"{root} is a file, not a bundle directory (a bundle is the directory `gpt2-edge export` "
                f"writes, with {MANIFEST}){hint}"
            )
        if not root.is_dir():
            raise BundleError(f"bundle {root} does not exist (make one with `gpt2-edge export -o {root}`)")
        mf = root / MANIFEST
        if not mf.is_file():
            raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing (re-run `gpt2-edge export`)")
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mf} is not valid JSON ({e}); re-export the bundle") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{mf} is a JSON {kind_of(manifest)}, not an object; re-export the bundle")
        try:
            typed = Manifest.parse(manifest)
        except SchemaVersionError as e:
            raise BundleError(
                f"{mf} has schema version {e.version!r}; this gpt2-edge reads version {SCHEMA_VERSION}. "
                "Re-export the bundle with this version, or install the gpt2-edge that made it"
            ) from None
        except ManifestError as e:
            raise BundleError(f"{mf}: {e}; re-export the bundle") from None
        real_root = root.resolve()
        for name, meta in typed.files.items():
            f = root / name
            if not f.is_file():
                raise BundleError(f"{f} is missing from the bundle; re-export or copy the whole directory")
            if not f.resolve().is_relative_to(real_root):
                raise BundleError(
                    f"{f} points outside the bundle (to {f.resolve()}); a bundle holds its own files: "
                    "copy the file into it, or re-export the bundle"
                )
            size = f.stat().st_size
            if size != meta.bytes:
                raise BundleError(
                    f"{f} is {size} bytes, the manifest says {meta.bytes}: truncated or replaced; "
                    "re-export or copy the bundle again"
                )
            if verify and sha256_file(f) != meta.sha256:
                raise BundleError(
                    f"{f} does not match its sha256 in {MANIFEST}: the file is corrupt or was changed; "
                    "re-export or copy the bundle again"
                )
        return cls(root, typed)
