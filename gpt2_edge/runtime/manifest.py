"""The bundle manifest (``bundle.json``): its schema, declared once, and the check run on load. No torch.

The schema says what every key holds (type, allowed values, required or not); ``validate``
checks a parsed manifest against it, then checks what types cannot say: file names are plain
names inside the bundle, the model dims agree with each other and with the IO contract. Each
problem is reported with the path of its key (``generation.context_length``,
``files['model.onnx'].bytes``, ``io.inputs[3].shape[1]``).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from .. import contract
from ..errors import Gpt2EdgeError

SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "fp16", "bf16", "int8-dynamic", "int8-weight", "int8-qdq", "int4")
TARGETS = ("ort", "tensorrt")
KV_CACHE_FORMS = ("inplace", "concat")  # absent = concat (bundles written before the in-place form)
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32")


class ManifestError(Gpt2EdgeError):
    """A manifest of the wrong shape: the message names the key."""


class SchemaVersionError(ManifestError):
    """A manifest of another schema version (its keys may mean other things: nothing else is read)."""

    def __init__(self, version: Any) -> None:
        super().__init__(f"schema version {version!r}; this gpt2-edge reads version {SCHEMA_VERSION}")
        self.version = version


@dataclass(frozen=True)
class Spec:
    """What one manifest value must be.

    ``kind``: object (known ``keys``; others are allowed, for newer writers), map (any string
    keys, values ``item``), list (of ``item``), int, number, str, dim (a fixed size or a symbolic
    name), or any.
    """

    kind: str
    keys: dict[str, Spec] = field(default_factory=dict)
    item: Spec | None = None
    required: bool = True
    nullable: bool = False
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    pattern: str | None = None  # a str must match it in full
    pattern_says: str = ""  # the pattern in words, for the message


def obj(required: bool = True, nullable: bool = False, **keys: Spec) -> Spec:
    return Spec("object", keys=keys, required=required, nullable=nullable)


INT = Spec("int")
POSITIVE = Spec("int", minimum=1)
TOKEN_ID = Spec("int", minimum=0, nullable=True)
STR = Spec("str")
OPTIONAL_STR = Spec("str", required=False, nullable=True)
SHA256 = Spec("str", pattern="[0-9a-f]{64}", pattern_says="64 hex digits")
TENSOR = obj(name=STR, dtype=Spec("str", choices=DTYPES), shape=Spec("list", item=Spec("dim")))
FREE_FORM = obj(required=False, nullable=True)  # reports: informational, read by people

SCHEMA = obj(
    schema_version=INT,
    model_file=STR,
    # int4 bundles: a second graph with the same IO for prompt chunks (quantize/int4.py)
    prompt_model_file=OPTIONAL_STR,
    model=obj(
        n_layer=POSITIVE,
        n_head=POSITIVE,
        n_embd=POSITIVE,
        head_size=POSITIVE,
        vocab_size=POSITIVE,
        n_positions=POSITIVE,
    ),
    io=obj(inputs=Spec("list", item=TENSOR), outputs=Spec("list", item=TENSOR)),
    files=Spec("map", item=obj(bytes=Spec("int", minimum=0), sha256=SHA256)),
    generation=obj(
        eos_token_id=TOKEN_ID,
        bos_token_id=Spec("int", minimum=0, nullable=True, required=False),
        context_length=POSITIVE,
    ),
    precision=Spec("str", choices=PRECISIONS),
    target=Spec("str", choices=TARGETS),
    kv_cache=Spec("str", choices=KV_CACHE_FORMS, required=False),
    kv_dtype=Spec("str", choices=("float32", "float16", "bfloat16"), required=False),
    made_by=obj(required=False, source=OPTIONAL_STR, source_sha256=OPTIONAL_STR),
    producers=Spec("map", item=STR, required=False),
    graph=FREE_FORM,
    validation=FREE_FORM,
    accuracy=FREE_FORM,
    quantization=Spec(
        "object", keys={"from": OPTIONAL_STR, "from_sha256": OPTIONAL_STR}, required=False, nullable=True
    ),
    # A LoRA adapter merged into the weights at export (absent: none).
    lora=obj(
        required=False,
        nullable=True,
        name=STR,
        files=Spec("map", item=SHA256),
        rank=POSITIVE,
        alpha=Spec("number"),
        use_rslora=Spec("any", required=False),
        target_modules=Spec("list", item=STR),
    ),
    # Run-time LoRA slots (``export --lora-slots``): the graph takes stacked adapters as inputs.
    lora_slots=obj(
        required=False,
        nullable=True,
        slots=POSITIVE,
        rank=POSITIVE,
        targets=Spec("list", item=STR),
    ),
)

_KIND_NAMES = {
    "object": "an object",
    "map": "an object",
    "list": "a list",
    "int": "an integer",
    "number": "a number",
    "str": "a string",
    "dim": "an integer or a string",
}


def _describe(value: Any, expected: str) -> str:
    """``value`` as the message shows it: containers by kind, scalars by value (short)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if expected in ("object", "map", "list"):
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true or false"
        return _KIND_NAMES[
            "int" if isinstance(value, int) else "number" if isinstance(value, float) else "str"
        ]
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def kind_of(value: Any) -> str:
    """The JSON kind of a parsed value: object, list, string, number, boolean or null."""
    if value is None:
        return "null"
    for t, name in ((dict, "object"), (list, "list"), (str, "string"), (bool, "boolean")):
        if isinstance(value, t):
            return name
    return "number"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(value: Any, spec: Spec, path: str, problems: list[str]) -> None:
    """Append to ``problems`` what is wrong with ``value`` at ``path`` (recursively)."""
    if value is None:
        if not spec.nullable:
            problems.append(f"{path} must be {_KIND_NAMES.get(spec.kind, 'set')}, got null")
        return
    kind = spec.kind
    ok = {
        "object": isinstance(value, dict),
        "map": isinstance(value, dict),
        "list": isinstance(value, list),
        "int": _is_int(value),
        "number": _is_int(value) or (isinstance(value, float) and math.isfinite(value)),
        "str": isinstance(value, str),
        "dim": (_is_int(value) and value >= 1) or (isinstance(value, str) and value != ""),
        "any": True,
    }[kind]
    if not ok:
        problems.append(f"{path} must be {_KIND_NAMES[kind]}, got {_describe(value, kind)}")
        return
    if spec.choices and value not in spec.choices:
        problems.append(f"{path} must be one of {', '.join(spec.choices)}, got {_describe(value, kind)}")
    if spec.minimum is not None and value < spec.minimum:
        problems.append(f"{path} must be >= {spec.minimum}, got {value}")
    if spec.pattern and not re.fullmatch(spec.pattern, value):
        problems.append(f"{path} must be {spec.pattern_says}, got {_describe(value, kind)}")
    if kind == "object":
        for key, sub in spec.keys.items():
            where = f"{path}.{key}" if path else key
            if key not in value:
                if sub.required:
                    problems.append(f"{where} is missing")
                continue
            _check(value[key], sub, where, problems)
    elif kind == "map" and spec.item is not None:
        for key, v in value.items():
            _check(v, spec.item, f"{path}[{key!r}]", problems)
    elif kind == "list" and spec.item is not None:
        for i, v in enumerate(value):
            _check(v, spec.item, f"{path}[{i}]", problems)


