"""PEFT LoRA adapters for GPT-2, read and checked without torch (numpy + safetensors).

An adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT
saves it. Its tensors are keyed ``base_model.model.transformer.h.{i}.{attn.c_attn|attn.c_proj|
mlp.c_fc|mlp.c_proj}.lora_{A|B}.weight``; ``lora_A`` is ``[r, in]`` and ``lora_B`` ``[out, r]``
whatever ``fan_in_fan_out`` says (that flag only tells PEFT that GPT-2's Conv1D stores its base
weight ``[in, out]``). The change to a projection, in the reference model's ``nn.Linear`` layout
``[out, in]``, is ``scale * B @ A`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``); ``rank_pattern`` / ``alpha_pattern`` give some modules their own r and alpha,
matched as PEFT matches them (a pattern names the module path's tail, as a regular expression).

Every refusal is a ``LoraError`` naming the adapter and what is wrong, raised before a caller
writes or serves anything: missing files, another kind of PEFT adapter, target modules outside
c_attn / c_proj / c_fc, ``modules_to_save``, an adapter made for another architecture or for a
base of other dims, and (given a slot rank) a rank over it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Gpt2EdgeError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The projections an adapter may change, by their path inside a block: (in, out) as multiples of n_embd.
TARGETS = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1)}
TARGET_NAMES = ("c_attn", "c_proj", "c_fc")  # the names target_modules may use
_KEY = re.compile(
    r"base_model\.model\.(?:transformer\.)?h\.(\d+)\.((?:attn|mlp)\.c_\w+)\.lora_([AB])\.weight"
)
_BLOCK_KEY = re.compile(r"base_model\.model\.(?:transformer\.)?h\.\d+\.")


class LoraError(Gpt2EdgeError):
    """An adapter this base model cannot take: the message names the adapter and the reason."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted projection: ``delta = scale * b @ a`` (``[out, in]``, nn.Linear layout)."""

    a: np.ndarray  # [r, in] float32
    b: np.ndarray  # [out, r] float32
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class Adapter:
    """A checked LoRA adapter. ``modules`` is keyed by the module path under ``transformer``
    (``h.0.attn.c_attn``); ``rank`` is the largest rank of any module."""

    name: str
    path: Path
    files: dict[str, str]  # file name -> sha256
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # the block paths adapted: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    modules: dict[str, LoraModule]

    def manifest_entry(self) -> dict[str, Any]:
        """What a bundle records of the adapter merged into it (``bundle.json``'s ``lora``)."""
        return {
            "name": self.name,
            "files": dict(self.files),
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules),
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_spec(spec: str) -> tuple[str | None, str]:
    """``NAME=DIR`` or ``DIR`` -> (name or None, directory)."""
    name, sep, directory = spec.partition("=")
    if sep and name and "/" not in name and directory:
        return name, directory
    return None, spec


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches the module path's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(name: str, directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LoraError(f"adapter {name!r}: {path} is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoraError(f"adapter {name!r}: {path} is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoraError(f"adapter {name!r} is a {peft_type} adapter; only LoRA adapters are supported")
    if config.get("modules_to_save"):
        raise LoraError(
            f"adapter {name!r} has modules_to_save {config['modules_to_save']}: it replaces whole modules, "
            "which a LoRA merge or slot cannot carry; train it without modules_to_save"
        )
    for flag, why in (("use_dora", "DoRA"), ("lora_bias", "a LoRA bias")):
        if config.get(flag):
            raise LoraError(f"adapter {name!r} uses {why} ({flag}: true); only plain LoRA is supported")
    if config.get("bias", "none") != "none":
        raise LoraError(
            f"adapter {name!r} trains biases (bias: {config['bias']!r}); only bias 'none' is supported"
        )
    targets = config.get("target_modules")
    if isinstance(targets, list):
        bad = [t for t in targets if not isinstance(t, str) or t.rsplit(".", 1)[-1] not in TARGET_NAMES]
        if bad:
            raise LoraError(
                f"adapter {name!r} targets unsupported modules {bad}; GPT-2 adapters may target "
                f"{', '.join(TARGET_NAMES)} only"
            )
    elif not isinstance(targets, str):  # a str is a regular expression: the tensors say what it hit
        raise LoraError(f"adapter {name!r}: {CONFIG_FILE} has no target_modules")
    return config


