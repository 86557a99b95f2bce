"""One client never stalls, starves or hurts the others (issue 14, section 2).

Each test is one attack an adversarial client made on a live server: a huge prompt, prompt scoring
on a full server, a client that leaves a non-streaming request, JSON the parser chokes on, an
unexpected error the metrics missed, slow and too many sockets, cross-site and rebinding requests,
a temperature at the edge of the float range, and a port the server cannot have. Where the
behaviour lives in uvicorn and its sockets, the server is a real ``python -m gpt2_edge.serve``
subprocess; elsewhere uvicorn runs in a thread of the test process (tests/test_serve.py's Server).
"""

from __future__ import annotations

import json
import logging
import select
import signal
import socket
import subprocess
import sys
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

from gpt2_edge.runtime.loader import load_model  # noqa: E402
from gpt2_edge.serve.app import ServeSettings, create_app  # noqa: E402
from tests.helpers import REPO, wait_healthy  # noqa: E402

from .test_serve import (  # noqa: E402
    AUTH,
    KEY,
    Server,
    SlowBackend,
    free_port,
    greedy,
    metric,
    post,
    serving,
    sse_events,
)

pytestmark = pytest.mark.filterwarnings("ignore")


class ServerProcess:
    """``python -m gpt2_edge.serve BUNDLE --port P ...`` on loopback; ``stop()`` sends SIGTERM and
    returns everything it printed (its log)."""

    def __init__(self, bundle: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "gpt2_edge.serve", str(bundle), "--port", str(self.port),
               "--threads", "1", "--log-level", "warning", *options]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
        )
        self.output: str | None = None

    def stop(self) -> str:
        if self.output is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.output, _ = self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.output, _ = self.proc.communicate()
        return self.output


@contextmanager
def server_process(bundle: Path, *options: str) -> Iterator[ServerProcess]:
    p = ServerProcess(bundle, *options)
    try:
        wait_healthy(p.proc, p.url, 60, 0.1)
        yield p
    finally:
        p.stop()


def raw_connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def trickle(s: socket.socket, most: int = 60, every: float = 0.2) -> int | None:
    """Send one byte every ``every`` s, at most ``most``: how many went before the server answered
    or closed the connection (None: it never did, while bytes kept coming)."""
    for sent in range(most):
        try:
            s.sendall(b"a")
        except OSError:  # closed under us
            return sent
        readable, _, _ = select.select([s], [], [], every)
        if readable:  # an answer (408) or the close
            return sent + 1
    return None


def read_until_closed(s: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (or ``limit_s`` passes: then the
    test fails), and the seconds that took."""
    t0 = time.monotonic()
    data = b""
    s.settimeout(0.2)
    while time.monotonic() - t0 < limit_s:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    else:
        pytest.fail(f"the server kept the connection open for more than {limit_s:g} s")
    return data, time.monotonic() - t0


class RecordsWithTracebacks(logging.Handler):
    """Collects the log records that carry a traceback (exc_info), from the loggers the server uses."""

    LOGGERS = ("", "gpt2_edge", "uvicorn", "uvicorn.error", "uvicorn.asgi")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        seen = any(r is record for r in self.records)  # one record reaches several loggers' handlers
        if not seen and (record.exc_info or record.exc_text or "Traceback" in record.getMessage()):
            self.records.append(record)

    def __enter__(self) -> RecordsWithTracebacks:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


# 1. a huge prompt is refused by its length, before tokenizing, and stalls nobody ------------------
class CountingTokenizer:
    """The model's tokenizer, counting the characters it was asked to encode."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.chars = 0

    def encode(self, text):
        self.chars += len(text)
        return self._tok.encode(text)

    def encode_batch(self, texts):
        self.chars += sum(len(t) for t in texts)
        return self._tok.encode_batch(texts)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(bundle):
    model = load_model(bundle, threads=1, name="tiny")
    model.tokenizer = counting = CountingTokenizer(model.tokenizer)
    limit = model.max_prompt_chars
    with Server(create_app(model, ServeSettings())) as s:
        for prompt in ("x" * (limit + 1), ["O", "y" * (limit + 1)]):
            r = post(s, {"prompt": prompt, "max_tokens": 1})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
            assert str(limit) in err["message"] and str(limit + 1) in err["message"]
        assert counting.chars == 0  # nothing was tokenized
        # at the limit it is tokenized and judged by its tokens (the context-overflow error)
        r = post(s, {"prompt": "x" * limit, "max_tokens": 1})
        assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]
        assert counting.chars == limit


