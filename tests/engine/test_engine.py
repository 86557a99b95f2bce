"""TensorRT engines on a CPU: profiles, provider options, the build, the engine manifest and its
checks, and the engine backend's buffers and bindings against fake TensorRT + CUDA layers whose
"engine" runs the graph with onnxruntime (so greedy parity with the ORT backend is real)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gpt2_edge import contract
from gpt2_edge.cli import main
from gpt2_edge.engine.builder import BuildOptions, EngineBuildError, build_engine, engine_precision
from gpt2_edge.runtime import session
from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.loader import Model
from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.runtime.session import OrtBackend, ProviderError, tensorrt_provider_options
from gpt2_edge.runtime.trt import api, system
from gpt2_edge.runtime.trt.backend import TrtEngineBackend
from gpt2_edge.runtime.trt.cuda import DeviceInfo
from gpt2_edge.runtime.trt.errors import EngineError
from gpt2_edge.runtime.trt.plan import (
    MANIFEST,
    PLAN,
    TIMING_CACHE,
    EngineManifest,
    gpu_key,
    locate_engine,
    read_manifest,
)
from gpt2_edge.runtime.trt.runner import DeviceKV
from gpt2_edge.runtime.trt.shapes import (
    Limits,
    ShapeRange,
    decoder_profiles,
    ort_profile_options,
    shape_ranges,
)
from tests.engine.engine_fakes import FAKE_GPU, FakeParserError, fake_stack
from tests.helpers import REPO

pytestmark = pytest.mark.filterwarnings("ignore")
PROMPTS = ["First Citizen:", "All:\nSpeak", "We are accounted poor citizens, the patricians good."]


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory, trt_target_bundle) -> Path:
    """A tensorrt-target fp32 bundle of the tiny model (context 64): this module's copy, which the
    ``engine`` fixture builds an engine into."""
    return shutil.copytree(trt_target_bundle, tmp_path_factory.mktemp("trt") / "b")


@pytest.fixture(scope="module")
def ort_cpu(trt_bundle) -> Generator:
    return Generator.from_bundle(str(trt_bundle), threads=1)


@pytest.fixture()
def bundle_copy(tmp_path, trt_bundle) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(trt_bundle, dst, ignore=shutil.ignore_patterns("engines"))
    return dst


def _build(bundle: Path, trt, limits: Limits = Limits(max_batch=4), **kw) -> Path:
    return build_engine(
        bundle, options=BuildOptions(limits=limits, **kw), trt=trt, gpu=FAKE_GPU, log=lambda _: None
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory, trt_bundle):
    """A fake stack and an engine built into the bundle's engines/ (batch <= 4, 2 lanes)."""
    trt, cuda = fake_stack()
    out = _build(trt_bundle, trt, Limits(max_batch=4, lanes=2))
    return trt, cuda, out


@pytest.fixture(scope="module")
def trt_gen(trt_bundle, engine) -> Generator:
    trt, cuda, _ = engine
    return Generator.from_bundle(str(trt_bundle), provider="trt-engine", trt=trt, cuda=cuda)


# profiles and provider options ---------------------------------------------------------------------
def test_profiles_cover_prefill_and_every_decode_past(trt_bundle):
    b = Bundle.load(trt_bundle)
    H, D = b.dims.n_head, b.dims.head_size
    profiles = decoder_profiles(
        b.inputs, Limits(max_batch=4, max_context=32, opt_batch=2, lanes=2).resolve(64)
    )
    assert [(p.phase, p.lane) for p in profiles] == [
        ("prefill", 0),
        ("decode", 0),
        ("prefill", 1),
        ("decode", 1),
    ]
    prefill, decode = profiles[0].shapes, profiles[1].shapes
    assert decode["input_ids"].min == (1, 1) and decode["input_ids"].max == (4, 1)
    assert decode["past_key_values.0.key"].min == (1, H, 0, D)
    assert decode["past_key_values.0.key"].max == (4, H, 31, D)  # the last decode step: past = context - 1
    assert decode["attention_mask"].max == (4, 32) and decode["attention_mask"].opt == (2, 17)
    assert prefill["input_ids"].max == (4, 32) and prefill["input_ids"].opt == (2, 32)
    assert prefill["past_key_values.1.value"].opt == (2, H, 0, D)  # tuned for an empty past
    assert set(prefill) == {s.name for s in b.inputs}  # every input has a range
    one = shape_ranges(b.inputs, Limits(max_batch=2).resolve(64))
    assert one["input_ids"].max == (2, 64) and one["past_key_values.0.key"].max == (2, H, 63, D)
    assert one["position_ids"].min == (1, 1)


