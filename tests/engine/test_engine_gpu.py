"""Every GPU path on a real NVIDIA GPU: ONNX Runtime's TensorRT provider (fp32, fp16, int8-qdq),
the engine build, and the native engine backend (greedy parity, batches, streaming, threads).

Marked ``gpu``: skipped without a GPU (conftest), and per test without its runtime. Tiny random
models; ``scripts/gpu-check`` runs these and then measures the default model.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from gpt2_edge.engine.builder import BuildOptions, build_engine
from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.runtime.session import ProviderError
from gpt2_edge.runtime.trt.cuda import CudaError, import_runtime
from gpt2_edge.runtime.trt.errors import EngineError
from gpt2_edge.runtime.trt.plan import read_manifest
from gpt2_edge.runtime.trt.shapes import Limits
from gpt2_edge.runtime.trt.system import current_gpu
from gpt2_edge.tolerances import TOLERANCES
from tests.helpers import SAMPLE_TEXT

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore")]
PROMPTS = ["First Citizen:", "All:\nSpeak", "We are accounted poor citizens, the patricians good."]
GREEDY = GenerationConfig(max_new_tokens=24)
INT8_MIN_TOP1 = 0.98  # int8 kernels round differently from ONNX Runtime's CPU ones: same graph, same data


def _need_provider(name: str) -> None:
    import onnxruntime as ort

    if name not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no {name}: install onnxruntime-gpu (not onnxruntime)")


def _need_engine_stack() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT's Python package is not installed")
    try:
        import_runtime()
    except CudaError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, make_bundle) -> dict[str, Path]:
    """fp32, fp16 and int8-qdq bundles of the tensorrt target (gates forced: a random model; int8-qdq
    calibrated on SAMPLE_TEXT), copied: the ``engines`` fixture builds into them."""
    root = tmp_path_factory.mktemp("gpu")
    return {
        p: shutil.copytree(make_bundle(target="tensorrt", precision=p), root / p)
        for p in ("fp32", "fp16", "int8-qdq")
    }


@pytest.fixture(scope="module")
def cpu(bundles) -> dict[str, Generator]:
    return {p: Generator.from_bundle(str(b), provider="cpu", threads=2) for p, b in bundles.items()}


def top1_agreement(a, b, ids: np.ndarray) -> float:
    """Teacher-forced: the fraction of positions where two backends' argmax tokens agree."""
    return float((a.logits(ids).argmax(-1) == b.logits(ids).argmax(-1)).mean())


@pytest.fixture(scope="module")
def eval_ids(cpu) -> np.ndarray:
    tok = cpu["fp32"].tokenizer
    ids = tok.encode(SAMPLE_TEXT)
    return np.array([ids[i * 48 : (i + 1) * 48] for i in range(4)], np.int64)


# ONNX Runtime's TensorRT execution provider ----------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-qdq"])
def test_tensorrt_provider(bundles, cpu, eval_ids, precision, tmp_path):
    _need_provider("TensorrtExecutionProvider")
    try:
        gpu = Generator.from_bundle(
            str(bundles[precision]), provider="tensorrt", trt_cache_dir=tmp_path, trt_max_batch=4
        )
    except ProviderError as e:  # onnxruntime-gpu without TensorRT's libraries
        pytest.skip(str(e))
    if precision == "fp32":
        for p in PROMPTS:
            assert gpu.generate(p, GREEDY)[0].token_ids == cpu["fp32"].generate(p, GREEDY)[0].token_ids
    else:
        need = TOLERANCES["fp16"].min_top1_agreement if precision == "fp16" else INT8_MIN_TOP1
        assert top1_agreement(gpu.backend, cpu[precision].backend, eval_ids) >= need
    # explicit profiles: generating at new lengths builds nothing new
    engines = sorted(tmp_path.rglob("*.engine"))
    assert engines, "the TensorRT provider cached no engine"
    gpu.generate(PROMPTS, GenerationConfig(max_new_tokens=40))
    assert sorted(tmp_path.rglob("*.engine")) == engines