def test_health_is_answered_while_4_clients_send_1_mb_prompts(bundle):
    """A real server: 4 clients post 1 MB prompts, 3 each, while another polls /health on its own
    connection: every poll is answered, each prompt is refused (400), nothing breaks. (That the
    event loop is free meanwhile is counted, not timed, below.)"""
    big = json.dumps({"prompt": "x" * 1_000_000, "max_tokens": 1}).encode()
    with server_process(bundle) as srv:
        statuses: list[int] = []

        def client() -> None:
            with httpx.Client(timeout=60) as c:
                for _ in range(3):
                    r = c.post(
                        f"{srv.url}/v1/completions", content=big, headers={"content-type": "application/json"}
                    )
                    statuses.append(r.status_code)

        latencies: list[float] = []
        with httpx.Client(timeout=30) as h:
            assert h.get(f"{srv.url}/health").status_code == 200  # the connection is open
            clients = [threading.Thread(target=client) for _ in range(4)]
            for t in clients:
                t.start()
            while any(t.is_alive() for t in clients):
                t0 = time.perf_counter()
                r = h.get(f"{srv.url}/health")
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200
                time.sleep(0.005)
            for t in clients:
                t.join()
        assert statuses == [400] * 12
        assert len(latencies) >= 3
        print(f"/health under 4 x 1 MB prompts: {len(latencies)} polls, max {max(latencies) * 1000:.1f} ms")
        assert "Traceback" not in srv.stop()