@pytest.mark.parametrize(
    "limits, match",
    [
        (Limits(max_context=65), "max_context must be in 2..64"),
        (Limits(max_batch=0), "max_batch must be an integer >= 1"),
        (Limits(max_batch=2, opt_batch=3), "opt_batch must be in 1..max_batch"),
        (Limits(lanes=0), "lanes must be"),
    ],
)
def test_limits_are_checked(limits, match):
    with pytest.raises(EngineError, match=match):
        limits.resolve(64)


def test_unknown_dimension_is_refused():
    spec = contract.TensorSpec("input_ids", "int64", ("batch_size", "tokens"))
    with pytest.raises(EngineError, match="'tokens'"):
        shape_ranges([spec], Limits().resolve(64))


def test_ort_profile_strings():
    opts = ort_profile_options(
        {
            "input_ids": ShapeRange((1, 1), (1, 1), (8, 64)),
            "past": ShapeRange((1, 2, 0, 4), (1, 2, 32, 4), (8, 2, 63, 4)),
        }
    )
    assert opts["trt_profile_min_shapes"] == "input_ids:1x1,past:1x2x0x4"
    assert opts["trt_profile_opt_shapes"] == "input_ids:1x1,past:1x2x32x4"
    assert opts["trt_profile_max_shapes"] == "input_ids:8x64,past:8x2x63x4"


def _provider_options(bundle, tmp_path, monkeypatch, gpu=FAKE_GPU, trt="10.3.0.30", **kw):
    monkeypatch.setattr(system, "current_gpu", lambda cuda=None: gpu)
    monkeypatch.setattr(system, "tensorrt_version", lambda: trt)
    return tensorrt_provider_options(bundle, tmp_path / "cache", **kw)


def test_tensorrt_provider_options_have_ranges_and_keyed_caches(trt_bundle, tmp_path, monkeypatch):
    b = Bundle.load(trt_bundle)
    opts = _provider_options(b, tmp_path, monkeypatch, max_batch=4)
    assert opts["trt_profile_min_shapes"].startswith("input_ids:1x1,attention_mask:1x1,position_ids:1x1,")
    assert "past_key_values.0.key:4x4x63x16" in opts["trt_profile_max_shapes"]
    assert opts["trt_fp16_enable"] is False and opts["trt_engine_cache_enable"] is True
    cache = Path(opts["trt_engine_cache_path"])
    assert cache.is_dir() and cache.name.startswith("nvidia-fake-orin-sm87-trt10.3.0.30-ort")
    assert Path(opts["trt_timing_cache_path"]).name == "timing-nvidia-fake-orin-sm87-trt10.3.0.30"
    # any change of GPU, TensorRT, limits or graph gives another engine directory
    other_gpu = DeviceInfo("NVIDIA H100 80GB HBM3", 9, 0, 80 * 2**30)
    paths = {
        opts["trt_engine_cache_path"],
        _provider_options(b, tmp_path, monkeypatch, gpu=other_gpu, max_batch=4)["trt_engine_cache_path"],
        _provider_options(b, tmp_path, monkeypatch, trt="10.8.0.43", max_batch=4)["trt_engine_cache_path"],
        _provider_options(b, tmp_path, monkeypatch, max_batch=8)["trt_engine_cache_path"],
        _provider_options(b, tmp_path, monkeypatch, max_batch=4, max_context=32)["trt_engine_cache_path"],
    }
    files = {**b.manifest.files, "model.onnx": replace(b.manifest.files["model.onnx"], sha256="0" * 64)}
    changed = Bundle(b.path, replace(b.manifest, files=files))
    paths.add(_provider_options(changed, tmp_path, monkeypatch, max_batch=4)["trt_engine_cache_path"])
    assert len(paths) == 6