def load_adapter(
    directory: str | Path,
    n_layer: int,
    n_embd: int,
    name: str | None = None,
    max_rank: int | None = None,
) -> Adapter:
    """Read and check the PEFT LoRA adapter in ``directory`` for a GPT-2 of ``n_layer`` x ``n_embd``.

    ``max_rank``: the rank of the slots that will carry it (refused above it). ``LoraError`` names
    what is wrong.
    """
    path = Path(directory).expanduser()
    name = name or path.resolve().name
    if not path.is_dir():
        raise LoraError(f"adapter {name!r}: {path} is not a directory")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
    if missing:
        extra = (
            " (adapter_model.bin: save it with safe_serialization=True)"
            if (path / "adapter_model.bin").is_file()
            else ""
        )
        raise LoraError(f"adapter {name!r}: {path} lacks {', '.join(missing)}{extra}")
    config = _read_config(name, path)
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as e:  # a corrupt header, or a dtype numpy lacks (bfloat16)
        raise LoraError(
            f"adapter {name!r}: {path / WEIGHTS_FILE} cannot be read as numpy arrays "
            f"({type(e).__name__}: {e}); save it in float32 or float16"
        ) from None
    if not tensors:
        raise LoraError(f"adapter {name!r}: {WEIGHTS_FILE} holds no tensors")
    foreign = [k for k in tensors if not _BLOCK_KEY.match(k)]
    if len(foreign) == len(tensors):
        raise LoraError(
            f"adapter {name!r} is not for a GPT-2 base: its tensors ({sorted(tensors)[0]}, ...) are not "
            "GPT-2's transformer.h.{i} modules"
        )
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None or m.group(2) not in TARGETS:
            what = "modules_to_save" if "modules_to_save" in key else "an unsupported module"
            raise LoraError(
                f"adapter {name!r} has a tensor {key} for {what}; GPT-2 adapters may change "
                f"{', '.join(TARGETS)} only"
            )
        layer = int(m.group(1))
        if layer >= n_layer:
            raise LoraError(f"adapter {name!r} changes layer {layer}; the base model has {n_layer} layers")
        pairs.setdefault(f"h.{layer}.{m.group(2)}", {})[m.group(3)] = t
    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModule] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoraError(f"adapter {name!r}: {module} has lora_{''.join(ab)} but not its pair")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = (k * n_embd for k in TARGETS[module.split(".", 2)[2]])
        r = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise LoraError(
                f"adapter {name!r} does not fit this base model: {module} has lora_A {list(a.shape)} and "
                f"lora_B {list(b.shape)}, a base of n_embd {n_embd} needs [r, {fan_in}] and [{fan_out}, r]"
            )
        full = f"transformer.{module}"
        want_r = int(_pattern_value(rank_pattern, full, r_default))
        if want_r != r:
            raise LoraError(f"adapter {name!r}: {module} has rank {r}, its adapter_config.json says {want_r}")
        if max_rank is not None and r > max_rank:
            raise LoraError(f"adapter {name!r} has rank {r} at {module}, over the slots' rank {max_rank}")
        alpha = float(_pattern_value(alpha_pattern, full, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[module] = LoraModule(a.astype(np.float32), b.astype(np.float32), scale)
    return Adapter(
        name=name,
        path=path,
        files={f: _sha256(path / f) for f in (CONFIG_FILE, WEIGHTS_FILE)},
        rank=max(m.rank for m in modules.values()),
        alpha=alpha_default,
        use_rslora=rslora,
        target_modules=tuple(t for t in TARGETS if any(k.endswith(t) for k in modules)),
        modules=modules,
    )