class HealthCount:
    """/health polled on its own connection in a thread, its answers counted; ``hold(name)`` blocks
    the calling thread until 3 more answers came (at most 30 s) and records whether they did."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answered = 0
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.held: list[tuple[str, bool]] = []
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=60) as h:
            while not self.stop.is_set():
                assert h.get(f"{self.url}/health").status_code == 200
                with self.cond:
                    self.answered += 1
                    self.cond.notify_all()

    def hold(self, name: str) -> None:
        with self.cond:
            start = self.answered
            ok = self.cond.wait_for(lambda: self.answered >= start + 3, timeout=30)
        self.held.append((name, ok))


def test_the_event_loop_answers_health_while_a_request_is_parsed_and_tokenized(bundle, monkeypatch):
    """Counted, not timed (a loaded machine stretches any latency): a request's JSON parsing and
    its prompt's tokenizing are held until /health was answered 3 more times meanwhile. Off the
    event loop they are; on it, /health could not be answered while they wait, and each hold
    gives up after 30 s unanswered."""
    import gpt2_edge.serve.app as app_module

    model = load_model(bundle, threads=1, name="tiny")
    with Server(create_app(model, ServeSettings())) as s:
        health = HealthCount(s.url)
        parse_body = app_module.parse_body

        def held_parse(raw, model_type):
            health.hold("parse")
            return parse_body(raw, model_type)

        class HeldTokenizer(CountingTokenizer):
            def encode_batch(self, texts):
                health.hold("tokenize")
                return super().encode_batch(texts)

        monkeypatch.setattr(app_module, "parse_body", held_parse)
        model.tokenizer = HeldTokenizer(model.tokenizer)
        health.thread.start()
        try:
            assert post(s, {"prompt": "First Citizen", "max_tokens": 2}).status_code == 200
            assert httpx.post(f"{s.url}/tokenize", json={"prompt": "a b"}, timeout=60).status_code == 200
        finally:
            health.stop.set()
            health.thread.join(60)
    assert health.held == [("parse", True), ("tokenize", True), ("tokenize", True)], health.held


# 2. prompt scoring (echo + logprobs) is admitted through the scheduler's bound ---------------------
class CountingLogits:
    """A backend counting its full-sequence ``logits`` passes (prompt scoring)."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self.calls = 0

    def logits(self, ids):
        self.calls += 1
        return self._backend.logits(ids)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_a_full_server_refuses_prompt_scoring_before_doing_it(bundle):
    model = load_model(bundle, threads=1, name="tiny")
    model.backend = counting = CountingLogits(SlowBackend(model.backend, 0.03))
    with Server(create_app(model, ServeSettings(max_batch=1, max_queue=1))) as s:
        body = {"prompt": "O", "max_tokens": 40, "min_tokens": 40, "temperature": 0, "stream": True}
        streams = []
        try:
            for _ in range(2):  # 1 running + 1 waiting: full
                cm = httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60)
                r = cm.__enter__()
                assert r.status_code == 200
                streams.append((cm, r))
            scoring = {
                "prompt": "First Citizen: we are accounted poor",
                "max_tokens": 1,
                "echo": True,
                "logprobs": 2,
            }

            def one(_):
                r = post(s, scoring)
                return r.status_code, r.json()["error"]["code"]

            with ThreadPoolExecutor(6) as ex:
                got = list(ex.map(one, range(6)))
            assert got == [(429, "queue_full")] * 6
            # at once: refused while the server was still full (counted, not timed)
            health = httpx.get(f"{s.url}/health").json()
            assert (health["active"], health["queue_depth"]) == (1, 1)
            assert counting.calls == 0  # no prompt was scored for a request that got 429
            for _, r in streams:
                assert sse_events(r.iter_lines())[-1] == "[DONE]"
        finally:
            for cm, _ in streams:
                cm.__exit__(None, None, None)
        # with room again, scoring runs and the reservation it took is given back
        r = post(s, scoring)
        assert r.status_code == 200 and counting.calls == 1
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["token_logprobs"][0] is None and all(x <= 0 for x in lp["token_logprobs"][1:])
        health = httpx.get(f"{s.url}/health").json()
        assert health["active"] == health["queue_depth"] == 0
        assert post(s, {**scoring, "n": 2}).status_code == 200  # the whole capacity is there again


def test_a_reservation_counts_against_the_bound_until_submitted_or_released(bundle):
    """The scheduler's side of it: room reserved before the sequences exist is room taken."""
    from gpt2_edge.runtime.sampling import GenerationConfig
    from gpt2_edge.serve.engine import Engine
    from gpt2_edge.serve.sequences import QueueFullError, SequenceHandle

    model = load_model(bundle, threads=1, name="tiny")
    scheduler = Engine(model.backend, n_ctx=model.n_ctx, max_batch=1, max_queue=1)
    scheduler.start()
    try:
        held = scheduler.reserve(2)
        with pytest.raises(QueueFullError, match="2 reserved"):
            scheduler.reserve(1)
        with pytest.raises(QueueFullError):
            scheduler.check_room(1)
        scheduler.release(held)
        scheduler.release(held)  # idempotent: nothing given back twice
        scheduler.check_room(2)
        done = threading.Event()
        handles = [
            SequenceHandle(
                [1],
                GenerationConfig(max_new_tokens=2),
                lambda e: e.finish_reason and done.set(),
                eos_token_id=None,
                detokenize=model.tokenizer.decode,
            )
        ]
        held = scheduler.reserve(1)
        scheduler.submit(handles, held)
        with pytest.raises(ValueError):  # used once
            scheduler.submit(handles, held)
        assert done.wait(10)
    finally:
        scheduler.close()


