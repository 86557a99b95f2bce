"""``gpt2-edge generate BUNDLE --lora [NAME=]DIR``: every prompt with a run-time adapter, the same
tokens as ``Generator.generate(adapter=...)``; a bundle without slots refuses it in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.loader import load_model
from gpt2_edge.runtime.sampling import GenerationConfig
from tests.bundles import INPLACE, LORA_SLOTS
from tests.helpers import REPO
from tests.lora_helpers import write_adapter

pytestmark = pytest.mark.filterwarnings("ignore")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gpt2_edge", *args], capture_output=True, text=True, env=env)


def test_generate_with_an_adapter(make_bundle, tmp_path):
    bundle, adapter = make_bundle(LORA_SLOTS), write_adapter(tmp_path / "mine")
    out = cli("generate", str(bundle), "--lora", f"x={adapter}", "--prompt", "All:", "--max-new-tokens", "6",
              "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["token_ids"]
    gen = Generator(load_model(bundle, lora={"x": adapter}))
    cfg = GenerationConfig(max_new_tokens=6)
    assert got == gen.generate("All:", cfg, adapter="x")[0].token_ids
    assert got != gen.generate("All:", cfg)[0].token_ids


def test_generate_refuses_an_adapter_without_slots(make_bundle, tmp_path):
    out = cli("generate", str(make_bundle(INPLACE)), "--lora", str(write_adapter(tmp_path / "mine")), "--prompt", "A")
    assert out.returncode == 2 and "takes no LoRA adapters at run time" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