def test_trt_fp16_is_refused_where_it_cannot_work(trt_bundle, tmp_path, monkeypatch):
    b = Bundle.load(trt_bundle)
    assert _provider_options(b, tmp_path, monkeypatch, fp16=True)["trt_fp16_enable"] is True  # TensorRT 10
    with pytest.raises(ProviderError, match="strongly typed networks only"):
        _provider_options(b, tmp_path, monkeypatch, trt="11.4.0.5", fp16=True)
    fp16 = Bundle(b.path, replace(b.manifest, precision="fp16"))
    with pytest.raises(ProviderError, match="already fp16"):
        _provider_options(fp16, tmp_path, monkeypatch, fp16=True)


def test_ort_backend_hands_the_ranges_to_the_tensorrt_provider(trt_bundle, tmp_path, monkeypatch):
    import onnxruntime

    seen = {}

    class StopError(Exception):
        pass

    def fake_session(path, so, providers):
        seen["providers"] = providers
        raise StopError("stopped here")

    monkeypatch.setattr(session, "resolve_provider", lambda p: "tensorrt")
    monkeypatch.setattr(onnxruntime, "InferenceSession", fake_session)
    monkeypatch.setattr(system, "current_gpu", lambda cuda=None: FAKE_GPU)
    monkeypatch.setattr(system, "tensorrt_version", lambda: "10.3.0.30")
    with pytest.raises(ValueError, match="onnxruntime cannot load"):
        OrtBackend(Bundle.load(trt_bundle), provider="tensorrt", trt_cache_dir=tmp_path, trt_max_batch=2)
    name, opts = seen["providers"][0]
    assert name == "TensorrtExecutionProvider"
    assert "input_ids:2x64" in opts["trt_profile_max_shapes"]
    assert Path(opts["trt_engine_cache_path"]).parent == tmp_path
    assert [p if isinstance(p, str) else p[0] for p in seen["providers"][1:]] == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


# the precision a bundle implies ----------------------------------------------------------------------
def test_engine_precision(trt_bundle):
    b = Bundle.load(trt_bundle)
    assert engine_precision(b) == "fp32"
    for p in ("fp16", "int8-qdq"):
        assert engine_precision(Bundle(b.path, replace(b.manifest, precision=p))) == p
    with pytest.raises(EngineError, match="TensorRT cannot build"):
        engine_precision(Bundle(b.path, replace(b.manifest, precision="int4")))
    with pytest.raises(EngineError, match="--target tensorrt"):
        engine_precision(Bundle(b.path, replace(b.manifest, target="ort", kv_cache="inplace")))


def test_tensorrt_target_passes_the_parser_op_list(trt_bundle):
    from gpt2_edge.export.graph import unsupported_by_tensorrt

    census = Bundle.load(trt_bundle).manifest.graph["op_census"]
    assert census and unsupported_by_tensorrt(census) == {}