# 3. a non-streaming request whose client left frees its slots within a step ------------------------
def test_a_client_leaving_a_non_streaming_request_frees_its_slots(bundle):
    with serving(bundle, delay=0.03, max_batch=8, max_queue=8) as s:
        body = json.dumps({"prompt": "O", "max_tokens": 60, "min_tokens": 60, "n": 8}).encode()  # ~1.8 s
        sock = raw_connect(s.port)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (s.port, len(body), body)
        )
        deadline = time.monotonic() + 5
        while httpx.get(f"{s.url}/health").json()["active"] != 8:  # all 8 choices decoding
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sock.close()
        closed_at = time.monotonic()
        while httpx.get(f"{s.url}/health").json()["active"] != 0:  # polled to a deadline
            assert time.monotonic() - closed_at < 30, "the slots were still decoding for a client that left"
            time.sleep(0.01)
        # counted, not timed: every choice was cancelled, well before its 60 tokens
        assert metric(s, 'gpt2_edge_sequences_finished_total{reason="cancelled"}') == 8
        assert metric(s, "gpt2_edge_generation_tokens_total") < 8 * 30


# 4. JSON a parser chokes on is a 400 naming the problem, never a traceback --------------------------
DEEP = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/completions", DEEP, "nested"),
        ("/v1/completions", b'{"prompt": "O", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
        ("/v1/completions", b'{"prompt": "Hi \\ud800 there", "max_tokens": 2}', "surrogate"),
        ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "surrogate"),
        ("/tokenize", b'{"prompt": "\\ud800"}', "surrogate"),
        ("/v1/completions", b'{"prompt": "a", "\\ud800": 1}', "unknown field"),
        ("/v1/completions", b'{"prompt": "O", "max_tokens": 1' + b"0" * 5000 + b"}", "digits"),
        ("/v1/completions", b'{"prompt": "O", "stop": ' + b"[" * 40 + b"]" * 40 + b"}", "nested"),
    ],
    ids=[
        "deep-prompt",
        "deep-stop",
        "lone-surrogate",
        "lone-surrogate-in-list",
        "tokenize-surrogate",
        "unknown-field-named-with-a-surrogate",
        "5000-digits",
        "depth-40",
    ],
)
def test_json_the_parser_chokes_on_is_a_400_without_a_traceback(bundle, path, body, words):
    with RecordsWithTracebacks() as tracebacks, serving(bundle) as s:
        r = httpx.post(
            f"{s.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=30
        )
        assert r.status_code == 400, r.text
        assert words in r.json()["error"]["message"]
        # a surrogate pair is one character, not an error
        ok = httpx.post(
            f"{s.url}/v1/completions",
            content=b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}',
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert ok.status_code == 200, ok.text
    assert not tracebacks.records, [r.getMessage() for r in tracebacks.records]


# 5. every status is counted, a 500 too ---------------------------------------------------------------
class ExplodingTokenizer(CountingTokenizer):
    """Fails on one prompt with an error the server does not expect."""

    def _check(self, texts):
        if any("boom" in t for t in texts):
            raise RuntimeError("injected")

    def encode(self, text):
        self._check([text])
        return super().encode(text)

    def encode_batch(self, texts):
        self._check(texts)
        return super().encode_batch(texts)


