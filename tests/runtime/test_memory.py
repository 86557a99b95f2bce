"""The runtime's memory choices (runtime.mapped): weights mapped from the bundle's file (same
logits, bitwise), a tied head's own mapping packed first, the fallbacks (a file this reader does
not take, a graph ONNX Runtime refuses), the session config defaults reaching ONNX Runtime, the
heap trimmed after loading, and on a model large enough to see it, the resident memory and the
load peak a mapped load saves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2_edge.errors import Gpt2EdgeError
from gpt2_edge.runtime import mapped as mapped_mod
from gpt2_edge.runtime import session as session_mod
from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.mapped import PREPACKED_SUFFIX, mapped_model
from gpt2_edge.runtime.session import OrtBackend

onnx = pytest.importorskip("onnx")
pytestmark = pytest.mark.filterwarnings("ignore")
IDS = np.array([[1, 5, 9, 200, 17, 3], [4, 4, 8, 15, 16, 23]], dtype=np.int64)


@pytest.mark.parametrize(
    "kv_cache,precision",
    [("inplace", p) for p in ("fp32", "int8-dynamic", "int8-weight", "int8-qdq", "int4")]
    + [("concat", p) for p in ("fp32", "fp16", "int8-dynamic", "int4")],
)
def test_mapped_weights_give_the_same_logits(make_bundle, kv_cache, precision):
    calib = "sample-x2" if precision == "int8-qdq" else None  # the bundle tests/bundles.py registers
    bundle = Bundle.load(make_bundle(kv_cache=kv_cache, precision=precision, calib=calib))
    mapped = OrtBackend(bundle, threads=1)
    copied = OrtBackend(bundle, threads=1, map_weights=False)
    assert mapped.mapped is not None and mapped.mapped.bytes_mapped > 0
    assert copied.mapped is None
    np.testing.assert_array_equal(mapped.logits(IDS), copied.logits(IDS))


def test_mapped_proto_points_into_the_model_file(inplace_bundle):
    from onnx import numpy_helper

    path = inplace_bundle / "model.onnx"
    m = mapped_model(path)
    assert m is not None and len(m.proto) < path.stat().st_size - m.bytes_mapped + 1024
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    data = path.read_bytes()
    external = [t for t in onnx.load_from_string(m.proto).graph.initializer if t.external_data]
    assert sum(int({e.key: e.value for e in t.external_data}["length"]) for t in external) >= m.bytes_mapped
    for t in external:
        entry = {e.key: e.value for e in t.external_data}
        assert entry["location"] == "model.onnx" and t.data_location == onnx.TensorProto.EXTERNAL
        offset, length = int(entry["offset"]), int(entry["length"])
        name = t.name.removesuffix(PREPACKED_SUFFIX)
        assert data[offset : offset + length] == original[name].tobytes()


def test_a_tied_head_gets_its_own_mapping_only_when_prepacked(inplace_bundle):
    graph = onnx.load(str(inplace_bundle / "model.onnx"), load_external_data=False).graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    tied = {n.input[1] for n in graph.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm")} & gathered
    if not tied:
        pytest.skip("this export does not tie the head to the embedding")
    bundle = Bundle.load(inplace_bundle)
    packed = OrtBackend(bundle, threads=1)
    assert set(packed.mapped.untied) == tied
    heads = [n for n in onnx.load_from_string(packed.mapped.proto).graph.node if n.op_type != "Gather"]
    assert {t + PREPACKED_SUFFIX for t in tied} <= {i for n in heads for i in n.input}
    first = onnx.load_from_string(packed.mapped.proto).graph.node[0]  # packed first: no load peak
    assert (
        packed.mapped.first == tuple(t + PREPACKED_SUFFIX for t in tied)
        and first.input[1] in packed.mapped.first
    )
    unpacked = OrtBackend(bundle, threads=1, session_config={"session.disable_prepacking": "1"})
    assert unpacked.mapped.untied == ()  # two mappings of one table would count it twice
    np.testing.assert_array_equal(packed.logits(IDS), unpacked.logits(IDS))


def test_mapping_is_skipped_when_asked_and_where_it_cannot_apply(inplace_bundle, tmp_path, monkeypatch):
    bundle = Bundle.load(inplace_bundle)
    monkeypatch.setenv("GPT2_EDGE_MAP_WEIGHTS", "0")
    assert OrtBackend(bundle, threads=1).mapped is None
    monkeypatch.delenv("GPT2_EDGE_MAP_WEIGHTS")
    assert OrtBackend(bundle, threads=1).mapped is not None
    external = tmp_path / "ext.onnx"  # weights already external: ONNX Runtime maps them itself
    onnx.save_model(
        onnx.load(str(inplace_bundle / "model.onnx")),
        str(external),
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert mapped_model(external) is None
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff not a model")
    assert mapped_model(tmp_path / "junk.onnx") is None
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert mapped_model(tmp_path / "empty.onnx") is None
    assert mapped_model(tmp_path / "missing.onnx") is None  # ONNX Runtime's load says what is wrong
    data = (inplace_bundle / "model.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    assert mapped_model(tmp_path / "cut.onnx") is None


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_a_truncated_model_is_a_clear_error(inplace_bundle, tmp_path, cut):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(inplace_bundle, copy)
    bundle = Bundle.load(copy, verify=False)  # before the cut: past the loader's size check
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(Gpt2EdgeError, match="cannot load"):
        OrtBackend(bundle, threads=1)


def test_a_bundle_replaced_by_rename_leaves_a_live_session_alone(inplace_bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(inplace_bundle, copy)
    backend = OrtBackend(Bundle.load(copy), threads=1)
    before = backend.logits(IDS)
    other = tmp_path / "other.onnx"
    other.write_bytes(b"\0" * (copy / "model.onnx").stat().st_size)  # same size, other bytes
    other.replace(copy / "model.onnx")  # how bundles are replaced: whole, by rename
    np.testing.assert_array_equal(backend.logits(IDS), before)


def test_a_refused_rewrite_falls_back_to_the_file(inplace_bundle, monkeypatch):
    bundle = Bundle.load(inplace_bundle)
    broken = mapped_mod.MappedModel(b"\x08\x07not a graph", inplace_bundle / "model.onnx", 1, (), ())
    monkeypatch.setattr(session_mod, "mapped_model", lambda *a, **k: broken)
    backend = OrtBackend(bundle, threads=1)
    assert backend.mapped is None
    np.testing.assert_array_equal(
        backend.logits(IDS), OrtBackend(bundle, threads=1, map_weights=False).logits(IDS)
    )


def test_session_config_defaults_reach_onnxruntime(inplace_bundle, monkeypatch):
    bundle = Bundle.load(inplace_bundle)
    key = "session.disable_prepacking"
    monkeypatch.setitem(session_mod.SESSION_DEFAULTS, bundle.precision, {key: "1"})
    b = OrtBackend(bundle, threads=1)
    assert b.session_config[key] == "1"
    assert b.session.get_session_options().get_session_config_entry(key) == "1"
    assert b.mapped.untied == ()  # the default counts like an explicit entry
    b = OrtBackend(bundle, threads=1, session_config={key: "0"})  # the caller's entry wins
    assert b.session.get_session_options().get_session_config_entry(key) == "0"


def test_the_heap_is_trimmed_after_loading_unless_asked_not_to(inplace_bundle, monkeypatch):
    import platform

    calls = []
    monkeypatch.setattr(session_mod, "release_free_memory", lambda: calls.append(1) or True)
    backend = OrtBackend(Bundle.load(inplace_bundle), threads=1)
    assert calls == [1]  # after the session
    backend.new_cache(1, 8)
    backend.new_cache(1, 8)
    assert calls == [1, 1]  # and once more at the first cache: the caller's tokenizer is loaded
    monkeypatch.undo()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert mapped_mod.release_free_memory() is True
    monkeypatch.setenv("GPT2_EDGE_MALLOC_TRIM", "0")
    assert mapped_mod.release_free_memory() is False


PEAK = """
import json, sys
import numpy as np, onnxruntime as ort
from gpt2_edge.runtime.mapped import mapped_model
def status():
    return {l.split(':')[0]: int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('Vm')}