# the build -------------------------------------------------------------------------------------------
def test_build_writes_plan_manifest_and_timing_cache(bundle_copy):
    trt, _ = fake_stack()
    out = _build(bundle_copy, trt, Limits(max_batch=4, max_context=48), workspace_mib=512)
    assert out == bundle_copy / "engines" / "nvidia-fake-orin-sm87-trt10.3.0.30"
    assert (out / PLAN).is_file() and (out / TIMING_CACHE).read_bytes() == b"+timings"
    m = read_manifest(out)
    assert m.tensorrt_version == "10.3.0.30" and m.precision == "fp32"
    assert m.gpu == {"name": "NVIDIA Fake Orin", "compute_capability": "8.7", "total_memory": 8 * 2**30}
    assert m.limits == {"max_batch": 4, "max_context": 48, "opt_batch": 1, "lanes": 1, "split_phases": True}
    assert [p.phase for p in m.profiles] == ["prefill", "decode"]
    assert (
        m.bundle["model_sha256"]["model.onnx"]
        == Bundle.load(bundle_copy).manifest.files["model.onnx"].sha256
    )
    assert m.plan["bytes"] == (out / PLAN).stat().st_size
    assert m.builder["strongly_typed"] and m.builder["tf32"] is False and m.builder["workspace_mib"] == 512
    built = trt.Builder.last
    assert built.network.flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert built.config.pool[trt.MemoryPoolType.WORKSPACE] == 512 * 2**20
    assert trt.BuilderFlag.TF32 in built.config.cleared  # plain fp32 for an fp32 bundle
    assert len(built.config.profiles) == 2
    # a rebuild reuses the timing cache and replaces the engine
    out2 = _build(bundle_copy, trt, Limits(max_batch=2))
    assert out2 == out and read_manifest(out).builder["timing_cache_reused"] is True
    assert (out / TIMING_CACHE).read_bytes() == b"+timings+timings"


def test_build_with_an_explicit_timing_cache_and_output(bundle_copy, tmp_path):
    trt, _ = fake_stack()
    cache = tmp_path / "shared.timing"
    cache.write_bytes(b"old")
    out = build_engine(
        bundle_copy,
        tmp_path / "eng",
        BuildOptions(Limits(max_batch=1, split_phases=False), timing_cache=cache, tf32=True),
        trt=trt,
        gpu=FAKE_GPU,
        log=lambda _: None,
    )
    assert out == tmp_path / "eng" and cache.read_bytes() == b"old+timings"
    assert not (out / TIMING_CACHE).exists()
    m = read_manifest(out)
    assert [p.phase for p in m.profiles] == ["any"] and m.builder["tf32"] is True


def test_parser_failure_names_the_node_and_what_to_do(bundle_copy):
    trt, _ = fake_stack()
    trt.OnnxParser.fail_with = [
        FakeParserError("no importer for op GroupQueryAttention", 17, "/h.0/attn/GQA", "GroupQueryAttention")
    ]
    with pytest.raises(EngineBuildError) as e:
        _build(bundle_copy, trt)
    msg = str(e.value)
    assert "node /h.0/attn/GQA (GroupQueryAttention, #17): no importer" in msg
    assert "What to do" in msg and "--target tensorrt" in msg
    assert not (bundle_copy / "engines").exists() or not any((bundle_copy / "engines").iterdir())


def test_build_failure_prints_tensorrt_errors_and_advice(bundle_copy):
    trt, _ = fake_stack()
    trt.Builder.fail_build = True
    with pytest.raises(EngineBuildError, match="could not be allocated") as e:
        _build(bundle_copy, trt)
    assert "--max-batch" in str(e.value) and "--workspace-mib" in str(e.value)


def test_build_refuses_a_bundle_tensorrt_cannot_take(bundle_copy):
    m = json.loads((bundle_copy / "bundle.json").read_text())
    m["precision"] = "int8-dynamic"
    (bundle_copy / "bundle.json").write_text(json.dumps(m))
    trt, _ = fake_stack()
    with pytest.raises(EngineError, match="int8-dynamic, which TensorRT cannot build"):
        _build(bundle_copy, trt)


