"""Scale-out: the app as a Ray Serve deployment with 2 replicas on a local Ray (loopback only)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
ray = pytest.importorskip("ray", reason="Ray Serve tests need the ray extra: pip install 'gpt2-edge[ray]'")
pytest.importorskip("ray.serve", reason="Ray Serve tests need the ray extra: pip install 'gpt2-edge[ray]'")
httpx = pytest.importorskip("httpx")

from gpt2_edge.export.bundle import export_bundle  # noqa: E402
from gpt2_edge.runtime.generator import Generator  # noqa: E402
from gpt2_edge.runtime.sampling import GenerationConfig  # noqa: E402

from .conftest import wait_healthy  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["First Citizen:", "All:\nSpeak", "We are accounted poor citizens, the patricians good.", "O"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("ray") / "tiny", log=lambda _: None)


@pytest.fixture(scope="module")
def server(bundle):
    """`gpt2-edge serve BUNDLE --ray --replicas 2` (the torch-free entry): a local Ray of 2 CPUs,
    no dashboard, every address on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "gpt2_edge.serve", str(bundle), "--ray", "--replicas", "2", "--port", str(port),
           "--threads", "1", "--max-batch", "4", "--max-queue", "8"]  # fmt: skip
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


def test_sigterm_shuts_ray_down_and_exits_0(server):
    proc, _ = server
    proc.send_signal(signal.SIGTERM)
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
