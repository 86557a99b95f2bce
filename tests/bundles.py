"""The one factory of test bundles: tiny random checkpoints -> exported (and quantized) bundles.

Every bundle a test uses is a ``BundleSpec`` registered in ``SPECS``, under a name that encodes the
checkpoint (config and seed) and the export/quantize arguments, e.g.
``gpt-l2-e64-h4-v300-p64-s0.tensorrt-concat.int8-qdq.calib-sample``. Tests get them from the
``make_bundle`` fixture (conftest.py), which calls ``BundleFactory``:

- with torch (and the export extra) installed, a missing bundle is exported from the tiny checkpoint
  and, for a precision other than fp32, quantized from its fp32 bundle (gates forced: random models);
- with ``GPT2_EDGE_TEST_BUNDLES=DIR`` set, bundle N is read from / written to ``DIR/N``. A run with
  torch fills DIR; a torch-free run (a device's install: ``pip install gpt2-edge[cpu,serve]``)
  reads the same bundles. ``DIR/N.sources`` holds a hash of the code that made it (gpt2_edge but
  its serve/cli/bench/demo, and this file): a bundle of other sources is re-made, or skipped;
- without torch and without the bundle in DIR, the test skips, naming the variable.

``python -m tests.bundles [DIR]`` (torch needed) makes every registered bundle in DIR, or in
$GPT2_EDGE_TEST_BUNDLES: ``make test-lite`` runs it before the torch-free tests.

A bundle from the factory is shared by every test of the session (and, through DIR, by later runs):
never write into it; copy it first (``shutil.copytree``) to damage it or build an engine into it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV = "GPT2_EDGE_TEST_BUNDLES"
PACKAGE = Path(__file__).resolve().parent.parent / "gpt2_edge"
# Layers above the bundle-making code (pyproject's import-linter contract): their edits make no new bundle.
NOT_UPSTREAM = ("serve", "cli", "bench", "demo")


def calib_texts() -> dict[str, str]:
    """Calibration texts (int8-qdq) by the name a spec's ``calib`` gives."""
    from tests.helpers import SAMPLE_TEXT

    return {"sample": SAMPLE_TEXT, "sample-x2": SAMPLE_TEXT * 2}