path, mapped = sys.argv[1], sys.argv[2] == '1'
base = status()['VmRSS']
so = ort.SessionOptions()
model = path
if mapped:
    m = mapped_model(path)
    so.add_session_config_entry('session.model_external_initializers_file_folder_path', str(m.path.parent))
    model = m.proto
s = ort.InferenceSession(model, so, providers=['CPUExecutionProvider'])
y = s.run(None, {'ids': np.array([0, 7, 4095], np.int64)})[0]
st = status()
print(json.dumps({'peak': st['VmHWM'] - base, 'kept': st['VmRSS'] - base, 'sum': float(y.sum())}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_a_mapped_load_keeps_one_copy_of_a_tied_table(tmp_path):
    """A 32 MiB table read by a Gather and by a prepacked Gemm (a tied head): loaded by path, the
    table stays resident beside its packed copy; mapped, only the packed copy and the rows the
    Gather reads do (the table's pages are read once, while it is packed: the peak is no higher)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4096, 2048), dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["w", "ids"], ["x"]),
            helper.make_node("Gemm", ["x", "w"], ["y"], transB=1),
        ],
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4096])],
        [numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    run = {
        m: json.loads(
            subprocess.run(
                [sys.executable, "-c", PEAK, str(path), m], capture_output=True, text=True, check=True
            ).stdout
        )
        for m in ("0", "1")
    }
    table = w.nbytes / 2**20  # 32 MiB
    assert run["0"]["sum"] == run["1"]["sum"]
    assert run["1"]["kept"] < run["0"]["kept"] - table / 2, run
    assert run["1"]["kept"] < 1.5 * table, run  # the packed copy (+ a few rows), not the table too
    assert run["1"]["peak"] <= run["0"]["peak"] + 4, run