def test_a_500_is_counted_and_logged_once(bundle):
    model = load_model(bundle, threads=1, name="tiny")
    model.tokenizer = ExplodingTokenizer(model.tokenizer)
    with RecordsWithTracebacks() as tracebacks, Server(create_app(model, ServeSettings())) as s:
        r = post(s, {"prompt": "boom", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "injected" not in r.text and "Traceback" not in r.text
        assert post(s, {"prompt": "O", "max_tokens": 2}).status_code == 200
        assert metric(s, 'gpt2_edge_requests_total{route="/v1/completions",status="500"}') == 1
        assert metric(s, 'gpt2_edge_requests_total{route="/v1/completions",status="200"}') == 1
    assert len(tracebacks.records) == 1, [r.getMessage() for r in tracebacks.records]


# 6. slow and surplus sockets: header and body timeouts, a connection cap ----------------------------
def test_a_client_trickling_headers_is_cut_off_at_the_header_timeout(bundle):
    with server_process(bundle, "--header-timeout", "1", "--body-timeout", "1") as srv:
        sock = raw_connect(srv.port)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Slow: " % srv.port
        sock.sendall(head)
        t0 = time.monotonic()
        # one more byte every 0.2 s, up to 60 (12 s): a timer reset by each byte would never fire
        sent = trickle(sock)
        assert sent is not None, "the server waited for the trickling head as long as bytes came"
        assert time.monotonic() - t0 > 0.8  # not before its timeout (1 s)
        data, _ = read_until_closed(sock, 30)
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
        sock.close()
        # a client that sends nothing at all is cut off too (not before its timeout; polled to a deadline)
        idle = raw_connect(srv.port)
        data, took = read_until_closed(idle, 30)
        assert took > 0.8 and (data == b"" or data.startswith(b"HTTP/1.1 408"))
        idle.close()
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
    assert "Traceback" not in srv.output


def test_a_client_trickling_its_body_gets_408_at_the_body_timeout(bundle):
    with server_process(bundle, "--header-timeout", "1", "--body-timeout", "1") as srv:
        sock = raw_connect(srv.port)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"prompt": "' % srv.port
        )
        t0 = time.monotonic()
        sent = trickle(sock)  # as for the head: counted bytes, not a time window
        assert sent is not None, "the server waited for the trickling body as long as bytes came"
        assert time.monotonic() - t0 > 0.8  # not before its timeout (1 s)
        data, _ = read_until_closed(sock, 30)
        assert data.startswith(b"HTTP/1.1 408"), data
        assert b'"code":"body_timeout"' in data.replace(b" ", b"")
        sock.close()
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        assert 'gpt2_edge_requests_total{route="/v1/completions",status="408"} 1.0' in metric_text(srv.url)
    assert "Traceback" not in srv.output


def metric_text(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def test_connections_over_the_cap_are_refused_and_the_others_still_served(bundle):
    with server_process(bundle, "--max-connections", "3") as srv:
        idle = [raw_connect(srv.port) for _ in range(2)]
        with httpx.Client(timeout=10) as c:  # the third connection
            assert c.get(f"{srv.url}/health").status_code == 200
            time.sleep(0.2)
            over = raw_connect(srv.port)
            data, took = read_until_closed(over, 3)
            assert took < 1.0 and data.startswith(b"HTTP/1.1 503"), data
            over.close()
            # those within the cap are served, before and after
            assert c.get(f"{srv.url}/health").status_code == 200
            r = c.post(f"{srv.url}/v1/completions", json={"prompt": "O", "max_tokens": 2})
            assert r.status_code == 200
            idle[0].sendall(
                b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % srv.port
            )
            data, _ = read_until_closed(idle[0], 5)
            assert data.startswith(b"HTTP/1.1 200"), data
        for s in idle:
            s.close()
        time.sleep(0.2)
        # closed connections give their places back
        with httpx.Client(timeout=10) as a, httpx.Client(timeout=10) as b:
            assert a.get(f"{srv.url}/health").status_code == b.get(f"{srv.url}/health").status_code == 200


def test_the_new_limits_are_options_with_sane_defaults(bundle, capsys):
    from gpt2_edge.serve.cli import main

    d = ServeSettings()
    assert (d.header_timeout_s, d.body_timeout_s, d.max_connections) == (10.0, 30.0, 256)
    assert d.allowed_hosts == ()
    assert main([str(bundle), "--header-timeout", "0"]) == 2
    assert "--header-timeout must be > 0" in capsys.readouterr().err
    assert main([str(bundle), "--body-timeout", "-1"]) == 2
    assert "--body-timeout must be > 0" in capsys.readouterr().err
    assert main([str(bundle), "--max-connections", "0"]) == 2
    assert "--max-connections must be >= 1" in capsys.readouterr().err
    assert main([str(bundle), "--allowed-host", ""]) == 2
    assert "--allowed-host" in capsys.readouterr().err


# 7. a keyless server refuses cross-site form posts and foreign Host names --------------------------
def test_a_post_that_is_not_json_gets_415(bundle):
    with serving(bundle) as s:
        for ctype in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            None,
        ):
            headers = {} if ctype is None else {"content-type": ctype}
            r = httpx.post(
                f"{s.url}/v1/completions",
                content=b'{"prompt": "O", "max_tokens": 2}',
                headers=headers,
                timeout=30,
            )
            assert r.status_code == 415, (ctype, r.text)
            assert "application/json" in r.json()["error"]["message"]
        r = httpx.post(
            f"{s.url}/v1/completions",
            content=b'{"prompt": "O", "max_tokens": 2}',
            headers={"content-type": "Application/JSON; charset=utf-8"},
            timeout=30,
        )
        assert r.status_code == 200


def test_a_keyless_server_answers_only_for_its_own_names(bundle):
    with serving(bundle) as s:
        port = s.port

        def get(host: str, path: str = "/v1/models", **kw) -> httpx.Response:
            return httpx.get(f"{s.url}{path}", headers={"Host": host, **kw}, timeout=30)

        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
            assert get(host).status_code == 200, host
        for host in (
            f"evil.example:{port}",
            "evil.example",
            f"127.0.0.1:{port + 1}",
            "127.0.0.1",
            f"localhost.evil:{port}",
        ):
            r = get(host)
            assert r.status_code == 400, host
            assert (
                r.json()["error"]["code"] == "invalid_host"
                and "--allowed-host" in r.json()["error"]["message"]
            )
        r = httpx.post(
            f"{s.url}/v1/completions", json={"prompt": "O"}, headers={"Host": f"evil.example:{port}"}
        )
        assert r.status_code == 400
        assert get(f"evil.example:{port}", "/health").status_code == 200  # /health is open, as with a key
    with serving(bundle, allowed_hosts=("model.internal", "other.internal:8080")) as s:
        assert (
            httpx.get(f"{s.url}/v1/models", headers={"Host": f"model.internal:{s.port}"}).status_code == 200
        )
        assert httpx.get(f"{s.url}/v1/models", headers={"Host": "other.internal:8080"}).status_code == 200
        assert httpx.get(f"{s.url}/v1/models", headers={"Host": "other.internal:9"}).status_code == 400
        assert httpx.get(f"{s.url}/v1/models").status_code == 200  # loopback names stay allowed
        assert httpx.get(f"{s.url}/v1/models", headers={"Host": f"evil.example:{s.port}"}).status_code == 400
    with serving(bundle, allowed_hosts=("*",)) as s:
        assert httpx.get(f"{s.url}/v1/models", headers={"Host": "anything.example"}).status_code == 200
    with serving(bundle, api_key=KEY) as s:  # a key protects it: any name
        assert (
            httpx.get(f"{s.url}/v1/models", headers={"Host": "anything.example", **AUTH}).status_code == 200
        )


# 8. the smallest positive temperature is the greedy limit ----------------------------------------------
def test_a_denormal_temperature_gives_the_greedy_text(bundle, gen):
    with serving(bundle) as s:
        for prompt in ("O", "First Citizen:"):
            r = post(s, {"prompt": prompt, "max_tokens": 12, "temperature": 5e-324, "seed": 1})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == greedy(gen, prompt, 12)


# 10. the port: checked, and bound before the model loads --------------------------------------------
def test_a_port_out_of_range_is_refused(bundle, capsys):
    from gpt2_edge.serve.cli import main

    for port, problem in (
        ("70000", "must be <= 65535, got 70000"),
        ("0", "must be >= 1"),
        ("-1", "must be >= 1"),
    ):
        assert main([str(bundle), "--port", port]) == 2
        assert f"--port {problem}" in capsys.readouterr().err


def test_a_port_in_use_is_one_line_and_exit_2_before_the_model_loads(bundle, monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "gpt2_edge.serve", str(bundle), "--port", str(port), "--threads", "1"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert proc.returncode == 2, proc
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(
            f"gpt2-edge serve: error: cannot listen on 127.0.0.1:{port}: address already in use"
        )
        # in this process: the model is never loaded
        from gpt2_edge.serve import cli

        loads = []
        monkeypatch.setattr(
            cli, "load_served_model", lambda *a, **kw: loads.append(a)
        )
        assert cli.main([str(bundle), "--port", str(port)]) == 2
        assert "cannot listen" in capsys.readouterr().err and loads == []
