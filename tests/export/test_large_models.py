"""What lets the large sizes export and quantize in bounded memory, checked on tiny models: weights
streamed to external data, the ONNX Runtime optimizer on the graph's structure alone, the parity
reference recorded before the torch model is freed, checkpoints read without a second copy, and
external-data bundles that load, verify, quantize and match their inline twins."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest

from gpt2_edge.export.bundle import export_bundle
from gpt2_edge.export.fusions import (
    add_logits_to_keep,
    add_step_invariance,
    fuse_head_transpose,
    optimize_for_ort,
    retie_head,
)
from gpt2_edge.export.graph import DATA_ALIGNMENT, op_census, save_model
from gpt2_edge.export.onnx import export_onnx
from gpt2_edge.export.validate import ParityError, record_reference, validate_onnx
from gpt2_edge.model.checkpoint import load_checkpoint, save_checkpoint
from gpt2_edge.runtime.bundle import Bundle, BundleError
from tests.helpers import random_gpt, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


def _run(path: Path, n_layer: int = 2, n_head: int = 4, head: int = 16) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 7, 11, 13]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None]}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, n_head, 0, head), np.float32)
    return sess.run(["logits"], feeds)[0]


def _logits(bundle_dir: Path) -> np.ndarray:
    from gpt2_edge.runtime.session import OrtBackend

    ids = np.array([[5, 7, 11, 13, 17, 19]], np.int64)
    return OrtBackend(Bundle.load(bundle_dir), threads=1).logits(ids)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, object]:
    """A tiny model's raw export, its weights in external data."""
    model = random_gpt(tiny_config(), seed=3)
    d = tmp_path_factory.mktemp("raw")
    export_onnx(model, d / "model.onnx", external_data=True)
    return d / "model.onnx", model


