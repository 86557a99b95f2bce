"""The server over the native TensorRT engine backend, on a CPU: fake TensorRT and CUDA layers
(tests/engine_fakes.py) whose "engine" runs the bundle's graph with onnxruntime, so the server's
greedy output against ``Generator`` on the same backend kind is a real comparison. The server
gets its backend from ``load_backend``; nothing here names the engine backend's class."""

from __future__ import annotations

import argparse
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from gpt2_edge.engine.builder import BuildOptions, build_engine
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.loader import load_model
from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.runtime.trt.shapes import Limits
from gpt2_edge.serve.app import ServeSettings, create_app
from gpt2_edge.serve.cli import add_serve_arguments, settings_from_args
from tests.engine.engine_fakes import FAKE_GPU, fake_stack

pytestmark = pytest.mark.filterwarnings("ignore")

# A keyless server answers loopback names only (not TestClient's default "testserver").
LOOPBACK = "http://localhost"

PROMPTS = [
    "First Citizen:",
    "All:\nSpeak",
    "We are accounted poor citizens, the patricians good.",
    "O",
    "Second Citizen:\nOne word, good citizens.",
    "Let us kill him, and we'll have corn at our own price.",
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, trt_target_bundle) -> tuple[Path, object, object]:
    """A tensorrt-target bundle of the tiny model with an engine for the fake GPU: batch <= 8, two
    lanes (the server's scheduler holds one, the reference Generator takes the other)."""
    bundle = shutil.copytree(trt_target_bundle, tmp_path_factory.mktemp("serve-engine") / "b")
    trt, cuda = fake_stack()
    options = BuildOptions(limits=Limits(max_batch=8, lanes=2))
    build_engine(bundle, options=options, trt=trt, gpu=FAKE_GPU, log=lambda _: None)
    return bundle, trt, cuda


@pytest.fixture(scope="module")
def engine_gen(engine) -> Generator:
    bundle, trt, cuda = engine
    return Generator.from_bundle(str(bundle), provider="trt-engine", trt=trt, cuda=cuda)


@pytest.mark.parametrize("prefill_chunk", [0, 5])
def test_engine_server_greedy_equals_generator(engine, engine_gen, prefill_chunk):
    """12 concurrent requests of different lengths through 8 slots (4 wait), prompts whole or in
    chunks of 5 tokens between decode steps: each text equals Generator's on the engine alone."""
    bundle, trt, cuda = engine
    model = load_model(bundle, "trt-engine", name="tiny-engine", trt=trt, cuda=cuda)
    assert model.capabilities.provider == "trt-engine" and model.n_ctx == model.backend.n_ctx
    jobs = [(PROMPTS[i % len(PROMPTS)], 3 + 2 * i) for i in range(12)]
    settings = ServeSettings(provider="trt-engine", max_batch=8, max_queue=8, prefill_chunk=prefill_chunk)
    with TestClient(create_app(model, settings), base_url=LOOPBACK) as client:

        def one(job):
            body = {"prompt": job[0], "max_tokens": job[1], "temperature": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(jobs)) as ex:
            got = list(ex.map(one, jobs))
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["model"] == "tiny-engine"
    want = [engine_gen.generate(p, GenerationConfig(max_new_tokens=m))[0].text for p, m in jobs]
    assert got == want


def test_engine_server_streams_and_scores_prompts(engine, engine_gen):
    """SSE and echo + logprobs (a full-sequence pass on the engine beside the scheduler)."""
    bundle, trt, cuda = engine
    model = load_model(bundle, "trt-engine", trt=trt, cuda=cuda)
    with TestClient(
        create_app(model, ServeSettings(max_batch=4, prefill_chunk=4)), base_url=LOOPBACK
    ) as client:
        body = {"prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        r = client.post(
            "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3, "echo": True, "logprobs": 1}
        )
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["token_logprobs"][0] is None and all(x <= 0 for x in lp["token_logprobs"][1:])
    assert "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1]) == (
        engine_gen.generate(PROMPTS[2], GenerationConfig(max_new_tokens=6))[0].text
    )


def test_serve_options_take_the_engine_provider(engine):
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args([str(engine[0]), "--provider", "trt-engine", "--prefill-chunk", "64"])
    settings = settings_from_args(args, None)
    assert settings.provider == "trt-engine" and settings.prefill_chunk == 64


def test_an_engine_too_small_for_the_batch_says_so_at_startup(engine):
    """The scheduler makes its KV cache when the app starts: the engine's own refusal, not a
    scheduler thread that dies later."""
    bundle, trt, cuda = engine
    model = load_model(bundle, "trt-engine", trt=trt, cuda=cuda)
    with (
        pytest.raises(Exception, match="max-batch"),
        TestClient(create_app(model, ServeSettings(max_batch=9))),
    ):
        pass
