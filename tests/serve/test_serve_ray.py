"""Scale-out: the app as a Ray Serve deployment with 2 replicas on a local Ray (loopback only)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
ray = pytest.importorskip("ray", reason="Ray Serve tests need the ray extra: pip install 'gpt2-edge[ray]'")
pytest.importorskip("ray.serve", reason="Ray Serve tests need the ray extra: pip install 'gpt2-edge[ray]'")
httpx = pytest.importorskip("httpx")

from gpt2_edge.runtime.generator import Generator  # noqa: E402
from gpt2_edge.runtime.sampling import GenerationConfig  # noqa: E402
from tests.helpers import REPO, wait_healthy  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]

PROMPTS = ["First Citizen:", "All:\nSpeak", "We are accounted poor citizens, the patricians good.", "O"]
DRAIN_TIMEOUT_S = 20  # the server's --drain-timeout
SHUTDOWN_MARGIN_S = 25  # deleting the app and stopping a local Ray, on a loaded 2-core machine


@pytest.fixture(scope="module")
def server(bundle):
    """`gpt2-edge serve BUNDLE --ray --replicas 2` (the torch-free entry): a local Ray of 2 CPUs,
    no dashboard, every address on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "gpt2_edge.serve", str(bundle), "--ray", "--replicas", "2", "--port", str(port),
           "--threads", "1", "--max-batch", "4", "--max-queue", "8", "--drain-timeout", str(DRAIN_TIMEOUT_S)]  # fmt: skip
    # A session of its own: if the test fails, Ray's processes go with the server's group.
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, 180, 0.5)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[1]


def test_two_replicas_behind_one_endpoint(url, bundle):
    gen = Generator.from_bundle(str(bundle), threads=1)
    seen = set()
    for _ in range(60):  # Ray's router spreads requests; both replicas answer within a few
        h = httpx.get(f"{url}/health", timeout=30).json()
        assert h["status"] == "ok"
        seen.add(h["replica"])
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen

    jobs = [(p, 6 + 3 * i) for i, p in enumerate(PROMPTS)] * 2

    def one(job):
        body = {"prompt": job[0], "max_tokens": job[1], "temperature": 0}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(one, jobs))
    assert got == [gen.generate(p, GenerationConfig(max_new_tokens=m))[0].text for p, m in jobs]


