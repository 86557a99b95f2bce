"""The HTTP server: a real uvicorn on a loopback port per test module, the openai client and raw
HTTP, continuous batching (greedy == Generator whatever else is in the batch), back-pressure,
faults, auth, and SIGTERM drain in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from gpt2_edge.runtime.generator import Generator  # noqa: E402
from gpt2_edge.runtime.loader import load_model  # noqa: E402
from gpt2_edge.runtime.sampling import GenerationConfig  # noqa: E402
from gpt2_edge.serve.app import ServeSettings, create_app  # noqa: E402
from tests.helpers import REPO, wait_healthy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

PROMPTS = [
    "First Citizen:",
    "All:\nSpeak",
    "We are accounted poor citizens, the patricians good.",
    "O",
    "Second Citizen:\nOne word, good citizens.",
    "Let us kill him",
]
KEY = "test-key-0123456789"


# servers started and stopped by the tests (the bundle and gen fixtures: conftest.py) --------------
class SlowCache:
    """A KV cache that sleeps before every step: long requests without a big model."""

    def __init__(self, cache, delay: float) -> None:
        self._cache, self._delay = cache, delay

    def prefill(self, slots, prompts):
        time.sleep(self._delay)
        return self._cache.prefill(slots, prompts)

    def decode(self, slots, tokens):
        time.sleep(self._delay)
        return self._cache.decode(slots, tokens)

    def __getattr__(self, name):
        return getattr(self._cache, name)


class SlowBackend:
    def __init__(self, backend, delay: float) -> None:
        self._backend, self._delay = backend, delay

    def new_cache(self, n_slots, capacity):
        return SlowCache(self._backend.new_cache(n_slots, capacity), self._delay)

    def __getattr__(self, name):
        return getattr(self._backend, name)


class Server:
    """uvicorn on 127.0.0.1 with a port the OS picked, in a thread of the test process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@contextmanager
def serving(bundle: Path, delay: float = 0.0, **settings) -> Iterator[Server]:
    model = load_model(bundle, threads=1, name="tiny")
    if delay:
        model.backend = SlowBackend(model.backend, delay)
    with Server(create_app(model, ServeSettings(**settings))) as server:
        yield server


@pytest.fixture(scope="module")
def server(bundle) -> Iterator[Server]:
    with serving(bundle, max_batch=8, max_queue=32) as s:
        yield s


def post(server: Server, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60, **kw)


