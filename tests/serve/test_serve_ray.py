"""Scale-out: the app as a Ray Serve deployment with 2 replicas on a local Ray (loopback only)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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


@pytest.fixture(scope="module")
def server(bundle):
    """`gpt2-edge serve BUNDLE --ray --replicas 2` (the torch-free entry): a local Ray of 2 CPUs,
    no dashboard, every address on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "gpt2_edge.serve", str(bundle), "--ray", "--replicas", "2", "--port", str(port),
           "--threads", "1", "--max-batch", "4", "--max-queue", "8", "--drain-timeout", "20"]  # fmt: skip
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


def test_sigterm_drains_health_says_503_and_exits_0(server):
    """SIGTERM: every replica says 503 "draining" on /health while a request is still in flight (a
    body that has not all arrived), that request is answered, then the process exits 0."""
    proc, url = server
    port = int(url.rsplit(":", 1)[1])
    body = b'{"prompt": "O", "max_tokens": 2}'
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body[:10])
        )
        time.sleep(1.0)  # the request reaches a replica: in flight there
        proc.send_signal(signal.SIGTERM)
        answers: list[tuple[int, str]] = []
        deadline = time.monotonic() + 30
        while len(answers) < 10:  # Ray's router sends /health to the replica with less in flight
            assert time.monotonic() < deadline, answers
            try:
                h = httpx.get(f"{url}/health", timeout=5)
            except httpx.TransportError:
                continue
            if answers or h.status_code == 503:  # from the first "draining" on
                answers.append((h.status_code, h.json()["status"]))
            time.sleep(0.05)
        assert answers == [(503, "draining")] * 10
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "O", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert proc.poll() is None  # still draining: the slow request is in flight
        slow.sendall(body[10:])
        slow.settimeout(30)
        answer = slow.recv(65536)
    assert answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")), answer
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out


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