def test_streaming_through_ray(url):
    body = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
    plain = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    text = "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1])
    assert text == plain
    bad = httpx.post(f"{url}/v1/completions", json={"prompt": "O", "max_tokens": 0}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_the_app_limits_hold_behind_rays_proxy(url):
    """The Host check and JSON-only bodies are the app's: Ray's proxy passes them on."""
    port = url.rsplit(":", 1)[1]
    r = httpx.get(f"{url}/v1/models", headers={"Host": f"evil.example:{port}"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    body = b'{"prompt": "O", "max_tokens": 2}'
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "text/plain"}, timeout=30)
    assert r.status_code == 415


class Lines:
    """The server's output, read on a thread as it comes: the events a test waits for."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, prefix: str, timeout_s: float) -> str:
        """The first line starting with ``prefix``; fails after ``timeout_s``."""
        with self.cond:
            found = self.cond.wait_for(
                lambda: any(x.startswith(prefix) for x in self.lines), timeout=timeout_s
            )
            assert found, f"no line {prefix!r} in {timeout_s:g} s: {self.lines}"
            return next(x for x in self.lines if x.startswith(prefix))

    def text_so_far(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def text(self) -> str:
        """Everything, once the server has exited."""
        self.thread.join(timeout=30)
        return self.text_so_far()


def test_sigterm_drains_health_says_503_and_exits_0(server):
    """SIGTERM to the whole process group (a terminal, `timeout` or a supervisor sends it so; Ray's
    own processes get it too): every replica says 503 "draining" on /health while a request is still
    in flight (a body that has not all arrived), that request is answered, then Serve and Ray stop
    in order: exit 0 within the drain timeout and a margin, no "Failed to connect to GCS" (Ray's
    processes once died with the driver, which then waited 60 s for the lost GCS)."""
    proc, url = server
    port = int(url.rsplit(":", 1)[1])
    body = b'{"prompt": "O", "max_tokens": 2}'
    out = Lines(proc.stdout)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body[:10])
        )
        os.killpg(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        # The replicas' count when the drain began, not a sleep before the signal: whether the slow
        # request had reached one by then is the machine's to decide, not the test's to assume.
        in_flight = int(out.wait_for("gpt2-edge serve: draining: ", 60).split(": ")[2].split()[0])
        if in_flight:
            answers: list[tuple[int, str]] = []
            deadline = time.monotonic() + 30
            while len(answers) < 10:  # Ray's router sends /health to the replica with less in flight
                assert time.monotonic() < deadline, answers
                try:
                    h = httpx.get(f"{url}/health", timeout=5)
                except httpx.TransportError:
                    continue
                answers.append((h.status_code, h.json()["status"]))
            assert answers == [(503, "draining")] * 10
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "O", "max_tokens": 2}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert proc.poll() is None  # still draining: the slow request is in flight
            assert "gpt2-edge serve: drained" not in out.text_so_far()
        slow.sendall(body[10:])
        slow.settimeout(30)
        try:
            answer = slow.recv(65536)
        except OSError:  # only where nothing held the request: the proxy may drop it
            answer = b""
    proc.wait(timeout=DRAIN_TIMEOUT_S + SHUTDOWN_MARGIN_S)
    took = time.monotonic() - sent
    text = out.text()
    assert proc.returncode == 0, text
    assert took < DRAIN_TIMEOUT_S + SHUTDOWN_MARGIN_S, (took, text)
    assert "gpt2-edge serve: drained" in text, text
    assert "Failed to connect to GCS" not in text and "ERROR" not in text and "(raylet)" not in text, text
    if in_flight:
        assert answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")), answer
    else:
        pytest.skip(
            "the slow request reached no replica before the drain began (a loaded machine): the exit "
            "was checked, the in-flight request's drain was not"
        )


def test_build_for_serve_run(bundle):
    """`serve run gpt2_edge.serve.ray_app:build bundle=... replicas=2` builds the same app: Ray's CLI
    imports the builder and calls it with the key=value strings (its own helper, as `serve run` does)."""
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from gpt2_edge.serve.settings import SettingsError

    builder = import_attr("gpt2_edge.serve.ray_app:build")
    app = call_user_app_builder_with_args_if_necessary(
        builder, {"bundle": str(bundle), "replicas": "2", "max_batch": "4"}
    )
    assert isinstance(app, Application)
    # every provider, every setting the CLI has (but where to listen: Ray's proxy binds)
    args = {
        "bundle": str(bundle),
        "provider": "trt-engine",
        "prefill_chunk": "64",
        "cors_origins": "http://a.test",
    }
    assert isinstance(call_user_app_builder_with_args_if_necessary(builder, args), Application)
    # the same checks as the CLI's, naming the field
    with pytest.raises(SettingsError, match="max_batch must be >= 1"):
        call_user_app_builder_with_args_if_necessary(builder, {"bundle": str(bundle), "max_batch": "0"})
    with pytest.raises(SettingsError, match="provider must be one of"):
        call_user_app_builder_with_args_if_necessary(builder, {"bundle": str(bundle), "provider": "tpu"})
    with pytest.raises(ValueError, match="max_batc"):  # a misspelt key is refused, not ignored
        call_user_app_builder_with_args_if_necessary(builder, {"bundle": str(bundle), "max_batc": "4"})


def test_build_bounds_rays_queue_honours_the_drain_and_keeps_the_key_off_the_command_line(
    bundle, monkeypatch
):
    """The deployment `serve run` gets: requests past what the replica holds wait in Ray's proxy
    for a queue's worth at most, then 429 at once (Ray's default: no bound); the drain timeout is
    Ray's graceful shutdown; the key comes from the environment, never `api_key=` (`ps`)."""
    from gpt2_edge.serve.ray_app import build
    from gpt2_edge.serve.settings import API_KEY_ENV, SettingsError

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    app = build({"bundle": str(bundle), "max_batch": "4", "max_queue": "6", "drain_timeout_s": "7"})
    d = app._bound_deployment
    assert d.max_ongoing_requests == 4 + 6 + 1 and d.max_queued_requests == 6
    assert d.backpressure_config.status_code == 429
    assert d._deployment_config.graceful_shutdown_timeout_s == 7
    settings = d.init_args[1]
    assert settings["api_key"] is None and settings["allowed_hosts"] == []
    assert build({"bundle": str(bundle), "max_queue": "0"})._bound_deployment.max_queued_requests == 1
    with pytest.raises(SettingsError, match=f"must not be given on the command line.*{API_KEY_ENV}"):
        build({"bundle": str(bundle), "api_key": "secret"})
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert build({"bundle": str(bundle)})._bound_deployment.init_args[1]["api_key"] == "from-env"
    app = build({"bundle": str(bundle), "allowed_hosts": "a.test,b.test:80"})
    assert app._bound_deployment.init_args[1]["allowed_hosts"] == ["a.test", "b.test:80"]