def test_build_engine_cli(bundle_copy, monkeypatch, capsys):
    trt, _ = fake_stack()
    monkeypatch.setattr(api, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(system, "current_gpu", lambda cuda=None: FAKE_GPU)
    assert (
        main(["build-engine", str(bundle_copy), "--max-batch", "2", "--max-context", "32", "--lanes", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "engine written:" in out and "provider='trt-engine'" in out
    m = read_manifest(bundle_copy / "engines" / gpu_key(FAKE_GPU, "10.3.0.30"))
    assert m.max_batch == 2 and m.max_context == 32 and m.lanes == 2 and len(m.profiles) == 4
    assert main(["build-engine", str(bundle_copy), "--max-context", "500"]) == 2
    assert "max_context must be in 2..64" in capsys.readouterr().err


def test_build_engine_cli_without_tensorrt_is_one_line(trt_bundle, capsys):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert main(["build-engine", str(trt_bundle)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install tensorrt" in err


# loading: the manifest's checks ----------------------------------------------------------------------
def _load(path, trt, cuda, **kw) -> TrtEngineBackend:
    return TrtEngineBackend(path, trt=trt, cuda=cuda, **kw)


def test_engine_for_another_tensorrt_is_refused(bundle_copy):
    trt, _ = fake_stack()
    out = _build(bundle_copy, trt)
    newer, cuda2 = fake_stack(version="10.8.0.43")
    with pytest.raises(
        EngineError,
        match=r"no TensorRT engine for this GPU and TensorRT .*trt10\.8\.0\.43.*sm87-trt10\.3\.0\.30",
    ):
        _load(bundle_copy, newer, cuda2)
    with pytest.raises(
        EngineError, match=r"built with TensorRT 10\.3\.0\.30; this machine has TensorRT 10\.8\.0\.43"
    ) as e:
        _load(out, newer, cuda2)  # the engine directory itself
    assert f"gpt2-edge build-engine {bundle_copy} --max-batch 4 --max-context 64" in str(e.value)


def test_engine_for_another_gpu_is_refused(bundle_copy):
    trt, _ = fake_stack()
    out = _build(bundle_copy, trt)
    other, cuda = fake_stack(gpu=DeviceInfo("NVIDIA GeForce RTX 4090", 8, 9, 24 * 2**30))
    with pytest.raises(
        EngineError,
        match=r"built for NVIDIA Fake Orin \(compute capability 8\.7\); this GPU is NVIDIA GeForce RTX 4090 \(8\.9\)",
    ):
        _load(out, other, cuda)


def test_engine_from_another_graph_or_a_damaged_plan_is_refused(bundle_copy):
    trt, cuda = fake_stack()
    out = _build(bundle_copy, trt)
    m = json.loads((out / MANIFEST).read_text())
    m["bundle"]["model_sha256"]["model.onnx"] = "f" * 64
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EngineError, match="another model.onnx.*gpt2-edge build-engine"):
        _load(bundle_copy, trt, cuda)
    out = _build(bundle_copy, trt)
    (out / PLAN).write_bytes((out / PLAN).read_bytes()[:-1] + b" ")
    with pytest.raises(EngineError, match="does not match its sha256"):
        _load(bundle_copy, trt, cuda)
    (out / MANIFEST).write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(EngineError, match="engine schema 99"):
        _load(bundle_copy, trt, cuda)


def test_locate_engine(bundle_copy):
    with pytest.raises(EngineError, match="build one with `gpt2-edge build-engine"):
        locate_engine(bundle_copy, FAKE_GPU, "10.3.0.30")
    with pytest.raises(EngineError, match="neither an engine directory"):
        locate_engine(bundle_copy / "engines", FAKE_GPU, "10.3.0.30")


# the engine backend ----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
def test_engine_greedy_equals_the_ort_backend(trt_gen, ort_cpu, prompt):
    cfg = GenerationConfig(max_new_tokens=20)
    assert trt_gen.provider == "trt-engine"
    assert trt_gen.generate(prompt, cfg)[0].token_ids == ort_cpu.generate(prompt, cfg)[0].token_ids


def test_engine_batch_sampling_beams_and_streaming(trt_gen, ort_cpu):
    greedy = GenerationConfig(max_new_tokens=12)
    batch = trt_gen.generate(PROMPTS, greedy)
    assert [r.token_ids for r in batch] == [r.token_ids for r in ort_cpu.generate(PROMPTS, greedy)]
    sampled = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=40, seed=3)
    assert (
        trt_gen.generate(PROMPTS[1], sampled)[0].token_ids
        == ort_cpu.generate(PROMPTS[1], sampled)[0].token_ids
    )
    beams = GenerationConfig(max_new_tokens=8, num_beams=3)
    assert (
        trt_gen.generate(PROMPTS[0], beams)[0].token_ids == ort_cpu.generate(PROMPTS[0], beams)[0].token_ids
    )
    pieces = list(trt_gen.stream(PROMPTS[2], greedy))
    assert "".join(pieces) == trt_gen.generate(PROMPTS[2], greedy)[0].text


def test_engine_from_its_directory_and_context_limits(engine, trt_bundle):
    trt, cuda, out = engine
    gen = Generator.from_bundle(str(out), provider="trt-engine", trt=trt, cuda=cuda)
    assert gen.n_ctx == 64 and gen.backend.bundle.path == trt_bundle.resolve()
    with pytest.raises(EngineError, match="exceed the engine's --max-batch 4"):
        gen.backend.new_cache(5, 16)
    with pytest.raises(ValueError, match="context"):
        gen.generate("All:", GenerationConfig(max_new_tokens=70))


def test_short_engine_context_bounds_the_generator(bundle_copy):
    trt, cuda = fake_stack()
    _build(bundle_copy, trt, Limits(max_batch=2, max_context=24))
    gen = Generator.from_bundle(str(bundle_copy), provider="trt-engine", trt=trt, cuda=cuda)
    assert gen.n_ctx == 24
    r = gen.generate(PROMPTS[2], GenerationConfig(max_new_tokens=20, truncate=True))[0]
    assert r.prompt_tokens == 4 and len(r.token_ids) <= 20


def test_chunked_prefill_and_full_logits_match_ort(engine, trt_bundle, ort_cpu):
    trt, cuda, _ = engine
    backend = _load(trt_bundle, trt, cuda)
    backend.description = replace(backend.description, prefill_chunk=5)  # 6+ tokens: chunks
    cfg = GenerationConfig(max_new_tokens=10)
    gen = Generator(Model(backend, backend.bundle.tokenizer(), backend.bundle.eos_token_id, bundle=backend.bundle))
    assert gen.generate(PROMPTS, cfg)[0].token_ids == ort_cpu.generate(PROMPTS, cfg)[0].token_ids
    assert [r.token_ids for r in gen.generate(PROMPTS, cfg)] == [
        r.token_ids for r in ort_cpu.generate(PROMPTS, cfg)
    ]
    ids = np.array([ort_cpu.encode(PROMPTS[2])[:12], ort_cpu.encode(PROMPTS[2])[1:13]])
    ref = OrtBackend(Bundle.load(trt_bundle), threads=1).logits(ids)
    np.testing.assert_allclose(backend.logits(ids), ref, atol=1e-4)


def test_ping_pong_buffers_allocated_once_and_only_last_logits_copied(engine, trt_bundle):
    trt, cuda, _ = engine
    backend = _load(trt_bundle, trt, cuda)
    tok = backend.bundle.tokenizer()
    cache = backend.new_cache(2, 40)
    runner = cache.runner
    allocated = runner.allocations
    mallocs = cuda.mallocs
    d = backend.description
    assert allocated == 4 + 2 * len(d.past_names)  # 3 inputs + logits, two KV sets
    logits = cache.prefill([0, 1], [tok.encode(PROMPTS[0]), tok.encode(PROMPTS[1])])
    assert logits.shape == (2, d.vocab)
    before = cuda.d2h_bytes
    ctx = runner.lane.context
    for step in range(6):
        cache.decode([0, 1], [5 + step, 7 + step])
        assert cuda.d2h_bytes - before == 2 * d.vocab * 4 * (step + 1)  # [B, V] float32 per step
    assert runner.allocations == allocated and cuda.mallocs == mallocs  # nothing reallocated
    runs = ctx.runs[-7:]
    first_past = [r["addresses"]["past_key_values.0.key"] for r in runs]
    first_present = [r["addresses"]["present.0.key"] for r in runs]
    assert len(set(first_present)) == 2  # two KV sets ...
    assert all(
        first_past[i + 1] == first_present[i] for i in range(6)
    )  # ... each step's present is the next past
    assert all(r["profile"] in runner.lane.profiles for r in runs)
    phases = [backend.manifest.profiles[r["profile"]].phase for r in runs]
    assert phases == ["prefill"] + ["decode"] * 6
    assert all(r["shapes"]["input_ids"] == (2, 1) for r in runs[1:])


def test_stale_handles_and_foreign_handles_are_refused(engine, trt_bundle):
    trt, cuda, _ = engine
    backend = _load(trt_bundle, trt, cuda)
    cache = backend.new_cache(1, 32)
    runner = cache.runner
    ids = np.array([[3, 4, 5]], np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(3, dtype=np.int64)[None]
    _, old = runner.run(ids, mask, pos, None)
    runner.run(ids, mask, pos, None)  # writes the other set: `old` is still valid
    d = backend.description
    assert runner.to_numpy(old[0]).shape == (1, d.n_head, 3, d.head_size)
    runner.run(ids, mask, pos, None)  # overwrites `old`'s set
    with pytest.raises(EngineError, match="stale"):
        runner.to_numpy(old[0])
    foreign = DeviceKV(owner=0, kv_set=0, index=0, shape=(1, 1, 1, 1), generation=0)
    with pytest.raises(EngineError, match="another cache"):
        runner.to_numpy(foreign)


def test_growth_keeps_the_cache(engine, trt_bundle, ort_cpu):
    """A batch wider than the cache's capacity (idle rows) grows the buffers and keeps the KV."""
    trt, cuda, _ = engine
    backend = _load(trt_bundle, trt, cuda)
    tok = backend.bundle.tokenizer()
    cache = backend.new_cache(1, 4)
    prompt = tok.encode(PROMPTS[2])[:4]
    first = cache.prefill([0], [prompt])
    mallocs = cuda.mallocs
    runner = cache.runner
    runner._reserve(1, 1, 20)  # as a wider batch would
    assert cuda.mallocs > mallocs
    ids = np.array([[int(np.argmax(first[0]))]], np.int64)
    logits, _ = runner.run(ids, np.ones((1, 5), np.int64), np.array([[4]]), cache._past)
    ref = ort_cpu.backend.new_cache(1, 8)
    ref.prefill([0], [prompt])
    np.testing.assert_allclose(logits, ref.decode([0], [int(ids[0, 0])]), atol=1e-4)


def test_lanes_bound_concurrent_caches(engine, trt_bundle):
    trt, cuda, _ = engine
    backend = _load(trt_bundle, trt, cuda, lane_timeout_s=0.05)
    a, b = backend.new_cache(1, 8), backend.new_cache(1, 8)  # two lanes: two caches at once
    assert a.runner.lane.profiles != b.runner.lane.profiles
    tok = backend.bundle.tokenizer()
    a.prefill([0], [tok.encode("All:")])
    b.prefill([0], [tok.encode("All:")])  # the fake asserts no profile serves two contexts
    assert backend.lanes.free == 0
    with pytest.raises(EngineError, match="lane\\(s\\) .* stayed busy"):
        backend.new_cache(1, 8)
    frees = cuda.frees
    del a
    assert cuda.frees > frees  # the collected cache freed its buffers and gave its lane back
    assert backend.lanes.free == 1
    c = backend.new_cache(1, 8)
    c.prefill([0], [tok.encode("All:")])


def test_engine_modules_are_torch_free_and_the_runtime_never_imports_the_builder(trt_bundle):
    code = (
        "import sys\n"
        "import gpt2_edge.runtime.backends, gpt2_edge.runtime.generator\n"
        "import gpt2_edge.runtime.trt.backend, gpt2_edge.runtime.trt.system\n"
        "up = [m for m in sys.modules if m.startswith('gpt2_edge.engine')]\n"
        "assert not up, up\n"
        "import gpt2_edge.engine.builder, gpt2_edge.engine.cli, gpt2_edge.engine.doctor\n"
        "bad = [m for m in ('torch', 'transformers', 'onnx', 'tensorrt', 'cuda') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_device_smoke_script_builds_the_runners_description_and_lane_pool():
    """scripts/device-smoke.py (run on a real GPU by hand) drives EngineRunner with a toy engine
    through the same EngineDescription and LanePool as the backend; --fake checks it here."""
    script = REPO / "scripts" / "device-smoke.py"
    res = subprocess.run(
        [sys.executable, str(script), "--fake"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert res.returncode == 0 and "FAIL" not in res.stdout, res.stdout + res.stderr
    assert "PASS  engine runner" in res.stdout and "PASS  stale KV handles" in res.stdout, res.stdout


def test_manifest_round_trip(engine):
    _, _, out = engine
    m = read_manifest(out)
    again = EngineManifest.from_dict(json.loads(json.dumps(m.as_dict())), out)
    assert again == replace(m)
    assert again.profiles[1].admits(
        {"input_ids": (1, 1), "attention_mask": (1, 10), "position_ids": (1, 1)}
        | {n: (1, 4, 9, 16) for n in again.profiles[1].shapes if n.startswith("past")}
    )


def test_slots_join_leave_and_reorder_like_the_server(engine, trt_bundle, ort_cpu):
    """A chunked prompt joining a running batch (both KV sets in use), releases and reorders."""
    trt, cuda, _ = engine
    backend = _load(trt_bundle, trt, cuda)
    backend.description = replace(backend.description, prefill_chunk=3)
    tok = backend.bundle.tokenizer()
    a, b = tok.encode(PROMPTS[0]), tok.encode(PROMPTS[2])
    dev, ref = backend.new_cache(3, 48), ort_cpu.backend.new_cache(3, 48)

    def both(op, *args):
        x, y = getattr(dev, op)(*args), getattr(ref, op)(*args)
        if x is not None:
            np.testing.assert_allclose(x, y, atol=1e-4, err_msg=f"{op}{args}")

    both("prefill", [0], [a])
    for t in range(3):
        both("decode", [0], [10 + t])
    both("prefill", [2], [b])  # longer than a chunk, while slot 0's presents must survive
    for t in range(3):
        both("decode", [0, 2], [20 + t, 30 + t])
    both("prefill", [1], [a[:2]])
    both("release", 0)
    for t in range(2):
        both("decode", [1, 2], [40 + t, 50 + t])
    both("reorder", [2, 1])
    both("decode", [0, 1], [60, 61])


def test_build_never_replaces_the_bundle_or_a_foreign_directory(bundle_copy, tmp_path):
    trt, _ = fake_stack()
    for bad in (bundle_copy, bundle_copy.parent):
        with pytest.raises(EngineError, match="is or contains the bundle"):
            build_engine(
                bundle_copy, bad, BuildOptions(Limits(max_batch=1)), trt=trt, gpu=FAKE_GPU, log=lambda _: None
            )
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a engine directory|not an engine directory|has no engine.json"):
        build_engine(
            bundle_copy, other, BuildOptions(Limits(max_batch=1)), trt=trt, gpu=FAKE_GPU, log=lambda _: None
        )
    assert (other / "cat.jpg").is_file() and (bundle_copy / "bundle.json").is_file()
