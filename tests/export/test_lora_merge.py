"""LoRA at export: a PEFT adapter merged into the weights equals PEFT's own ``merge_and_unload``, is
recorded in the manifest, and bad adapters are refused by name before anything is written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gpt2_edge import tolerances
from gpt2_edge.export.bundle import export_bundle
from gpt2_edge.runtime import load_model
from gpt2_edge.runtime.lora import LoraError, load_adapter
from tests.helpers import REPO
from tests.lora_helpers import edit_config, make_peft_adapter, peft_merged

pytest.importorskip("peft")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore")

PROMPTS = np.array([[5, 17, 42, 99, 3, 250, 7, 1], [64, 2, 200, 11, 11, 8, 90, 150]], dtype=np.int64)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_checkpoint):
    return make_peft_adapter(tiny_checkpoint, tmp_path_factory.mktemp("lora") / "shakespeare", r=4, alpha=8)


@pytest.fixture(scope="module")
def merged_bundle(tmp_path_factory, tiny_checkpoint, adapter):
    out = tmp_path_factory.mktemp("merged") / "bundle"
    return export_bundle(tiny_checkpoint, out, lora=adapter, log=lambda _: None)


def peft_logits(checkpoint, adapter) -> np.ndarray:
    with torch.no_grad():
        return peft_merged(checkpoint, adapter)(torch.from_numpy(PROMPTS)).logits.numpy()


def test_merged_bundle_equals_peft_merge_and_unload(merged_bundle, tiny_checkpoint, adapter):
    got = load_model(merged_bundle).backend.logits(PROMPTS)
    want = peft_logits(tiny_checkpoint, adapter)
    base = load_model(export_bundle(tiny_checkpoint, merged_bundle.parent / "base", log=lambda _: None))
    # The adapter changes the logits well past the tolerance: the comparison can tell.
    assert (
        np.abs(base.backend.logits(PROMPTS) - want).max() > 100 * tolerances.TOLERANCES["fp32"].max_abs_logits
    )
    diff = np.abs(got - want).max()
    assert diff <= tolerances.TOLERANCES["fp32"].max_abs_logits, diff
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_manifest_records_the_adapter_and_parity_passed(merged_bundle, adapter):
    m = load_model(merged_bundle).bundle.manifest
    assert m.lora is not None
    assert m.lora.name == "shakespeare" and m.lora.rank == 4 and m.lora.alpha == 8
    assert m.lora.target_modules == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    from gpt2_edge.runtime.bundle import sha256_file

    assert m.lora.files == {
        f: sha256_file(adapter / f) for f in ("adapter_config.json", "adapter_model.safetensors")
    }
    assert m.validation["passed"] is True


def test_rank_and_alpha_patterns_and_rslora(tmp_path, tiny_checkpoint):
    """Per-module rank and alpha (PEFT's patterns) and rank-stabilised scaling merge as PEFT merges them."""
    adapter = make_peft_adapter(
        tiny_checkpoint,
        tmp_path / "patterned",
        r=4,
        alpha=8,
        rank_pattern={"h.1.mlp.c_fc": 2},
        alpha_pattern={"attn.c_proj": 3},
        use_rslora=True,
    )
    got = load_adapter(adapter, n_layer=2, n_embd=64)
    assert got.modules["h.1.mlp.c_fc"].rank == 2 and got.modules["h.0.mlp.c_fc"].rank == 4
    assert got.modules["h.0.attn.c_proj"].scale == pytest.approx(3 / 2)  # alpha 3 / sqrt(4)
    assert got.modules["h.0.mlp.c_proj"].scale == pytest.approx(8 / 2)
    out = export_bundle(tiny_checkpoint, tmp_path / "bundle", lora=adapter, log=lambda _: None)
    diff = np.abs(load_model(out).backend.logits(PROMPTS) - peft_logits(tiny_checkpoint, adapter)).max()
    assert diff <= tolerances.TOLERANCES["fp32"].max_abs_logits, diff


def test_inspect_shows_the_adapter(merged_bundle):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "gpt2_edge", "inspect", str(merged_bundle)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "lora   shakespeare: rank 4, alpha 8, attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj" in out.stdout


# Refusals --------------------------------------------------------------------------------------


def _with_tensors(adapter, dst, change):
    """A copy of ``adapter`` whose tensors ``change(dict)`` edited."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(adapter, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def _drop_file(name):
    def make(adapter, dst):
        shutil.copytree(adapter, dst)
        (dst / name).unlink()
        return dst

    return make


def _config(**changes):
    def make(adapter, dst):
        shutil.copytree(adapter, dst)
        edit_config(dst, **changes)
        return dst

    return make


def _rename(old, new):
    def change(t):
        for k in [k for k in t if old in k]:
            t[k.replace(old, new)] = t.pop(k)

    return lambda adapter, dst: _with_tensors(adapter, dst, change)


def _narrow(t):
    k = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    t[k] = t[k][:, :32].copy()


def _deeper(t):
    for k in [k for k in t if ".h.1." in k]:
        t[k.replace(".h.1.", ".h.5.")] = t[k]


def _modules_to_save(t):
    t["base_model.model.lm_head.modules_to_save.default.weight"] = np.zeros((300, 64), np.float32)


BAD = {
    "missing weights": (_drop_file("adapter_model.safetensors"), "lacks adapter_model.safetensors"),
    "missing config": (_drop_file("adapter_config.json"), "lacks adapter_config.json"),
    "wte target": (_config(target_modules=["c_attn", "wte"]), "targets unsupported modules ['wte']"),
    "lm_head target": (_config(target_modules=["lm_head"]), "targets unsupported modules ['lm_head']"),
    "modules_to_save": (_config(modules_to_save=["lm_head"]), "has modules_to_save ['lm_head']"),
    "modules_to_save tensor": (
        lambda a, d: _with_tensors(a, d, _modules_to_save),
        "for modules_to_save",
    ),
    "other architecture": (_rename("transformer.h.", "model.layers."), "is not for a GPT-2 base"),
    "wrong base shape": (
        lambda a, d: _with_tensors(a, d, _narrow),
        "does not fit this base model: h.0.attn.c_attn",
    ),
    "too many layers": (
        lambda a, d: _with_tensors(a, d, _deeper),
        "changes layer 5; the base model has 2 layers",
    ),
    "not lora": (_config(peft_type="IA3"), "is a IA3 adapter"),
    "dora": (_config(use_dora=True), "uses DoRA"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_refused_by_name_before_anything_is_written(case, adapter, tmp_path, tiny_checkpoint):
    make, says = BAD[case]
    bad = make(adapter, tmp_path / "bad")
    with pytest.raises(LoraError, match=f"adapter 'bad'.*{__import__('re').escape(says)}"):
        export_bundle(tiny_checkpoint, tmp_path / "out", lora=bad, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_cli_refusal_is_one_line_exit_2(adapter, tmp_path, tiny_checkpoint):
    bad = _config(target_modules=["wte"])(adapter, tmp_path / "bad")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2_edge",
            "export",
            str(tiny_checkpoint),
            "-o",
            str(tmp_path / "out"),
            "--lora",
            f"mine={bad}",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "adapter 'mine' targets unsupported modules ['wte']" in out.stderr
    assert not (tmp_path / "out").exists()


def test_rank_over_slot_limit_refused(adapter):
    with pytest.raises(LoraError, match="has rank 4 at h.0.attn.c_attn, over the slots' rank 2"):
        load_adapter(adapter, n_layer=2, n_embd=64, max_rank=2)
