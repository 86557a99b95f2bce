"""serve/tokens.py: ``/tokenize`` counts any text within the body limit (not only text that fits
the context: lm-evaluation-harness counts whole documents before it windows them), off the event
loop, and refuses what is not text."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from gpt2_edge.runtime.loader import Model, load_model
from gpt2_edge.serve.app import ServeSettings, create_app

JSON = {"Content-Type": "application/json"}
BODY_LIMIT = 64_000


@pytest.fixture(scope="module")
def model(inplace_bundle) -> Model:
    return load_model(inplace_bundle, threads=1, name="tiny")


@pytest.fixture(scope="module")
def client(model) -> Iterator[TestClient]:
    settings = ServeSettings(max_batch=1, max_queue=1, max_body_bytes=BODY_LIMIT)
    with TestClient(create_app(model, settings), base_url="http://localhost") as c:
        yield c


def test_tokenize_counts_a_text_longer_than_the_context_off_the_event_loop(client, model, monkeypatch):
    encode_batch = model.tokenizer.encode_batch
    on_a_loop = []

    def spy(texts):
        try:
            asyncio.get_running_loop()
            on_a_loop.append(True)
        except RuntimeError:  # no event loop runs in this thread
            on_a_loop.append(False)
        return encode_batch(texts)

    monkeypatch.setattr(model.tokenizer, "encode_batch", spy)
    text = "First Citizen: we are accounted poor citizens. " * (2 * model.max_prompt_chars // 47)
    assert len(text) > model.max_prompt_chars  # longer than any prompt the context holds
    for field in ("prompt", "content"):  # vLLM's name and llama-server's
        r = client.post("/tokenize", json={field: text}, headers=JSON)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == encode_batch([text])[0]
        assert body["count"] == len(body["tokens"]) > model.n_ctx
        assert body["max_model_len"] == model.n_ctx
    assert on_a_loop == [False, False]


def test_tokenize_is_bounded_by_the_body_limit(client, model, monkeypatch):
    calls = []
    encode_batch = model.tokenizer.encode_batch
    monkeypatch.setattr(
        model.tokenizer, "encode_batch", lambda texts: calls.append(texts) or encode_batch(texts)
    )
    r = client.post("/tokenize", json={"prompt": "x" * BODY_LIMIT}, headers=JSON)
    assert r.status_code == 413, r.text
    assert calls == []  # refused before any tokenizing
    assert client.post("/tokenize", json={"prompt": "x" * (BODY_LIMIT // 2)}, headers=JSON).status_code == 200


def test_a_prompt_is_still_refused_by_its_length_before_tokenizing(client, model, monkeypatch):
    """What must fit the context is a prompt to generate from, not a text to count."""
    calls = []
    encode_batch = model.tokenizer.encode_batch
    monkeypatch.setattr(
        model.tokenizer, "encode_batch", lambda texts: calls.append(texts) or encode_batch(texts)
    )
    r = client.post(
        "/v1/completions", json={"prompt": "x" * (model.max_prompt_chars + 1), "max_tokens": 1}, headers=JSON
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []


def test_tokenize_refuses_a_lone_surrogate(client):
    r = client.post("/tokenize", content=b'{"prompt": "a \\ud800 b"}', headers=JSON)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