def test_streaming_save_copies_external_weights_aligned_or_inlines_them(raw, tmp_path):
    src, _ = raw
    want = _run(src)
    model = onnx.load(str(src), load_external_data=False)
    save_model(model, tmp_path / "ext.onnx", external_data=True, base_dir=src.parent)
    ext = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    offsets = [
        int({e.key: e.value for e in t.external_data}["offset"])
        for t in ext.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    assert len(offsets) > 10 and all(o % DATA_ALIGNMENT == 0 for o in offsets)
    assert np.array_equal(_run(tmp_path / "ext.onnx"), want)

    model = onnx.load(str(src), load_external_data=False)
    save_model(model, tmp_path / "inline.onnx", external_data=False, base_dir=src.parent)
    assert not (tmp_path / "inline.onnx.data").exists()
    assert np.array_equal(_run(tmp_path / "inline.onnx"), want)


def test_streaming_save_refuses_external_data_without_its_directory(raw, tmp_path):
    model = onnx.load(str(raw[0]), load_external_data=False)
    with pytest.raises(Exception, match="no base_dir"):
        save_model(model, tmp_path / "m.onnx", external_data=True)


@pytest.mark.parametrize("kv_cache", ["inplace", "concat"])
def test_ort_passes_on_the_structure_alone_equal_optimize_model_on_a_loaded_model(raw, tmp_path, kv_cache):
    """The old path (optimize_model on the fused graph with every weight loaded) and the
    streaming one give the same graph and the same logits."""
    from onnxruntime.transformers import optimizer

    from gpt2_edge import contract

    src, _ = raw
    work = tmp_path / "w"
    work.mkdir()
    for f in (src, src.with_name(src.name + ".data")):
        (work / f.name).write_bytes(f.read_bytes())
    c = tiny_config()
    specs = contract.inputs(c.n_layer, c.n_head, c.head_size, kv_cache=kv_cache, logits_to_keep=True)
    new = tmp_path / "new.onnx"
    optimize_for_ort(
        work / "model.onnx", new, c.n_head, c.n_embd, c.n_layer, False, kv_cache=kv_cache, specs=specs
    )

    fused = work / "fused_model.onnx"  # the attention-fused graph both paths start from
    old = optimizer.optimize_model(
        str(fused), model_type="gpt2", num_heads=c.n_head, hidden_size=c.n_embd, opt_level=2, use_gpu=False
    ).model
    retie_head(old)
    fuse_head_transpose(old)
    add_logits_to_keep(old, inplace=kv_cache == "inplace")
    if kv_cache == "inplace":
        add_step_invariance(old)
    new_model = onnx.load(str(new))
    assert [n.op_type for n in new_model.graph.node] == [n.op_type for n in old.graph.node]
    assert op_census(new_model) == op_census(old)
    assert sorted(t.name for t in new_model.graph.initializer) == sorted(
        t.name for t in old.graph.initializer
    )


def test_a_recorded_reference_validates_without_the_model_and_equals_the_live_check(tmp_path):
    model = random_gpt(tiny_config(), seed=5)
    export_onnx(model, tmp_path / "m.onnx")
    live = validate_onnx(tmp_path / "m.onnx", model)
    ref = record_reference(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the reference does not keep the model
    replayed = validate_onnx(tmp_path / "m.onnx", ref)
    assert replayed.passed and replayed.as_dict() == live.as_dict()
    assert validate_onnx(tmp_path / "m.onnx", ref).as_dict() == live.as_dict()  # replays again
    with pytest.raises(Exception, match="recorded for cases"):
        validate_onnx(tmp_path / "m.onnx", ref, kv_cache="inplace")


def test_a_recorded_reference_of_another_model_fails_parity(tmp_path):
    model = random_gpt(tiny_config(), seed=5)
    export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ParityError):
        validate_onnx(tmp_path / "m.onnx", record_reference(random_gpt(tiny_config(), seed=6)))


def test_export_frees_the_torch_model_before_the_graph_passes(tmp_path, tiny_checkpoint, monkeypatch):
    """No parameter of the loaded model is alive when ONNX Runtime's optimizer runs."""
    import gpt2_edge.export.bundle as bundle_mod

    params: list[weakref.ref] = []
    load = bundle_mod.load_checkpoint

    def load_and_watch(src):
        m = load(src)
        params.extend(weakref.ref(p) for p in m.parameters())
        return m

    alive_at_passes = []
    passes = bundle_mod.optimize_for_ort

    def watch_passes(*a, **k):
        gc.collect()
        alive_at_passes.append(sum(p() is not None for p in params))
        return passes(*a, **k)

    monkeypatch.setattr(bundle_mod, "load_checkpoint", load_and_watch)
    monkeypatch.setattr(bundle_mod, "optimize_for_ort", watch_passes)
    export_bundle(tiny_checkpoint, tmp_path / "b", log=lambda _: None)
    assert params and alive_at_passes == [0]


def test_checkpoint_reader_reads_every_dtype_it_wrote(tmp_path):
    import torch

    model = random_gpt(tiny_config(), seed=2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        d = save_checkpoint(model, tmp_path / str(dtype), dtype=dtype)
        back = load_checkpoint(d)
        for (k, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
            assert torch.equal(a.to(dtype).float(), b), k


@pytest.fixture(scope="module")
def twins(tmp_path_factory, tiny_checkpoint) -> tuple[Path, Path]:
    """The tiny model's bundle with inline weights and with external data (threshold 0)."""
    d = tmp_path_factory.mktemp("twins")
    inline = export_bundle(tiny_checkpoint, d / "inline", log=lambda _: None)
    ext = export_bundle(tiny_checkpoint, d / "external", external_data_threshold=0, log=lambda _: None)
    return inline, ext


def test_external_data_bundle_lists_verifies_and_matches_the_inline_one(twins):
    inline, ext = twins
    m = json.loads((ext / "bundle.json").read_text())
    assert m["made_by"]["external_data"] is True and set(m["files"]) >= {"model.onnx", "model.onnx.data"}
    assert m["files"]["model.onnx.data"]["bytes"] > 10 * m["files"]["model.onnx"]["bytes"]
    assert not (inline / "model.onnx.data").exists()
    assert m["validation"]["passed"]
    Bundle.load(ext, verify=True)
    assert np.array_equal(_logits(ext), _logits(inline))


def test_external_data_bundle_with_changed_weights_is_refused(twins, tmp_path):
    import shutil

    b = shutil.copytree(twins[1], tmp_path / "b")
    data = bytearray((b / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 1
    (b / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx.data does not match its sha256"):
        Bundle.load(b, verify=True)


@pytest.mark.parametrize("precision", ["int8-dynamic", "int4", "int8-weight"])
def test_quantizing_an_external_data_bundle_equals_quantizing_the_inline_one(twins, tmp_path, precision):
    """Same logits and graph whether the variant of an external-data bundle is written as external
    data (threshold 0) or inline (its weights under the threshold: the default for the tiny model)."""
    from gpt2_edge.quantize.pipeline import quantize_bundle

    inline, ext = twins
    quiet = dict(force=True, log=lambda _: None)
    a, _ = quantize_bundle(inline, precision, tmp_path / "a", **quiet)
    b, _ = quantize_bundle(ext, precision, tmp_path / "b", external_data_threshold=0, **quiet)
    c, _ = quantize_bundle(ext, precision, tmp_path / "c", **quiet)
    assert (b / "model.onnx.data").is_file() and not (a / "model.onnx.data").exists()
    assert not (c / "model.onnx.data").exists()
    for other in (b, c):
        Bundle.load(other, verify=True)
        assert np.array_equal(_logits(other), _logits(a))
        assert op_census(onnx.load(str(a / "model.onnx"))) == op_census(onnx.load(str(other / "model.onnx")))
