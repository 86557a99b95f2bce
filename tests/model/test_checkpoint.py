"""Checkpoint round-trips with transformers, and clear errors on bad checkpoints."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from gpt2_edge.cli import main
from gpt2_edge.model.checkpoint import CheckpointError, load_checkpoint, resolve_model_dir, save_checkpoint
from tests.helpers import random_gpt, tiny_config

transformers = pytest.importorskip("transformers")


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out[0] if isinstance(out, tuple) else out.logits


def test_save_then_transformers_loads_identical_logits(tmp_path):
    model = random_gpt(tiny_config())
    save_checkpoint(model, tmp_path / "c")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "c").eval()
    ids = torch.randint(0, 300, (2, 11))
    assert (logits(model, ids) - logits(hf, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded"])
def test_transformers_saved_loads_in_ours(tmp_path, layout):
    cfg = transformers.GPT2Config(vocab_size=120, n_positions=48, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    kw = {"safe_serialization": layout != "bin"}
    if layout == "sharded":
        kw["max_shard_size"] = "40KB"
    hf.save_pretrained(tmp_path / "hf", **kw)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    expected = {
        "safetensors": "model.safetensors",
        "bin": "pytorch_model.bin",
        "sharded": "model.safetensors.index.json",
    }[layout]
    assert expected in files
    ours = load_checkpoint(tmp_path / "hf")
    ids = torch.randint(0, 120, (2, 9))
    assert (logits(ours, ids) - logits(hf, ids)).abs().max() <= 1e-4


def test_keys_without_transformer_prefix_and_old_buffers(tmp_path):
    from safetensors.torch import load_file, save_file

    model = random_gpt(tiny_config())
    save_checkpoint(model, tmp_path / "c")
    sd = load_file(tmp_path / "c" / "model.safetensors")
    # The original openai-community/gpt2 layout: no prefix, plus the attn.bias buffers.
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(sd, tmp_path / "c" / "model.safetensors", metadata={"format": "pt"})
    loaded = load_checkpoint(tmp_path / "c")
    ids = torch.randint(0, 300, (1, 8))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_fp16_storage_loads_as_fp32(tmp_path):
    model = random_gpt(tiny_config())
    save_checkpoint(model, tmp_path / "c", dtype=torch.float16)
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.transformer.wte.weight.dtype == torch.float32
    ids = torch.randint(0, 300, (1, 8))
    assert (logits(loaded, ids) - logits(model, ids)).abs().max() < 5e-2


def test_save_is_atomic_and_replaces(tmp_path):
    model = random_gpt(tiny_config())
    save_checkpoint(model, tmp_path / "c")
    save_checkpoint(random_gpt(tiny_config(), seed=3), tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp dirs left


# bad input ------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_dir("./not/a/dir")


def test_config_weights_shape_mismatch(tmp_path):
    save_checkpoint(random_gpt(tiny_config()), tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["n_embd"] = 128
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch: transformer\.h\.0\.attn\.c_attn\.bias expected \(384,\) got \(192,\)",
    ):
        load_checkpoint(tmp_path / "c")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    save_checkpoint(random_gpt(tiny_config()), tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["n_layer"] = 3
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys: transformer\.h\.2\."):
        load_checkpoint(tmp_path / "c")


def test_truncated_safetensors(tmp_path):
    save_checkpoint(random_gpt(tiny_config()), tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_checkpoint(tmp_path / "c")


def test_pickle_that_is_not_a_state_dict(tmp_path):
    save_checkpoint(random_gpt(tiny_config()), tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    torch.save([1, 2, 3], tmp_path / "c" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_checkpoint(tmp_path / "c")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    save_checkpoint(random_gpt(tiny_config()), tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    (tmp_path / "c" / "pytorch_model.bin").write_bytes(pickle.dumps({"x": shutil.rmtree}))
    with pytest.raises(CheckpointError, match="not a readable PyTorch state dict"):
        load_checkpoint(tmp_path / "c")


def test_no_weights_and_no_config(tmp_path):
    save_checkpoint(random_gpt(tiny_config()), tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="needs config.json"):
        load_checkpoint(tmp_path / "c")


def test_non_gpt2_config_refused(tmp_path):
    save_checkpoint(random_gpt(tiny_config()), tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="only 'gpt2' is supported"):
        load_checkpoint(tmp_path / "c")


def test_cli_reports_one_line_error(tmp_path, capsys):
    save_checkpoint(random_gpt(tiny_config()), tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    rc = main(["generate", str(tmp_path / "c"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "truncated or not a safetensors file" in err
    assert "Traceback" not in err
