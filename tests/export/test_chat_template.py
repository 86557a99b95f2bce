"""A checkpoint's Hugging Face chat template travels into its bundle (the server renders it)."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")

from gpt2_edge.export.bundle import export_bundle
from gpt2_edge.runtime.bundle import Bundle

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


@pytest.mark.parametrize("form", ["string", "list", "file"])
def test_the_chat_template_is_exported(tiny_checkpoint, tmp_path, form):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    cfg_file = ckpt / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if form == "file":
        (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    else:
        cfg["chat_template"] = TEMPLATE if form == "string" else [{"name": "default", "template": TEMPLATE}]
        cfg_file.write_text(json.dumps(cfg))
    out = export_bundle(ckpt, tmp_path / "bundle", validate=False, log=lambda _: None)
    b = Bundle.load(out)
    assert "chat_template.jinja" in b.manifest.files  # hashed and verified like every file
    assert b.chat_template() == TEMPLATE


def test_no_template_no_file(tiny_checkpoint, tmp_path):
    out = export_bundle(tiny_checkpoint, tmp_path / "bundle", validate=False, log=lambda _: None)
    assert "chat_template.jinja" not in Bundle.load(out).manifest.files