def test_cuda_provider(bundles, cpu):
    _need_provider("CUDAExecutionProvider")
    gpu = Generator.from_bundle(str(bundles["fp32"]), provider="cuda")
    for p in PROMPTS:
        assert gpu.generate(p, GREEDY)[0].token_ids == cpu["fp32"].generate(p, GREEDY)[0].token_ids


# the native engine -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(bundles) -> dict[str, Path]:
    _need_engine_stack()
    options = BuildOptions(Limits(max_batch=4, lanes=2))
    return {p: build_engine(b, options=options, log=lambda _: None) for p, b in bundles.items()}


@pytest.fixture(scope="module")
def trt(bundles, engines) -> dict[str, Generator]:
    return {p: Generator.from_bundle(str(bundles[p]), provider="trt-engine") for p in engines}


def test_engine_manifest_matches_this_machine(engines):
    import tensorrt

    m = read_manifest(engines["fp16"])
    gpu = current_gpu()
    assert m.tensorrt_version == tensorrt.__version__ and m.gpu["name"] == gpu.name
    assert m.gpu["compute_capability"] == gpu.compute_capability and len(m.profiles) == 4
    assert m.precision == "fp16" and m.builder["strongly_typed"]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-qdq"])
def test_engine_parity(trt, cpu, eval_ids, precision):
    gen = trt[precision]
    if precision == "fp32":
        for p in PROMPTS:
            assert gen.generate(p, GREEDY)[0].token_ids == cpu["fp32"].generate(p, GREEDY)[0].token_ids
        np.testing.assert_allclose(
            gen.backend.logits(eval_ids),
            cpu["fp32"].backend.logits(eval_ids),
            atol=TOLERANCES["fp32"].max_abs_logits,
        )
    else:
        need = TOLERANCES["fp16"].min_top1_agreement if precision == "fp16" else INT8_MIN_TOP1
        assert top1_agreement(gen.backend, cpu[precision].backend, eval_ids) >= need


def test_engine_batch_sampling_beams(trt, cpu):
    gen, ref = trt["fp32"], cpu["fp32"]
    batch = gen.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in batch] == [gen.generate(p, GREEDY)[0].token_ids for p in PROMPTS]
    assert [r.token_ids for r in batch] == [r.token_ids for r in ref.generate(PROMPTS, GREEDY)]
    sampled = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=40, seed=7)
    assert gen.generate(PROMPTS[0], sampled)[0].token_ids == ref.generate(PROMPTS[0], sampled)[0].token_ids
    beams = GenerationConfig(max_new_tokens=10, num_beams=3)
    assert gen.generate(PROMPTS[1], beams)[0].token_ids == ref.generate(PROMPTS[1], beams)[0].token_ids


def test_engine_streaming(trt):
    gen = trt["fp16"]
    pieces = list(gen.stream(PROMPTS[2], GREEDY))
    assert len(pieces) > 1 and "".join(pieces) == gen.generate(PROMPTS[2], GREEDY)[0].text


def test_engine_two_threads_two_lanes(trt):
    gen = trt["fp32"]
    serial = [gen.generate(p, GREEDY)[0].token_ids for p in PROMPTS[:2]]
    out: dict[int, list[int]] = {}

    def run(i: int) -> None:
        out[i] = gen.generate(PROMPTS[i], GREEDY)[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [out[0], out[1]] == serial


def test_engine_for_another_tensorrt_is_refused(bundles, engines, tmp_path):
    copy = tmp_path / "eng"
    shutil.copytree(engines["fp32"], copy)
    m = json.loads((copy / "engine.json").read_text())
    m["tensorrt_version"] = "9.0.0"
    (copy / "engine.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="gpt2-edge build-engine"):
        Generator.from_bundle(str(copy), provider="trt-engine")
    assert Bundle.load(bundles["fp32"]).precision == "fp32"
