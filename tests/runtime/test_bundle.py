"""Bundle loading verifies everything and refuses damage with a message saying what to do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from gpt2_edge.runtime.bundle import Bundle, BundleError

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def good(trt_target_bundle):
    return trt_target_bundle


@pytest.fixture
def copy(good, tmp_path):
    return shutil.copytree(good, tmp_path / "copy")


def test_loads_and_describes_itself(good):
    b = Bundle.load(good)
    assert b.precision == "fp32" and b.target == "tensorrt"
    assert b.dims.n_layer == 2 and b.context_length == 64
    assert b.eos_token_id == b.tokenizer().eos_token_id
    assert set(b.manifest.files) == {"model.onnx", "tokenizer.json"}
    assert {"torch", "onnx", "onnxruntime"} <= set(b.manifest.producers)


def test_flipped_byte_is_refused(copy):
    f = copy / "model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.onnx does not match its sha256 .* re-export"):
        Bundle.load(copy)


def test_truncated_model_is_refused(copy):
    f = copy / "model.onnx"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"model.onnx is 1000 bytes, the manifest says \d+: truncated"):
        Bundle.load(copy, verify=False)  # sizes are checked even without hashing


def test_missing_tokenizer_is_refused(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing from the bundle"):
        Bundle.load(copy)


def test_unknown_schema_version_is_refused(copy):
    m = json.loads((copy / "bundle.json").read_text())
    m["schema_version"] = 99
    (copy / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version 99; this gpt2-edge reads version 1"):
        Bundle.load(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.load(tmp_path / "nope")
    with pytest.raises(BundleError, match="bundle.json is missing"):
        Bundle.load(tmp_path)


def test_runtime_never_imports_torch(good):
    code = (
        "import sys\n"
        "from gpt2_edge.runtime.bundle import Bundle\n"
        "from gpt2_edge.runtime.generator import Generator\n"
        "from gpt2_edge.runtime.sampling import GenerationConfig\n"
        f"g = Generator.from_bundle({str(good)!r})\n"
        "r = g.generate(['First Citizen:', 'All:'], GenerationConfig(max_new_tokens=5, do_sample=True, seed=1))\n"
        "assert len(r) == 2 and all(len(x.token_ids) >= 1 for x in r)\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum', 'safetensors') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
