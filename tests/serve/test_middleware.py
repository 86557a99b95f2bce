"""serve/middleware.py around a trivial ASGI app (no model, no engine): the API key, the Host check,
JSON-only POST bodies, the body's size limit, and the counter that answers an unexpected error
with a 500 in OpenAI's shape, counted once."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient

from gpt2_edge.serve.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    JsonBodyMiddleware,
    RequestCounterMiddleware,
)


async def echo(scope, receive, send):
    """Answers 200 with the request body's length; ``/boom`` raises."""
    if scope["path"] == "/boom":
        raise RuntimeError("injected")
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(size).encode()})


def client(app, base_url: str = "http://localhost") -> TestClient:
    return TestClient(app, base_url=base_url, raise_server_exceptions=False)


def test_the_api_key_is_needed_everywhere_but_health():
    c = client(ApiKeyMiddleware(echo, "sekret"))
    missing = c.post("/v1/completions", json={})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = c.post("/v1/completions", json={}, headers={"Authorization": "Bearer nope"})
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert c.post("/v1/completions", json={}, headers={"Authorization": "bearer sekret"}).status_code == 200
    assert c.get("/health").status_code == 200


def test_a_keyless_server_answers_only_its_own_names():
    c = client(HostCheckMiddleware(echo, allowed=("box.lan", "other.lan:9000")), base_url="http://testserver")
    assert c.get("/v1/models", headers={"host": "localhost"}).status_code == 200  # port 80 = the server's
    assert c.get("/v1/models", headers={"host": "box.lan:1234"}).status_code == 200
    assert c.get("/v1/models", headers={"host": "other.lan:9000"}).status_code == 200
    for host in ("evil.test", "other.lan:9001", "localhost:8080"):
        r = c.get("/v1/models", headers={"host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    assert c.get("/health", headers={"host": "evil.test"}).status_code == 200
    assert (
        client(HostCheckMiddleware(echo, allowed=("*",))).get("/", headers={"host": "x"}).status_code == 200
    )


def test_posts_are_json_only():
    c = client(JsonBodyMiddleware(echo))
    r = c.post("/v1/completions", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    assert c.get("/v1/models").status_code == 200


def test_a_body_over_the_limit_is_413_by_its_length_or_while_it_streams():
    c = client(BodyLimitMiddleware(echo, max_bytes=100))
    assert c.post("/v1/completions", content=b"x" * 100).text == "100"
    assert c.post("/v1/completions", content=b"x" * 101).status_code == 413

    def chunked():
        for _ in range(5):
            yield b"x" * 30

    assert c.post("/v1/completions", content=chunked()).status_code == 413


def test_an_unexpected_error_is_one_500_counted_and_in_flight_follows():
    counted, flight = [], []
    app = RequestCounterMiddleware(
        echo, count=lambda route, status: counted.append((route, status)),
        routes=frozenset({"/boom", "/health"}), in_flight=flight.append,
    )  # fmt: skip
    c = client(app)
    r = c.get("/boom")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "injected" not in r.text
    c.get("/health")
    c.get("/elsewhere")
    assert counted == [("/boom", 500), ("/health", 200), ("other", 200)]
    assert flight == [1, -1, 1, -1]  # /health is not a request a drain waits for
