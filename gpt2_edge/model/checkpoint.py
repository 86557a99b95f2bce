"""Load and save GPT-2 checkpoints in the Hugging Face layout.

A checkpoint is a directory with ``config.json`` and ``model.safetensors`` (or sharded
safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin``), usually with
tokenizer files. Keys may carry the ``transformer.`` prefix or not. Hugging Face stores the
four projection weights as ``Conv1D`` (``[in, out]``); ours are ``nn.Linear`` (``[out, in]``),
so exactly these are transposed:
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import DEFAULT_MODEL_DIR
from ..errors import Gpt2EdgeError, Gpt2EdgeTypeError
from ..fsutil import publish_dir, staging_dir
from ..runtime.tokenizer import Tokenizer
from .config import GPTConfig
from .gpt import GPT

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers old transformers versions saved with the weights; they hold no parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
HUB_FILES = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model.bin",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
]


class CheckpointError(Gpt2EdgeError):
    """A checkpoint is missing, corrupt, or does not match its config."""


def resolve_model_dir(model: str | Path | None) -> Path:
    """The checkpoint directory for ``model``: None = the shipped default model, a path, or a hub id.

    A hub id (``gpt2``, ``openai-community/gpt2``) is downloaded through huggingface_hub, which
    needs internet; tests never take that path.
    """
    if model is None:
        return DEFAULT_MODEL_DIR
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory with config.json")
    text = str(model)
    # A hub id is "name" or "org/name"; anything else that is not a directory is a bad path.
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{model!r} is not a directory here, and huggingface_hub is not installed to fetch it "
            "from the hub (pip install 'gpt2-edge[export]')"
        ) from None
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_FILES))
    except Exception as e:
        raise CheckpointError(
            f"{model!r} is not a local directory and could not be fetched from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read with plain reads into tensors of their own.

    Not ``safetensors.torch.load_file``: it copies out of a memory map of the whole file, whose
    pages count in the process's resident size too, so loading peaked at twice the weights.
    """

    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"{path} is truncated or not a safetensors file ({why}); re-download or re-save it"
        )

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("no header")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise bad(f"a header of {n} bytes in a file of {size}")
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError) as e:
                raise bad(f"the header is not JSON: {e}") from None
            if not isinstance(header, dict):
                raise bad("the header is not an object")
            header.pop("__metadata__", None)
            out = {}
            for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                dtype = _SAFETENSORS_DTYPES.get(meta.get("dtype"))
                if dtype is None:
                    raise bad(f"{name}: dtype {meta.get('dtype')!r}")
                begin, end = meta["data_offsets"]
                shape = [int(d) for d in meta["shape"]]
                nbytes = torch.Size(shape).numel() * dtype.itemsize
                if end - begin != nbytes or 8 + n + end > size:
                    raise bad(f"{name}: {end - begin} bytes at {begin} for shape {shape} {meta['dtype']}")
                buf = torch.empty(nbytes, dtype=torch.uint8)
                f.seek(8 + n + begin)
                if nbytes and f.readinto(memoryview(buf.numpy())) != nbytes:
                    raise bad(f"{name} is cut short")
                out[name] = buf.view(dtype).reshape(shape)
            return out
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    except OSError as e:
        raise bad(str(e)) from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, refused globals
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch state dict ({msg})") from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
        )
    return obj


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The raw tensors of a checkpoint directory, whatever the file layout."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    binary = directory / "pytorch_model.bin"
    if single.is_file():
        return _read_safetensors(single)
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise Gpt2EdgeTypeError("weight_map is not an object of file names")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise CheckpointError(f"{index} names shard {shard}, which is missing")
            sd.update(_read_safetensors(directory / shard))
        return sd
    if binary.is_file():
        return _read_bin(binary)
    raise CheckpointError(
        f"{directory} has no weights: expected model.safetensors, "
        "model.safetensors.index.json + shards, or pytorch_model.bin"
    )


def hf_to_reference(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Map Hugging Face GPT-2 keys/layouts onto ``GPT.state_dict()``; errors name every mismatch.

    Empties ``sd`` as it goes: each transposed weight replaces its original, so loading holds the
    weights about once, not twice (gpt2-xl: 6.2 GB).
    """
    expected = gpt_shapes(config)
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    lm_head = None
    for key in list(sd):
        t = sd.pop(key)
        if key == "lm_head.weight":
            lm_head = t
            continue
        if key.endswith(IGNORED_SUFFIXES):
            continue
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        if name not in expected:
            unexpected.append(key)
            continue
        if name.endswith(CONV1D_SUFFIXES) and t.dim() == 2:
            t = t.t()
        out[name] = t.contiguous()
    missing = sorted(set(expected) - set(out))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(
            f"unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    bad = [
        f"{k} expected {tuple(expected[k])} got {tuple(v.shape)}"
        for k, v in out.items()
        if tuple(v.shape) != tuple(expected[k])
    ]
    if bad:
        problems.append("shape mismatch: " + "; ".join(bad[:4]) + (" ..." if len(bad) > 4 else ""))
    if problems:
        raise CheckpointError("checkpoint does not match config.json: " + " | ".join(problems))
    wte = out["transformer.wte.weight"]
    if lm_head is not None and (lm_head.shape != wte.shape or not torch.equal(lm_head.to(wte.dtype), wte)):
        raise CheckpointError("lm_head.weight differs from transformer.wte.weight; GPT-2 ties them")
    return out


def gpt_shapes(config: GPTConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of ``GPT(config)`` without allocating it."""
    with torch.device("meta"):
        return {k: v.shape for k, v in GPT(config).state_dict().items()}


def load_checkpoint(model: str | Path | None = None, dtype: torch.dtype = torch.float32) -> GPT:
    """Load a GPT-2 checkpoint (directory, hub id, or None for the default model) in eval mode."""
    directory = resolve_model_dir(model)
    try:
        config = GPTConfig.load(directory)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    sd = hf_to_reference(read_state_dict(directory), config)
    with torch.device("meta"):
        gpt = GPT(config)
    gpt.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True, strict=True)
    return gpt.eval()


def load_tokenizer(model: str | Path | None = None) -> Tokenizer:
    """The tokenizer stored beside a checkpoint."""
    return Tokenizer.from_dir(resolve_model_dir(model))


def reference_to_hf(model: GPT, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``GPT.state_dict()`` in Hugging Face layout (``transformer.`` keys, Conv1D transposed)."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        out[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    return out


def save_checkpoint(
    model: GPT,
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a Hugging Face GPT-2 checkpoint atomically (temp directory, then rename).

    ``transformers.GPT2LMHeadModel.from_pretrained(directory)`` loads the result.
    """
    from safetensors.torch import save_file

    target = Path(directory)
    with staging_dir(target) as tmp:
        model.config.save(tmp)
        save_file(reference_to_hf(model, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp, model_max_length=model.config.n_positions)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        publish_dir(tmp, target, overwrite=True)
    return target