def plain_name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain relative POSIX name inside a directory (None when it is)."""
    if not name or "\\" in name or "\0" in name or ":" in name:
        return "empty, or holds a backslash, a colon or NUL"
    p = PurePosixPath(name)
    if p.is_absolute():
        return "an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "a path with '.', '..' or empty parts"
    return None


def validate(manifest: Any) -> None:
    """Check a parsed ``bundle.json`` against ``SCHEMA`` and the contract; ``ManifestError`` names the key."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"the manifest is a JSON {kind_of(manifest)}, not an object")
    problems: list[str] = []
    _check(manifest, SCHEMA, "", problems)
    if not problems:
        _check_meaning(manifest, problems)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ManifestError(problems[0] + more)


def _check_meaning(m: dict[str, Any], problems: list[str]) -> None:
    """What the types cannot say: names, cross-references, dims against the IO contract."""
    for name in m["files"]:
        why = plain_name_problem(name)
        if why:
            problems.append(
                f"files[{name!r}] is not a plain relative name inside the bundle ({why}); "
                "a bundle lists only its own files"
            )
    if m["model_file"] not in m["files"]:
        problems.append(f"model_file {m['model_file']!r} is not listed in files")
    prompt = m.get("prompt_model_file")
    if prompt is not None and prompt not in m["files"]:
        problems.append(f"prompt_model_file {prompt!r} is not listed in files")
    if "tokenizer.json" not in m["files"]:
        problems.append("files does not list tokenizer.json")
    d = m["model"]
    if d["head_size"] * d["n_head"] != d["n_embd"]:
        problems.append(
            f"model.head_size ({d['head_size']}) x model.n_head ({d['n_head']}) must equal "
            f"model.n_embd ({d['n_embd']})"
        )
    g = m["generation"]
    if g["context_length"] > d["n_positions"]:
        problems.append(
            f"generation.context_length ({g['context_length']}) exceeds model.n_positions "
            f"({d['n_positions']})"
        )
    for key in ("eos_token_id", "bos_token_id"):
        if g.get(key) is not None and g[key] >= d["vocab_size"]:
            problems.append(f"generation.{key} ({g[key]}) is outside the vocabulary ({d['vocab_size']})")
    if problems:
        return
    form = m.get("kv_cache", "concat")
    keep = any(s["name"] == "logits_to_keep" for s in m["io"]["inputs"])
    invariant = any(s["name"] == "step_invariant" for s in m["io"]["inputs"])
    lora_rank = (m.get("lora_slots") or {}).get("rank", 0)
    want = {
        "inputs": contract.inputs(
            d["n_layer"],
            d["n_head"],
            d["head_size"],
            kv_cache=form,
            logits_to_keep=keep,
            step_invariant=invariant,
            lora_rank=lora_rank,
        ),
        "outputs": contract.outputs(
            d["n_layer"], d["n_head"], d["head_size"], d["vocab_size"], kv_cache=form, logits_to_keep=keep
        ),
    }
    sources = {1: "model.n_head", 3: "model.head_size"}  # of past/present; logits' [2] is the vocabulary
    for kind, specs in want.items():
        got = m["io"][kind]
        for i, (g_spec, w_spec) in enumerate(zip(got, specs, strict=False)):
            where = f"io.{kind}[{i}]"
            if g_spec["name"] != w_spec.name:
                problems.append(f"{where}.name is {g_spec['name']!r}, the contract says {w_spec.name!r}")
                return
            if len(g_spec["shape"]) != len(w_spec.shape):
                problems.append(
                    f"{where}.shape has rank {len(g_spec['shape'])}, the contract says {len(w_spec.shape)}"
                )
                return
            for j, (gd, wd) in enumerate(zip(g_spec["shape"], w_spec.shape, strict=True)):
                if _is_int(wd) and gd != wd:
                    source = "model.vocab_size" if w_spec.name == "logits" else sources[j]
                    problems.append(f"{where}.shape[{j}] is {gd!r}, {source} is {wd}")
                    return
        if len(got) != len(specs):
            problems.append(
                f"io.{kind} has {len(got)} entries, the contract for model.n_layer {d['n_layer']} "
                f"has {len(specs)}"
            )
            return


