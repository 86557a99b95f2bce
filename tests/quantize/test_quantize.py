"""Quantized variants: each precision loads, keeps the contract, generates, shrinks; the gate judges."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt2_edge.cli import main
from gpt2_edge.export.bundle import export_bundle
from gpt2_edge.model.checkpoint import save_checkpoint
from gpt2_edge.quantize.calibrate import CalibrationError
from gpt2_edge.quantize.pipeline import PRECISIONS, GateError, quantize_bundle
from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig
from tests.helpers import SAMPLE_TEXT, random_gpt, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")
quiet = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("txt")
    (d / "calib.txt").write_text(SAMPLE_TEXT * 2)
    (d / "eval.txt").write_text(SAMPLE_TEXT[::-1][:3000][::-1])
    return d / "calib.txt", d / "eval.txt"


@pytest.fixture(scope="module")
def wide_bundles(tmp_path_factory, tiny_tokenizer):
    """A 2-layer, 256-wide model: big enough that weights dominate the file sizes."""
    d = tmp_path_factory.mktemp("wide")
    ckpt = save_checkpoint(
        random_gpt(tiny_config(n_embd=256, n_head=4, vocab_size=tiny_tokenizer.vocab_size)),
        d / "ckpt",
        tiny_tokenizer,
    )
    return {t: export_bundle(ckpt, d / t, target=t, **quiet) for t in ("ort", "tensorrt")}


def model_bytes(bundle) -> int:
    files = json.loads((bundle / "bundle.json").read_text())["files"]
    return sum(f["bytes"] for name, f in files.items() if name.startswith("model.onnx"))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_loads_keeps_contract_and_generates(wide_bundles, texts, tmp_path, precision):
    src = wide_bundles["tensorrt" if precision in ("int8-qdq", "fp16", "bf16") else "ort"]
    out, rep = quantize_bundle(
        src, precision, tmp_path / precision, calib_text=texts[0], eval_text=texts[1], force=True, **quiet
    )
    b = Bundle.load(out)
    assert b.precision == precision and b.manifest.accuracy["precision"] == precision
    names = [s.name for s in b.inputs] + [s.name for s in b.outputs]
    fp32 = Bundle.load(src)
    # bf16 adds logits_to_keep (the tensorrt target's graph has none; OpenVINO's prefill needs it)
    added = ["logits_to_keep"] if precision == "bf16" else []
    assert names == [s.name for s in fp32.inputs] + added + [s.name for s in fp32.outputs]
    kv = "float16" if precision == "fp16" else "float32"
    assert b.inputs[3].dtype == kv and b.outputs[1].dtype == kv and b.outputs[0].dtype == "float32"
    res = Generator.from_bundle(str(out)).generate(
        ["First Citizen:", "All:"], GenerationConfig(max_new_tokens=8)
    )
    assert all(len(r.token_ids) == 8 for r in res)
    assert rep is not None and np.isfinite(rep.perplexity) and rep.top1_agreement > 0.5
    ratio = model_bytes(out) / model_bytes(src)
    # The head is untied for int8/int4 (a second copy of wte, quantized), so compare to the
    # fp32 weights plus that copy; scales add ~3% (int8) and ~25% (int4, blocks of 32).
    expected = {
        "fp16": (0.45, 0.6),
        "bf16": (0.45, 0.6),
        "int8-dynamic": (0.2, 0.36),
        "int8-weight": (0.2, 0.36),
        "int8-qdq": (0.2, 0.36),
        "int4": (0.1, 0.22),
    }[precision]
    assert expected[0] <= ratio <= expected[1], ratio
    if precision in ("int8-qdq", "fp16", "bf16"):
        assert b.target == "tensorrt"  # standard Q/DQ and Cast ops only
    else:
        assert b.target == "ort"


def test_fp16_stays_finite_with_large_activations(tmp_path, tiny_tokenizer, texts):
    import torch

    model = random_gpt(tiny_config(vocab_size=tiny_tokenizer.vocab_size))
    with torch.no_grad():  # residual stream in the thousands, as in real GPT-2 outlier channels
        model.transformer.wte.weight[:, :3] *= 3000.0
        model.transformer.h[0].mlp.c_proj.bias[5] = 5000.0
    ckpt = save_checkpoint(model, tmp_path / "c", tiny_tokenizer)
    fp32 = export_bundle(ckpt, tmp_path / "fp32", target="tensorrt", **quiet)
    out, rep = quantize_bundle(fp32, "fp16", tmp_path / "fp16", eval_text=texts[1], force=True, **quiet)
    from gpt2_edge.runtime.session import OrtBackend

    backend = OrtBackend(Bundle.load(out))
    ids = np.array([tiny_tokenizer.encode(SAMPLE_TEXT[:200])], dtype=np.int64)[:, :60]
    logits = backend.logits(ids)
    assert np.isfinite(logits).all()
    # a left-padded batch too (fully masked pad rows are where NaN would come from)
    cache = backend.new_cache(2, 20)
    prompts = [ids[0, :10].tolist(), ids[0, :4].tolist()]
    out_logits = cache.prefill([0, 1], prompts)  # left-padded: row 1 has 6 fully masked pad rows
    assert np.isfinite(out_logits).all()
    assert np.isfinite(cache.decode([0, 1], [1, 2])).all()
    assert rep.top1_agreement > 0.9


def test_gate_refuses_and_names_the_numbers(wide_bundles, texts, tmp_path, monkeypatch):
    from gpt2_edge import tolerances

    monkeypatch.setitem(tolerances.TOLERANCES, "int4", tolerances.Tolerance(None, None, False, -0.5))
    with pytest.raises(GateError, match=r"int4 misses its gate: perplexity .* vs fp32 .*--force"):
        quantize_bundle(wide_bundles["ort"], "int4", tmp_path / "q", eval_text=texts[1], **quiet)
    assert not (tmp_path / "q").exists()
    out, rep = quantize_bundle(
        wide_bundles["ort"], "int4", tmp_path / "q", eval_text=texts[1], force=True, **quiet
    )
    assert not rep.passed and Bundle.load(out).manifest.accuracy["forced"]


@pytest.mark.parametrize(
    "content,msg",
    [
        (b"", "is empty"),
        (b"\xff\xfe\xfa" * 100, "not UTF-8"),
        (b"too short", r"has \d+ tokens; at least \d+ are needed"),
    ],
)
def test_bad_calibration_text(wide_bundles, tmp_path, content, msg):
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    with pytest.raises(CalibrationError, match=msg):
        quantize_bundle(
            wide_bundles["tensorrt"], "int8-qdq", tmp_path / "q", calib_text=f, force=True, **quiet
        )


def test_refusals(wide_bundles, texts, tmp_path):
    with pytest.raises(ValueError, match="needs held-out text"):
        quantize_bundle(wide_bundles["ort"], "int4", tmp_path / "q", **quiet)
    with pytest.raises(ValueError, match="needs calibration text"):
        quantize_bundle(wide_bundles["tensorrt"], "int8-qdq", tmp_path / "q", eval_text=texts[1], **quiet)
    out, _ = quantize_bundle(wide_bundles["ort"], "int4", tmp_path / "q", force=True, **quiet)
    with pytest.raises(ValueError, match="is a int4 bundle; quantize from the fp32"):
        quantize_bundle(out, "int4", tmp_path / "q2", force=True, **quiet)


def test_cli_quantize_and_eval(wide_bundles, texts, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                str(wide_bundles["ort"]),
                "--precision",
                "int8-dynamic",
                "-o",
                str(out),
                "--eval",
                str(texts[1]),
                "--quiet",
            ]
        )
        == 0
    )
    assert "bundle written" in capsys.readouterr().out
    assert main(["eval", str(out), "--text", str(texts[1]), "--quiet", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["precision"] == "int8-dynamic" and 0 <= rep["mean_kl"] < 0.1 and rep["top1_agreement"] > 0.5


@pytest.fixture(scope="module")
def shakespeare_texts(tmp_path_factory):
    from tests.helpers import SHAKESPEARE

    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    text = SHAKESPEARE.read_text()
    d = tmp_path_factory.mktemp("shk")
    (d / "calib.txt").write_text(text[:60_000])  # from the training split
    (d / "eval.txt").write_text(text[-25_000:])  # from the held-out split
    return d / "calib.txt", d / "eval.txt"


@pytest.mark.slow
def test_gate_rejects_naive_static_int8_and_accepts_smoothquant(tmp_path, shakespeare_texts):
    """On the trained default model with planted activation outliers (an exact fp32 rewrite:
    LayerNorm gain x40 on a few channels, the matching weight rows /40), naive per-tensor static
    int8 misses the +2% gate and SmoothQuant with per-channel weights passes it."""
    import torch

    from gpt2_edge.model.checkpoint import load_checkpoint, load_tokenizer
    from gpt2_edge.quantize.int8 import QdqOptions

    model = load_checkpoint(None)
    channels = [3, 50, 77, 200]
    with torch.no_grad():
        for block in model.transformer.h:
            for ln, lin in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
                ln.weight[channels] *= 40
                ln.bias[channels] *= 40
                lin.weight[:, channels] /= 40
    ckpt = save_checkpoint(model, tmp_path / "c", load_tokenizer(None))
    fp32 = export_bundle(ckpt, tmp_path / "fp32", target="tensorrt", **quiet)
    calib, held_out = shakespeare_texts
    naive = QdqOptions(smooth_alpha=None, per_channel=False, calibrate_method="minmax", quantize_head=True)
    with pytest.raises(GateError, match="int8-qdq misses its gate"):
        quantize_bundle(
            fp32, "int8-qdq", tmp_path / "naive", calib_text=calib, eval_text=held_out, qdq=naive, **quiet
        )
    out, rep = quantize_bundle(
        fp32, "int8-qdq", tmp_path / "smooth", calib_text=calib, eval_text=held_out, **quiet
    )
    assert rep.passed and rep.ppl_increase < 0.02, rep.summary()
    assert Bundle.load(out).manifest.quantization.details["smoothquant_layers"] >= 2 * model.config.n_layer


@pytest.mark.parametrize("precision", ["fp16", "int8-dynamic", "int8-qdq", "int4"])
def test_external_data_bundles_quantize(tmp_path, tiny_checkpoint, texts, precision):
    target = "tensorrt" if precision in ("fp16", "int8-qdq") else "ort"
    fp32 = export_bundle(
        tiny_checkpoint, tmp_path / "fp32", target=target, external_data_threshold=0, **quiet
    )
    assert (fp32 / "model.onnx.data").is_file()
    kw = dict(calib_text=texts[0], eval_text=texts[1], force=True, **quiet)
    # threshold 0: the variant is external data too; default: its weights are small, so inline
    for name, threshold, external in (("q", 0, True), ("inline", None, False)):
        extra = {} if threshold is None else {"external_data_threshold": threshold}
        out, rep = quantize_bundle(fp32, precision, tmp_path / name, **kw, **extra)
        assert (out / "model.onnx.data").is_file() is external and rep.top1_agreement > 0.5
        res = Generator.from_bundle(str(out)).generate("All:", GenerationConfig(max_new_tokens=4))[0]
        assert len(res.token_ids) == 4


def test_int8_dynamic_scales_activations_per_row(wide_bundles, tmp_path):
    """No whole-tensor activation scale (DynamicQuantizeLinear): that made rows and positions
    leak into each other (tests/test_batch_invariance.py)."""
    out, _ = quantize_bundle(wide_bundles["ort"], "int8-dynamic", tmp_path / "q", force=True, **quiet)
    b = Bundle.load(out)
    census = b.manifest.graph["op_census"]
    assert not any("DynamicQuantize" in op for op in census), census
    # every weight MatMul (4 per layer and the untied head) takes per-row activation scales
    assert census["com.microsoft:MatMulIntegerToFloat"] == 2 * 4 + 1
    q = b.manifest.quantization
    assert q.batch_invariant and "per row" in q.details["activations"] and q.details["head_untied"]


def test_int4_leaves_the_apps_logging_as_it_was(monkeypatch):
    # ONNX Runtime's MatMulNBits quantizer calls logging.basicConfig(level=INFO) when its module is
    # imported: a root handler on the stderr of that moment (a test's captured stream, closed later)
    # and every library's INFO messages printed. The kit imports it without either.
    import logging
    import sys

    from gpt2_edge.quantize.int4 import _nbits_quantizer

    monkeypatch.delitem(sys.modules, "onnxruntime.quantization.matmul_nbits_quantizer", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    assert _nbits_quantizer().__name__ == "MatMulNBitsQuantizer"
    assert "onnxruntime.quantization.matmul_nbits_quantizer" in sys.modules  # imported anew here
    assert root.handlers == handlers and root.level == level