@dataclass(frozen=True)
class ModelSpec:
    """A tiny random checkpoint: ``random_gpt(tiny_config(...), seed)`` with a byte-level BPE
    tokenizer of ``vocab_size`` trained on ``SAMPLE_TEXT`` (the conftest's ``tiny_checkpoint``)."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    vocab_size: int = 300
    n_positions: int = 64
    seed: int = 0
    shipped: bool = False  # the package's default model (gpt2_edge/default_model) instead

    @property
    def name(self) -> str:
        if self.shipped:
            return "default-model"
        return (
            f"gpt-l{self.n_layer}-e{self.n_embd}-h{self.n_head}-v{self.vocab_size}"
            f"-p{self.n_positions}-s{self.seed}"
        )


TINY = ModelSpec()


@dataclass(frozen=True)
class BundleSpec:
    model: ModelSpec = TINY
    target: str = "ort"
    kv_cache: str = "inplace"
    precision: str = "fp32"
    calib: str | None = None  # int8-qdq only: a key of calib_texts()
    export: tuple[tuple[str, object], ...] = field(default=())  # other export_bundle arguments, sorted

    @property
    def name(self) -> str:
        parts = [self.model.name, f"{self.target}-{self.kv_cache}", self.precision]
        if self.calib is not None:
            parts.append(f"calib-{self.calib}")
        parts += [f"{k}={v}" for k, v in self.export]
        return ".".join(parts)

    @property
    def fp32(self) -> BundleSpec:
        """The bundle a quantized one is made from."""
        return BundleSpec(self.model, self.target, self.kv_cache, "fp32", None, self.export)


def spec(
    target: str = "ort",
    kv_cache: str | None = None,
    precision: str = "fp32",
    model: ModelSpec = TINY,
    calib: str | None = None,
    **export: object,
) -> BundleSpec:
    """A spec with export_bundle's defaults filled in (the KV form follows the target), so equal
    bundles get one name. int8-qdq calibrates on ``calib`` ("sample" unless given)."""
    kv_cache = kv_cache or ("inplace" if target == "ort" else "concat")
    if precision == "int8-qdq":
        calib = calib or "sample"
    elif calib is not None:
        raise ValueError(f"calib is for int8-qdq only, not {precision}")
    return BundleSpec(model, target, kv_cache, precision, calib, tuple(sorted(export.items())))


# every bundle the tests use: `python -m tests.bundles` makes them all for torch-free runs
INPLACE = spec()
CONCAT = spec(kv_cache="concat")
TRT_TARGET = spec(target="tensorrt")
SHIPPED = spec(model=ModelSpec(shipped=True))  # the default model's fp32 bundle (its own 8192-token BPE)
# the half-width class (tests/runtime/test_openvino.py): made from the standard-op tensorrt target;
# the shipped model's is gated on its held-out sample
BF16 = spec(target="tensorrt", precision="bf16")
SHIPPED_BF16 = spec(target="tensorrt", precision="bf16", model=ModelSpec(shipped=True))
# run-time LoRA adapters (tests/runtime/test_lora_runtime.py, tests/serve/test_serve_lora.py)
LORA_SLOTS = spec(lora_slots=4, lora_rank=8)
LORA_SLOTS_CONCAT = spec(kv_cache="concat", lora_slots=4, lora_rank=8)
BATCH_INVARIANCE_PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-weight", "int8-qdq", "int4")
SPECS: dict[str, BundleSpec] = {
    s.name: s
    for s in [
        INPLACE,
        CONCAT,
        TRT_TARGET,
        SHIPPED,  # structured output on a trained model (tests/runtime/test_structured.py)
        BF16,
        SHIPPED_BF16,
        SHIPPED_BF16.fp32,
        LORA_SLOTS,
        LORA_SLOTS_CONCAT,
        # another random model for beam search (tests/runtime/test_beam.py on the ORT backend)
        spec(model=ModelSpec(seed=5)),
        # the GPU tests (tests/engine/test_engine_gpu.py)
        spec(target="tensorrt", precision="fp16"),
        spec(target="tensorrt", precision="int8-qdq"),
        # batch invariance (tests/runtime/test_batch_invariance.py): every precision of both KV forms
        *(
            spec(kv_cache=form, precision=p, calib="sample-x2" if p == "int8-qdq" else None)
            for form in ("inplace", "concat")
            for p in BATCH_INVARIANCE_PRECISIONS
            if not (form == "inplace" and p == "fp16")  # quantize refuses it: fp16 is for CUDA/TensorRT
        ),
    ]
}


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root``: size and mtime."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in root.rglob("*")
    }


class BundleUnavailableError(Exception):
    """The bundle cannot be had here (no torch, not in DIR): the fixture turns this into a skip."""


def sources_hash() -> str:
    """A hash of the code that makes bundles: gpt2_edge's modules (but the layers above quantize)
    and the recipe in tests/ (this file, helpers.py)."""
    h = hashlib.sha256()
    files = [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.relative_to(PACKAGE).parts[0].removesuffix(".py") not in NOT_UPSTREAM
    ]
    here = Path(__file__).resolve()
    for p in [*files, here, here.parent / "helpers.py"]:
        h.update(p.relative_to(PACKAGE.parent).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def can_export() -> str | None:
    """None where bundles can be made here, else why not."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    try:
        import gpt2_edge.export.bundle
        import gpt2_edge.quantize.pipeline  # noqa: F401
    except ImportError as e:
        return f"the export extra is not installed ({e})"
    return None