def sse_events(lines: Iterator[str]) -> list:
    """The JSON bodies of an SSE stream, and the string "[DONE]" where it came."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream(server: Server, body: dict) -> list:
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def joined(events: list, index: int = 0) -> tuple[str, str | None]:
    assert events[-1] == "[DONE]"
    text, finish = "", None
    for e in events[:-1]:
        for c in e["choices"]:
            if c["index"] == index:
                text += c["text"]
                finish = c["finish_reason"] or finish
    return text, finish


def greedy(gen: Generator, prompt, max_tokens: int, **kw) -> str:
    return gen.generate(prompt, GenerationConfig(max_new_tokens=max_tokens, **kw))[0].text


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


# completions through the openai client and raw HTTP ----------------------------------------------
def test_openai_client_plain_and_stream(server, gen):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert plain.object == "text_completion" and plain.model == "tiny"
    assert plain.choices[0].text == greedy(gen, PROMPTS[0], 12)
    assert plain.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(gen.tokenizer.encode(PROMPTS[0]))
    assert (
        plain.usage.prompt_tokens == n_prompt
        and plain.usage.total_tokens == n_prompt + plain.usage.completion_tokens
    )
    pieces = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True
    )
    chunks = list(pieces)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    # the client's own error type for a server-side refusal
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)


def test_raw_http_stream_joins_to_plain(server):
    body = {"prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0.8, "top_k": 20, "seed": 7, "n": 2}
    plain = post(server, body).json()
    events = stream(server, {**body, "stream_options": {"include_usage": True}})
    for i in range(2):
        assert joined(events, i) == (plain["choices"][i]["text"], plain["choices"][i]["finish_reason"])
    assert events[-2]["choices"] == [] and events[-2]["usage"] == plain["usage"]
    assert all(e["usage"] is None for e in events[:-2])
    assert plain["choices"][0]["text"] != plain["choices"][1]["text"]  # choice i has seed + i


def test_seeded_sampling_matches_generator(server, gen):
    cfg = dict(do_sample=True, temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.2, seed=3)
    want = gen.generate(PROMPTS[2], GenerationConfig(max_new_tokens=16, **cfg))[0].text
    body = {
        "prompt": PROMPTS[2],
        "max_tokens": 16,
        "temperature": 0.9,
        "top_k": 30,
        "top_p": 0.95,
        "repetition_penalty": 1.2,
        "seed": 3,
    }
    assert post(server, body).json()["choices"][0]["text"] == want


def test_stop_strings_and_token_prompts(server, gen):
    ids = gen.tokenizer.encode(PROMPTS[0])
    text = greedy(gen, ids, 24)
    stop = text[5:7]
    assert stop and stop in text
    want = greedy(gen, ids, 24, stop=(stop,))
    r = post(server, {"prompt": ids, "max_tokens": 24, "temperature": 0, "stop": stop}).json()
    assert r["choices"][0] == {"text": want, "index": 0, "logprobs": None, "finish_reason": "stop"}
    assert joined(stream(server, {"prompt": ids, "max_tokens": 24, "temperature": 0, "stop": [stop]})) == (
        want,
        "stop",
    )
    # a batch of prompts: token-id lists and strings, one choice each, in order
    r = post(server, {"prompt": [ids, ids[:2]], "max_tokens": 5, "temperature": 0}).json()
    assert [c["text"] for c in r["choices"]] == [greedy(gen, ids, 5), greedy(gen, ids[:2], 5)]
    r = post(server, {"prompt": PROMPTS[:2], "max_tokens": 5, "temperature": 0, "echo": True}).json()
    assert [c["text"] for c in r["choices"]] == [p + greedy(gen, p, 5) for p in PROMPTS[:2]]


def test_logprobs_and_echo(server, gen):
    r = post(server, {"prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0, "logprobs": 3}).json()
    c = r["choices"][0]
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert len(top) <= 3 and chosen <= 0
        assert max(top.values()) == pytest.approx(chosen)  # greedy picks the most likely token
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    e = post(
        server, {"prompt": PROMPTS[3] + " is", "max_tokens": 3, "temperature": 0, "logprobs": 1, "echo": True}
    )
    elp = e.json()["choices"][0]["logprobs"]
    n_prompt = len(gen.tokenizer.encode(PROMPTS[3] + " is"))
    assert len(elp["tokens"]) == n_prompt + 3
    assert elp["token_logprobs"][0] is None and elp["top_logprobs"][0] is None
    assert all(x <= 0 for x in elp["token_logprobs"][1:])
    assert e.json()["choices"][0]["text"].startswith(PROMPTS[3] + " is")
    # streamed logprobs cover the same tokens
    events = stream(server, {"prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0, "logprobs": 3})
    tokens = [t for ev in events[:-1] for t in ev["choices"][0]["logprobs"]["tokens"]]
    assert tokens == lp["tokens"]


def test_models_health_tokenize_metrics(server, gen):
    h = httpx.get(f"{server.url}/health").json()
    assert h["status"] == "ok" and h["model_loaded"] and h["queue_depth"] == 0 and h["max_batch"] == 8
    t = httpx.post(f"{server.url}/tokenize", json={"content": PROMPTS[2]}).json()
    assert t["tokens"] == gen.tokenizer.encode(PROMPTS[2]) and t["count"] == len(t["tokens"])
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": t["tokens"]}).json() == {
        "prompt": PROMPTS[2],  # vLLM's name
        "content": PROMPTS[2],  # llama-server's
    }
    before = metric(server, "gpt2_edge_generation_tokens_total")
    post(server, {"prompt": "O", "max_tokens": 4, "temperature": 0})
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "gpt2_edge_requests_total",
        "gpt2_edge_prompt_tokens_total",
        "gpt2_edge_queue_depth",
        "gpt2_edge_batch_occupancy_bucket",
        "gpt2_edge_time_to_first_token_seconds_bucket",
        "gpt2_edge_inter_token_latency_seconds_bucket",
    ):
        assert name in text
    assert 'gpt2_edge_requests_total{route="/v1/completions",status="200"}' in text
    assert metric(server, "gpt2_edge_generation_tokens_total") >= before + 1


def test_sequence_state_pieces_join_to_its_text(tiny_tokenizer):
    """runtime/sequence.py, the scheduler's per-sequence step: eos ends it and never shows, a stop
    string is cut and never shows, a multi-byte character is never split, the length ends it."""
    from gpt2_edge.runtime.sequence import SequenceState

    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id

    def run(ids, **cfg):
        state = SequenceState(
            [1], GenerationConfig(max_new_tokens=cfg.pop("max_new_tokens", 60), **cfg), eos, tok.decode
        )
        pieces = []
        for t in ids:
            pieces.append(state.append(t))
            if state.finished:
                break
        return state, pieces

    ids = tok.encode("All:\nSpeak, speak. Café au lait")
    state, pieces = run([*ids, eos])
    assert state.finish_reason == "eos" and "".join(pieces) == state.text == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces).endswith("Café au lait")
    state, pieces = run(ids, stop=("speak",))
    assert state.finish_reason == "stop" and "".join(pieces) == state.text == "All:\nSpeak, "
    assert not any("spea" in p for p in pieces)
    state, pieces = run(ids, max_new_tokens=3)
    assert state.finish_reason == "length" and "".join(pieces) == state.text == tok.decode(ids[:3])


# continuous batching --------------------------------------------------------------------------
def test_greedy_equals_generator_whatever_the_batch(bundle, gen):
    """Requests of different lengths, started at different times, all in one running batch."""
    jobs = [(p, 8 + 5 * i) for i, p in enumerate(PROMPTS)] * 2

    with serving(bundle, delay=0.005, max_batch=8) as s:

        def one(job):
            prompt, m = job
            time.sleep(0.01 * (m % 7))  # arrivals spread over the run: sequences join a running batch
            return post(s, {"prompt": prompt, "max_tokens": m, "temperature": 0}).json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(jobs)) as ex:
            got = list(ex.map(one, jobs))
        steps = metric(s, "gpt2_edge_batch_occupancy_count")
        rows = metric(s, "gpt2_edge_batch_occupancy_sum")
    assert got == [greedy(gen, p, m) for p, m in jobs]
    assert rows / steps > 1.5  # decode steps really ran several sequences together


@pytest.mark.parametrize("prefill_chunk", [0, 3])
def test_concatenating_cache_joins_and_leaves_the_batch(concat_bundle, gen, prefill_chunk):
    """The tensorrt target's KV form (a left-padded batch re-padded on join/leave) under the scheduler,
    prompts whole or in chunks of 3 tokens between decode steps."""
    concat = concat_bundle
    jobs = [(p, 6 + 4 * i) for i, p in enumerate(PROMPTS)]
    with serving(concat, delay=0.005, max_batch=4, prefill_chunk=prefill_chunk) as s:

        def one(job):
            time.sleep(0.01 * (job[1] % 5))
            body = {"prompt": job[0], "max_tokens": job[1], "temperature": 0}
            return post(s, body).json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(jobs)) as ex:
            got = list(ex.map(one, jobs))
    assert got == [greedy(gen, p, m) for p, m in jobs]


def test_16_concurrent_streaming_clients(server, gen):
    jobs = [(PROMPTS[i % len(PROMPTS)], 10 + i) for i in range(16)]

    def one(job):
        return joined(stream(server, {"prompt": job[0], "max_tokens": job[1], "temperature": 0}))

    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(one, jobs))
    for (prompt, m), (text, finish) in zip(jobs, got, strict=True):
        want = gen.generate(prompt, GenerationConfig(max_new_tokens=m))[0]
        assert text == want.text
        assert finish == ("length" if want.finish_reason == "length" else "stop")


def test_queue_full_gets_429_at_once_and_the_server_keeps_serving(bundle):
    with serving(bundle, delay=0.02, max_batch=2, max_queue=2) as s:
        streams = []
        try:
            for _ in range(4):  # 2 running + 2 waiting fill it
                cm = httpx.stream(
                    "POST",
                    f"{s.url}/v1/completions",
                    timeout=60,
                    json={"prompt": "O", "max_tokens": 40, "temperature": 0, "stream": True},
                )
                r = cm.__enter__()
                assert r.status_code == 200
                streams.append((cm, r))
            health = httpx.get(f"{s.url}/health").json()
            assert health["queue_depth"] + health["active"] == 4
            for _ in range(3):
                r = post(s, {"prompt": "O", "max_tokens": 4})
                assert r.status_code == 429
                assert r.headers["retry-after"].isdigit()
                assert r.json()["error"]["code"] == "queue_full"
            # at once: refused while the server was still full, not after waiting for room (counted,
            # not timed: the 4 sequences are all still in, none of the 40-token streams has ended)
            health = httpx.get(f"{s.url}/health").json()
            assert health["queue_depth"] + health["active"] == 4
            assert metric(s, "gpt2_edge_sequences_finished_total") == 0
            for _, r in streams:
                assert sse_events(r.iter_lines())[-1] == "[DONE]"  # the admitted ones complete
        finally:
            for cm, _ in streams:
                cm.__exit__(None, None, None)
        assert post(s, {"prompt": "O", "max_tokens": 4}).status_code == 200
        assert metric(s, "gpt2_edge_requests_total") >= 8


def test_disconnect_frees_the_slot_for_a_queued_request(bundle):
    with serving(bundle, delay=0.03, max_batch=1, max_queue=4) as s:
        body = {"prompt": "O", "max_tokens": 50, "temperature": 0, "stream": True}  # ~1.5 s alone
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as a:
            lines = a.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            first_b: list[float] = []

            def run_b():
                with httpx.stream(
                    "POST", f"{s.url}/v1/completions", json={**body, "max_tokens": 3}, timeout=60
                ) as b:
                    for line in b.iter_lines():
                        if line.startswith("data: ") and not first_b:
                            first_b.append(time.monotonic())

            tb = threading.Thread(target=run_b)
            tb.start()
            deadline = time.monotonic() + 5
            while httpx.get(f"{s.url}/health").json()["queue_depth"] != 1:  # B waits behind A
                assert time.monotonic() < deadline
                time.sleep(0.01)
        # leaving the block closed A's connection mid-stream
        tb.join(30)
        assert first_b  # B ran: A's slot came free
        assert metric(s, 'gpt2_edge_sequences_finished_total{reason="cancelled"}') == 1
        # counted, not timed: A's slot was freed mid-stream, not after its 50 tokens
        assert metric(s, "gpt2_edge_generation_tokens_total") < 50 + 3


def test_timeout_frees_the_slot(bundle):
    # ignore_eos: a sampled (default temperature) continuation that reached eos early would finish in time
    with serving(bundle, delay=0.03, max_batch=1, timeout_s=0.3) as s:
        r = post(s, {"prompt": "O", "max_tokens": 40, "ignore_eos": True})
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        events = stream(s, {"prompt": "O", "max_tokens": 40, "ignore_eos": True})
        assert events[-1]["error"]["code"] == "timeout"
        r = post(s, {"prompt": "O", "max_tokens": 2})
        assert r.status_code == 200


class FailingOnce:
    """A backend whose caches fail their first decode (a broken step must not take the server down)."""

    def __init__(self, backend) -> None:
        self._backend, self.failed = backend, False

    def new_cache(self, n_slots, capacity):
        cache, outer = self._backend.new_cache(n_slots, capacity), self

        class Cache:
            def decode(self, slots, tokens):
                if not outer.failed:
                    outer.failed = True
                    raise RuntimeError("injected")
                return cache.decode(slots, tokens)

            def __getattr__(self, name):
                return getattr(cache, name)

        return Cache()

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(bundle, gen):
    model = load_model(bundle, threads=1, name="tiny")
    model.backend = FailingOnce(model.backend)
    with Server(create_app(model, ServeSettings())) as s:
        r = post(s, {"prompt": "O", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        assert "injected" not in r.text and "Traceback" not in r.text
        r = post(s, {"prompt": "O", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(gen, "O", 5)
        assert metric(s, 'gpt2_edge_sequences_finished_total{reason="error"}') == 1


# bad requests ---------------------------------------------------------------------------------------
GOOD = {"prompt": "O", "max_tokens": 2}
AUTH = {"Authorization": f"Bearer {KEY}"}
BAD = [
    # (id, method, path, body (dict = JSON, bytes = raw), headers, status, param)
    ("wrong-type", "POST", "/v1/completions", {"prompt": "O", "max_tokens": "5"}, AUTH, 400, "max_tokens"),
    (
        "negative-max-tokens",
        "POST",
        "/v1/completions",
        {"prompt": "O", "max_tokens": -1},
        AUTH,
        400,
        "max_tokens",
    ),
    ("zero-max-tokens", "POST", "/v1/completions", {"prompt": "O", "max_tokens": 0}, AUTH, 400, "max_tokens"),
    (
        "huge-max-tokens",
        "POST",
        "/v1/completions",
        {"prompt": "O", "max_tokens": 10**6},
        AUTH,
        400,
        "max_tokens",
    ),
    (
        "negative-temperature",
        "POST",
        "/v1/completions",
        {"prompt": "O", "temperature": -0.5},
        AUTH,
        400,
        "temperature",
    ),
    (
        "nan-temperature",
        "POST",
        "/v1/completions",
        b'{"prompt": "O", "temperature": NaN}',
        AUTH,
        400,
        "temperature",
    ),
    ("top-p-zero", "POST", "/v1/completions", {"prompt": "O", "top_p": 0}, AUTH, 400, "top_p"),
    ("top-p-over-one", "POST", "/v1/completions", {"prompt": "O", "top_p": 1.5}, AUTH, 400, "top_p"),
    ("n-zero", "POST", "/v1/completions", {"prompt": "O", "n": 0}, AUTH, 400, "n"),
    (
        "huge-prompt",
        "POST",
        "/v1/completions",
        {"prompt": [1] * 5000, "max_tokens": 2},
        AUTH,
        400,
        "max_tokens",
    ),
    ("invalid-utf8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', AUTH, 400, None),
    ("malformed-json", "POST", "/v1/completions", b'{"prompt": "O",', AUTH, 400, None),
    ("not-an-object", "POST", "/v1/completions", [1, 2], AUTH, 400, None),
    ("missing-prompt", "POST", "/v1/completions", {"max_tokens": 2}, AUTH, 400, "prompt"),
    ("empty-prompt", "POST", "/v1/completions", {"prompt": ""}, AUTH, 400, "prompt"),
    ("prompt-wrong-type", "POST", "/v1/completions", {"prompt": 5}, AUTH, 400, "prompt"),
    ("token-out-of-vocab", "POST", "/v1/completions", {"prompt": [10**6]}, AUTH, 400, "prompt"),
    ("unknown-field", "POST", "/v1/completions", {"prompt": "O", "frobnicate": 1}, AUTH, 400, "frobnicate"),
    ("too-many-stops", "POST", "/v1/completions", {"prompt": "O", "stop": list("abcde")}, AUTH, 400, "stop"),
    ("logprobs-too-many", "POST", "/v1/completions", {"prompt": "O", "logprobs": 9}, AUTH, 400, "logprobs"),
    (
        "min-over-max",
        "POST",
        "/v1/completions",
        {"prompt": "O", "max_tokens": 2, "min_tokens": 3},
        AUTH,
        400,
        "min_tokens",
    ),
    (
        "unsupported-penalty",
        "POST",
        "/v1/completions",
        {"prompt": "O", "presence_penalty": 1},
        AUTH,
        400,
        "presence_penalty",
    ),
    ("stream-not-bool", "POST", "/v1/completions", {"prompt": "O", "stream": "yes"}, AUTH, 400, "stream"),
    ("unknown-model", "POST", "/v1/completions", {"prompt": "O", "model": "gpt-4"}, AUTH, 404, "model"),
    ("oversize-body", "POST", "/v1/completions", {"prompt": "x" * 70_000}, AUTH, 413, None),
    ("no-key", "POST", "/v1/completions", GOOD, {}, 401, None),
    ("wrong-key", "POST", "/v1/completions", GOOD, {"Authorization": "Bearer nope"}, 401, None),
    ("wrong-scheme", "POST", "/v1/completions", GOOD, {"Authorization": f"Basic {KEY}"}, 401, None),
    ("no-key-metrics", "GET", "/metrics", None, {}, 401, None),
    ("wrong-method", "GET", "/v1/completions", None, AUTH, 405, None),
    ("unknown-route", "GET", "/v1/nothing", None, AUTH, 404, None),
    ("bad-detokenize", "POST", "/detokenize", {"tokens": [-1]}, AUTH, 400, "tokens"),
    ("tokenize-missing", "POST", "/tokenize", {}, AUTH, 400, "prompt"),
]


@pytest.fixture(scope="module")
def guarded(bundle) -> Iterator[Server]:
    with serving(bundle, api_key=KEY, max_body_bytes=64_000) as s:
        yield s


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "param"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_request_gets_its_4xx_and_the_next_good_one_succeeds(
    guarded, method, path, body, headers, status, param
):
    kw: dict = {"headers": dict(headers), "timeout": 30}
    if isinstance(body, bytes):
        kw["content"] = body
        kw["headers"]["content-type"] = "application/json"
    elif body is not None:
        kw["json"] = body
    r = httpx.request(method, f"{guarded.url}{path}", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if param is not None:
        assert err["param"] == param and param.split(".")[0] in err["message"]
    if err["code"] == "context_length_exceeded":  # names both numbers
        n_prompt = len(body["prompt"]) if isinstance(body["prompt"], list) else 1
        assert (
            f"has {n_prompt} tokens" in err["message"]
            and f"max_tokens is {body['max_tokens']}" in err["message"]
        )
    ok = httpx.post(f"{guarded.url}/v1/completions", json=GOOD, headers=AUTH, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_auth_leaves_health_open_and_takes_the_right_key(guarded):
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert httpx.get(f"{guarded.url}/v1/models").status_code == 401
    assert httpx.get(f"{guarded.url}/v1/models", headers=AUTH).status_code == 200
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="tiny", prompt="O", max_tokens=2).choices[0].finish_reason


def test_cors_is_off_unless_asked(server, bundle):
    origin = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{server.url}/v1/completions", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    with serving(bundle, cors_origins=("http://example.test",)) as s:
        r = httpx.options(f"{s.url}/v1/completions", headers=origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.test"


# the command line: SIGTERM drain, torch-free, options --------------------------------------------------
DRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from gpt2_edge.serve import cli

    real = cli.load_served_model

    class SlowCache:
        def __init__(self, cache): self._cache = cache
        def decode(self, slots, tokens):
            time.sleep(0.03)
            return self._cache.decode(slots, tokens)
        def __getattr__(self, name): return getattr(self._cache, name)

    def slow(*a, **kw):
        model = real(*a, **kw)
        make = model.backend.new_cache
        model.backend.new_cache = lambda n, c: SlowCache(make(n, c))
        return model

    cli.load_served_model = slow
    code = cli.main(sys.argv[1:])
    heavy = [m for m in ("torch", "transformers", "optimum") if m in sys.modules]
    print("HEAVY", heavy, flush=True)
    sys.exit(code if not heavy else 3)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("drain_s", "max_tokens", "completes"), [(20, 40, True), (0.3, 60, False)])
def test_sigterm_drains_in_flight_requests_and_exits_0(bundle, tmp_path, drain_s, max_tokens, completes):
    """Through the real CLI path (signal handlers included), in a torch-free process: a stream in
    flight finishes (~1.2 s of decoding), or is cut at --drain-timeout (~1.8 s needed, 0.3 s given)."""
    port = free_port()
    script = tmp_path / "serve_slow.py"
    script.write_text(DRAIN_SCRIPT)
    args = [str(bundle), "--port", str(port), "--threads", "1", "--drain-timeout", str(drain_s)]
    proc = subprocess.Popen(
        [sys.executable, str(script), *args, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, 60, 0.1)
        body = {
            "prompt": "O",
            "max_tokens": max_tokens,
            "min_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        events: list = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            try:
                for line in lines:
                    if line.startswith("data: "):
                        events.append(line)
            except httpx.HTTPError:  # the connection was closed under the stream
                pass
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "HEAVY []" in out
        if completes:
            assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]
        else:
            # cut at the drain timeout, not after the stream's end: fewer events than its tokens
            assert "data: [DONE]" not in events and len(events) < max_tokens
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc (Linux)")
def test_main_cli_serves_without_torch_and_hides_the_key(bundle):
    """`gpt2-edge serve` builds the main parser (which imports torch), then starts over in the
    torch-free entry with the same pid; the key moves from argv to the environment."""
    port = free_port()
    cmd = [sys.executable, "-m", "gpt2_edge", "serve", str(bundle), "--port", str(port), "--threads", "1",
           "--api-key", KEY, "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, 90, 0.2)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"gpt2_edge.serve" in cmdline and KEY.encode() not in cmdline
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps and "onnxruntime" in maps
        assert post_to(url, GOOD).status_code == 401
        assert post_to(url, GOOD, headers=AUTH).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def post_to(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


def test_cli_refuses_bad_options(bundle, tmp_path, capsys):
    from gpt2_edge.serve.cli import main

    assert main([str(bundle), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    assert main([str(bundle), "--prefill-chunk", "-1"]) == 2
    assert "--prefill-chunk must be >= 0" in capsys.readouterr().err
    assert main([str(bundle), "--timeout", "0"]) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not one of the providers
        main([str(bundle), "--provider", "tpu"])
    assert "trt-engine" in capsys.readouterr().err
    assert main([str(bundle), "--replicas", "2"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "not a bundle" in capsys.readouterr().err


def test_default_bundle_comes_from_the_cache(bundle, tmp_path, monkeypatch):
    import shutil

    from gpt2_edge.serve.cli import default_bundle_dir, resolve_bundle

    monkeypatch.setenv("GPT2_EDGE_CACHE", str(tmp_path))
    assert default_bundle_dir() == tmp_path / "default-bundle"
    shutil.copytree(bundle, tmp_path / "default-bundle")
    assert resolve_bundle(None, log=lambda _: None) == tmp_path / "default-bundle"


def test_main_cli_registers_serve():
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2_edge", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--max-batch", "--max-queue", "--api-key", "--timeout", "--ray", "--replicas", "127.0.0.1"):
        assert flag in proc.stdout