# The typed manifest ---------------------------------------------------------------------------
# ``Manifest.parse`` is the only reader of ``bundle.json``'s dict: everyone else reads these fields.


@dataclass(frozen=True)
class ModelDims:
    """The model's shape (``model``)."""

    n_layer: int
    n_head: int
    n_embd: int
    head_size: int
    vocab_size: int
    n_positions: int


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle: its size and sha256 (``files[name]``)."""

    bytes: int
    sha256: str


@dataclass(frozen=True)
class GenerationInfo:
    """Generation defaults (``generation``)."""

    eos_token_id: int | None
    context_length: int
    bos_token_id: int | None = None


@dataclass(frozen=True)
class MadeBy:
    """How the graph was made (``made_by``): the source checkpoint and the exporter."""

    source: str | None = None
    source_sha256: str | None = None
    exporter: str = ""
    opset: str = ""
    graph: str = ""


@dataclass(frozen=True)
class Quantization:
    """How a precision variant was made (``quantization``). ``batch_invariant``: its activation scales
    are per row (int8-dynamic bundles made before per-row scales have one scale per tensor, which
    makes rows change each other's logits)."""

    source: str | None
    source_sha256: str | None
    batch_invariant: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # the converter's report, for people


@dataclass(frozen=True)
class LoraInfo:
    """The LoRA adapter merged into the weights at export (``lora``): its name, the sha256 of its
    files, its rank (the largest of its modules), alpha and the block projections it changes."""

    name: str
    files: dict[str, str]
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class LoraSlots:
    """Run-time LoRA slots (``lora_slots``): the graph adds ``(x A[id]) B[id]`` to each of
    ``targets`` per batch row (``contract.inputs(lora_rank=...)``); up to ``slots`` adapters of rank
    up to ``rank`` are loaded at once."""

    slots: int
    rank: int
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """A parsed and validated ``bundle.json``. The reports (``graph``, ``validation``, ``accuracy``)
    are informational dicts for people and tools; everything the runtime decides on is a field."""

    schema_version: int
    model_file: str
    model: ModelDims
    inputs: tuple[contract.TensorSpec, ...]
    outputs: tuple[contract.TensorSpec, ...]
    files: dict[str, FileEntry]
    generation: GenerationInfo
    precision: str
    target: str
    kv_cache: str = "concat"  # absent in bundles written before the in-place form
    kv_dtype: str | None = None
    made_by: MadeBy = field(default_factory=MadeBy)
    producers: dict[str, str] = field(default_factory=dict)
    quantization: Quantization | None = None
    lora: LoraInfo | None = None
    lora_slots: LoraSlots | None = None
    graph: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    # The graph prompt chunks run through (same IO as ``model_file``; quantize/int4.py), or None.
    prompt_model_file: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, data: Any) -> Manifest:
        """Validate ``data`` (a parsed ``bundle.json``) and type it; ``ManifestError`` names the key,
        ``SchemaVersionError`` (checked first) says the version is another one."""
        if isinstance(data, dict) and data.get("schema_version") != SCHEMA_VERSION:
            raise SchemaVersionError(data.get("schema_version"))
        validate(data)
        m = data
        made = m.get("made_by") or {}
        q = m.get("quantization")
        quantization = None
        if q is not None:
            quantization = Quantization(
                source=q.get("from"),
                source_sha256=q.get("from_sha256"),
                batch_invariant=bool(q.get("batch_invariant", False)),
                details={k: v for k, v in q.items() if k not in ("from", "from_sha256", "batch_invariant")},
            )
        lo = m.get("lora")
        lora = None
        if lo is not None:
            lora = LoraInfo(
                name=lo["name"],
                files=dict(lo["files"]),
                rank=lo["rank"],
                alpha=float(lo["alpha"]),
                use_rslora=bool(lo.get("use_rslora", False)),
                target_modules=tuple(lo["target_modules"]),
            )
        ls = m.get("lora_slots")
        lora_slots = LoraSlots(ls["slots"], ls["rank"], tuple(ls["targets"])) if ls is not None else None
        g = m["generation"]
        return cls(
            schema_version=m["schema_version"],
            model_file=m["model_file"],
            prompt_model_file=m.get("prompt_model_file"),
            model=ModelDims(**{k: m["model"][k] for k in ModelDims.__dataclass_fields__}),
            inputs=tuple(contract.TensorSpec.from_dict(d) for d in m["io"]["inputs"]),
            outputs=tuple(contract.TensorSpec.from_dict(d) for d in m["io"]["outputs"]),
            files={name: FileEntry(f["bytes"], f["sha256"]) for name, f in m["files"].items()},
            generation=GenerationInfo(g["eos_token_id"], int(g["context_length"]), g.get("bos_token_id")),
            precision=m["precision"],
            target=m["target"],
            kv_cache=m.get("kv_cache", "concat"),
            kv_dtype=m.get("kv_dtype"),
            made_by=MadeBy(
                source=made.get("source"),
                source_sha256=made.get("source_sha256"),
                exporter=str(made.get("exporter", "")),
                opset=str(made.get("opset", "")),
                graph=str(made.get("graph", "")),
            ),
            producers=dict(m.get("producers") or {}),
            quantization=quantization,
            lora=lora,
            lora_slots=lora_slots,
            graph=dict(m.get("graph") or {}),
            validation=m.get("validation"),
            accuracy=m.get("accuracy"),
            raw=copy.deepcopy(m),
        )

    def to_dict(self) -> dict[str, Any]:
        """A fresh copy of the ``bundle.json`` object this manifest was parsed from (writers start a
        derived bundle's manifest from it)."""
        return copy.deepcopy(self.raw)

    def has_input(self, name: str) -> bool:
        """Whether the graph takes the input ``name`` (``logits_to_keep``, ``step_invariant``)."""
        return any(s.name == name for s in self.inputs)

    def model_files(self) -> dict[str, FileEntry]:
        """The graph's files: ``model_file`` and its external data (``model.onnx.data``)."""
        return {n: f for n, f in self.files.items() if n.startswith(self.model_file)}

    def model_bytes(self) -> int:
        """The bytes of the graph and its external weights."""
        return sum(f.bytes for f in self.model_files().values())