class BundleFactory:
    """Bundles by spec, made once per session in ``root`` (``DIR`` of $GPT2_EDGE_TEST_BUNDLES, else a
    temp directory); checkpoints in ``work``."""

    def __init__(self, root: Path, work: Path, from_env: bool) -> None:
        self.root, self.work, self.from_env = root, work, from_env
        self._sources = sources_hash()
        self._made: dict[str, Path] = {}
        self._listings: dict[str, dict[str, tuple[int, int]]] = {}
        self._checkpoints: dict[ModelSpec, Path] = {}

    @classmethod
    def from_environment(cls, tmp: Path) -> BundleFactory:
        env = os.environ.get(ENV)
        if env:
            root = Path(env).resolve()
            root.mkdir(parents=True, exist_ok=True)
            return cls(root, tmp / "checkpoints", from_env=True)
        return cls(tmp / "bundles", tmp / "checkpoints", from_env=False)

    def __call__(
        self, target: str = "ort", kv_cache: str | None = None, precision: str = "fp32", **kw
    ) -> Path:
        """The bundle of ``spec(target, kv_cache, precision, **kw)``, which must be in SPECS."""
        return self.get(spec(target, kv_cache, precision, **kw))

    def get(self, s: BundleSpec | str) -> Path:
        name = s if isinstance(s, str) else s.name
        if name not in SPECS:
            raise KeyError(
                f"bundle {name} is not registered: add its spec(...) to SPECS in tests/bundles.py "
                "(so `python -m tests.bundles` makes it for torch-free runs)"
            )
        if name not in self._made:
            self._made[name] = self._ensure(SPECS[name])
            self._listings[name] = listing(self._made[name])
        return self._made[name]

    def written_into(self) -> list[str]:
        """What tests changed in the bundles handed out (the session's end checks it is nothing)."""
        changed = []
        for name, before in self._listings.items():
            after = listing(self._made[name])
            changed += [f"{name}/{f}" for f in sorted(set(before) ^ set(after))]
            changed += [
                f"{name}/{f} (rewritten)" for f in sorted(set(before) & set(after)) if before[f] != after[f]
            ]
        return changed

    def checkpoint(self, model: ModelSpec = TINY) -> Path:
        """The checkpoint of ``model`` (torch needed)."""
        if model.shipped:
            from gpt2_edge import DEFAULT_MODEL_DIR

            return DEFAULT_MODEL_DIR
        if model not in self._checkpoints:
            from gpt2_edge.model.checkpoint import save_checkpoint
            from gpt2_edge.runtime.tokenizer import Tokenizer
            from tests.helpers import SAMPLE_TEXT, random_gpt, tiny_config

            tok = Tokenizer.train([SAMPLE_TEXT], vocab_size=model.vocab_size, min_frequency=1)
            cfg = tiny_config(model.n_layer, model.n_embd, model.n_head, model.vocab_size, model.n_positions)
            gpt = random_gpt(cfg, seed=model.seed)
            self._checkpoints[model] = save_checkpoint(gpt, self.work / model.name, tok)
        return self._checkpoints[model]

    def _stamp(self, name: str) -> Path:
        return self.root / f"{name}.sources"

    def _ensure(self, s: BundleSpec) -> Path:
        out = self.root / s.name
        stamp = self._stamp(s.name)
        fresh = out.is_dir() and stamp.is_file() and stamp.read_text().strip() == self._sources
        if fresh:
            return out
        why = can_export()
        if why is not None:
            where = f"{ENV}={self.root}" if self.from_env else f"{ENV} is not set"
            state = "made from other sources" if out.is_dir() else "missing"
            raise BundleUnavailableError(
                f"bundle {s.name} is {state} ({where}) and {why} to make it: run the suite (or "
                f"`python -m tests.bundles DIR`) with torch and {ENV}=DIR first, then this run with {ENV}=DIR"
            )
        stamp.unlink(missing_ok=True)
        self._make(s, out)
        tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
        tmp.write_text(self._sources + "\n")
        tmp.replace(stamp)
        return out

    def _make(self, s: BundleSpec, out: Path) -> None:
        from gpt2_edge.export.bundle import export_bundle
        from gpt2_edge.quantize.pipeline import quantize_bundle

        quiet = {"log": lambda _: None, "overwrite": True}
        if s.precision == "fp32":
            export_bundle(
                self.checkpoint(s.model), out, target=s.target, kv_cache=s.kv_cache, **dict(s.export), **quiet
            )
            return
        calib = None
        if s.calib is not None:
            calib = self.work / f"calib-{s.calib}.txt"
            calib.parent.mkdir(parents=True, exist_ok=True)
            calib.write_text(calib_texts()[s.calib])
        quantize_bundle(self.get(s.fp32), s.precision, out, calib_text=calib, force=True, **quiet)


def main(argv: list[str]) -> int:
    """``python -m tests.bundles [DIR]``: make every registered bundle in DIR (or $GPT2_EDGE_TEST_BUNDLES)."""
    import tempfile

    if len(argv) > 1 or (not argv and not os.environ.get(ENV)):
        print(f"usage: python -m tests.bundles DIR (or set {ENV})", file=sys.stderr)
        return 2
    if argv:
        os.environ[ENV] = argv[0]
    why = can_export()
    if why is not None:
        print(f"cannot make bundles: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        factory = BundleFactory.from_environment(Path(tmp))
        t0 = time.monotonic()
        for name in SPECS:
            factory.get(name)
        print(f"{len(SPECS)} bundles in {factory.root} ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
