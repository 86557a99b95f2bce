"""Scale-out on Ray Serve: the same app in N replicas behind one HTTP endpoint.

Each replica loads the bundle into its own backend (any provider) and runs its own continuous-
batching scheduler; Ray's proxy spreads requests over them. Two ways to start it:

    gpt2-edge serve BUNDLE --ray --replicas 2 [--port 8000]          # a local Ray, or --ray-address
    serve run gpt2_edge.serve.ray_app:build bundle=BUNDLE replicas=2 # Ray's own CLI, any cluster

Both make one ``ServeSettings`` (checked when made, as for a single server); each replica checks
it again. Every node must see BUNDLE (and a ``draft`` bundle) at the same path. The API key comes from
``$GPT2_EDGE_API_KEY`` (``serve run ... api_key=KEY`` is refused: ``ps`` shows a command line to
every user); it travels in the deployment's arguments (visible to whoever can read the Ray
cluster's state). Needs the ``ray`` extra.

Limits, as a single server's: each replica's scheduler answers 429 past ``max_batch +
max_queue`` sequences; Ray hands a replica at most one request more than that
(``max_ongoing_requests``) and holds at most ``max_queue`` more per proxy
(``max_queued_requests``), answering 429 beyond, at once. The body timeout, the Host check and
JSON-only bodies are the app's, so they hold here too; the sockets are Ray's proxy's (its own
keep-alive; no header timeout or connection cap of ours).

Draining: on SIGTERM, ``gpt2-edge serve --ray`` tells every replica (``DrainSignal``): /health
says 503 ``draining`` and new completions get 503 while the requests in flight finish, for at
most ``--drain-timeout`` seconds; then it deletes the app (the replicas stop) and stops the local
Ray, whose processes ignore a SIGTERM sent to the whole process group (``sigterm_blocked``), so
the driver stops them in order. Under ``serve run`` Ray's own graceful shutdown
(``graceful_shutdown_timeout_s`` = ``drain_timeout_s``) waits for them instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, get_type_hints

# No usage report leaves the machine unless the operator asked for one.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
from pydantic import BaseModel, ConfigDict, create_model
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from .app import create_app
from .model import load_served_model
from .settings import API_KEY_ENV, ServeSettings, SettingsError, options


@ray.remote(num_cpus=0)
class DrainSignal:
    """The drain of ``gpt2-edge serve --ray``: the driver ``start``s it on SIGTERM; each replica
    ``wait``s for that, then reports how many requests it has in flight until it has none."""

    def __init__(self) -> None:
        self.started = False
        self.event: asyncio.Event | None = None
        self.in_flight: dict[str, int] = {}

    def _event(self) -> asyncio.Event:
        if self.event is None:
            self.event = asyncio.Event()
        return self.event

    async def wait(self) -> None:
        await self._event().wait()

    async def start(self) -> None:
        self.started = True
        self._event().set()

    async def report(self, replica: str, in_flight: int) -> None:
        self.in_flight[replica] = in_flight

    async def reports(self) -> dict[str, int]:
        return dict(self.in_flight)


DRAIN_REPORT_S = 0.1  # how often a draining replica reports its requests in flight


@serve.deployment(name="gpt2-edge")
@serve.ingress()
class Gpt2EdgeReplica:
    """One replica: one model, one scheduler, the whole HTTP app."""

    def __init__(self, bundle: str, settings: dict[str, Any], drain: Any = None) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.settings = ServeSettings(**{**settings, "replica": self.replica})
        self.model = load_served_model(bundle, self.settings)
        self.drain = drain

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.model, self.settings)
        if self.drain is not None:
            inner = app.router.lifespan_context

            @contextlib.asynccontextmanager
            async def lifespan(a: Any) -> Any:
                async with inner(a) as state:
                    watch = asyncio.ensure_future(self._drain_when_told(a.state.served))
                    try:
                        yield state
                    finally:
                        watch.cancel()

            app.router.lifespan_context = lifespan
        return app

    async def _drain_when_told(self, served: Any) -> None:
        """Wait for the driver's drain; then /health says 503 and new completions get 503 (as a
        single server's on SIGTERM), and the driver hears how many requests are still in flight."""
        await self.drain.wait.remote()
        served.draining = True
        while True:
            await self.drain.report.remote(self.replica, served.in_flight)
            await asyncio.sleep(DRAIN_REPORT_S)


def deployment(bundle: str | Path, settings: ServeSettings, drain: Any = None) -> Application:
    """The Ray Serve application: ``settings.replicas`` copies of the app. With ``drain`` (a
    ``DrainSignal``), the replicas drain when it starts, and Ray's own shutdown is brief."""
    return Gpt2EdgeReplica.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        # Our own scheduler answers 429 past its queue; Ray should hand each replica that many
        # requests and one more rather than hold them in its proxy, ...
        max_ongoing_requests=settings.max_batch + settings.max_queue + 1,
        # ... and hold no more than a queue's worth in each proxy: beyond, 429 at once (Ray's
        # default is no limit: a request waited in the proxy for as long as the others took).
        max_queued_requests=max(settings.max_queue, 1),
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        # The drain: DrainSignal's when there is one (it waited already), else Ray's.
        graceful_shutdown_timeout_s=settings.drain_timeout_s if drain is None else 1.0,
        graceful_shutdown_wait_loop_s=0.5,
    ).bind(str(bundle), settings.as_dict(), drain)


# `serve run`'s arguments: the bundle and the settings the table gives it (settings.options():
# not where to listen, which Ray's proxy binds and `serve start` or the config file says, nor the
# replica's own id, nor the key, which is $GPT2_EDGE_API_KEY).
_HINTS = get_type_hints(ServeSettings)
BuildArgs: type[BaseModel] = create_model(
    "BuildArgs",
    __config__=ConfigDict(extra="forbid"),  # a misspelt key is an error, not a silent default
    __doc__="``serve run gpt2_edge.serve.ray_app:build bundle=PATH [replicas=N] [max_batch=B] ...``",
    bundle=(str, ...),
    **{f.name: (_HINTS[f.name], f.default) for f, option, _ in options() if option.run},
)


class ApiKeyOnCommandLineError(SettingsError):
    """``api_key=`` among ``serve run``'s arguments."""


def build(args: dict[str, Any]) -> Application:
    """Application builder for Ray's ``serve run`` (arguments as ``key=value``; ``cors_origins``
    and ``allowed_hosts`` comma-separated). The API key is ``$GPT2_EDGE_API_KEY`` where ``serve
    run`` runs; ``api_key=`` is refused (``ps`` would show it)."""
    args = dict(args)
    if "api_key" in args:
        raise ApiKeyOnCommandLineError(
            "api_key",
            f"must not be given on the command line, where `ps` shows it to every user; set ${API_KEY_ENV} "
            "in the environment of `serve run` instead",
        )
    for name in ("cors_origins", "allowed_hosts"):
        if isinstance(args.get(name), str):
            args[name] = [o for o in args[name].split(",") if o]
    # Ray hands a dict of strings: pydantic converts them to the settings' types (and refuses
    # unknown keys), ServeSettings checks the values.
    values = BuildArgs.model_validate(args).model_dump()
    bundle = values.pop("bundle")
    values["api_key"] = os.environ.get(API_KEY_ENV) or None
    return deployment(bundle, ServeSettings(**values))


APP = "gpt2-edge"  # the Serve application's name


def serve_with_ray(bundle: Path, settings: ServeSettings, address: str | None = None) -> int:
    """``gpt2-edge serve --ray``: start (or join, at ``address``) Ray, run the replicas, wait for
    SIGTERM/SIGINT; then drain (at most ``drain_timeout_s``), delete the app (its replicas stop),
    and stop Ray (a local one) or leave it (a cluster joined, whose Serve may hold other apps)."""
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        with sigterm_blocked():  # the local Ray's processes inherit it: see sigterm_blocked
            ray.init(
                num_cpus=max(int(settings.replicas * settings.replica_cpus + 0.999), 1),
                include_dashboard=False,
                log_to_driver=False,
                _node_ip_address="127.0.0.1",  # a local cluster talks over loopback only
            )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        drain = DrainSignal.remote()  # type: ignore[attr-defined]
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(deployment(bundle.resolve(), settings, drain), name=APP, route_prefix="/")
        print(
            f"gpt2-edge serve: {settings.replicas} Ray Serve replica(s) of {bundle} ({settings.provider}) "
            f"on http://{settings.host}:{settings.port}",
            flush=True,
        )
        stop.wait()
        wait_for_drain(drain, settings.replicas, settings.drain_timeout_s)
    finally:
        # In order: the app (its replicas, drained by now, stop), then Ray. Not serve.shutdown():
        # it kills Serve's controller under its own pending call, which Ray reports as a failed
        # task, and on a cluster joined it would stop other people's apps.
        with contextlib.suppress(Exception):
            serve.delete(APP)
        ray.shutdown()
    return 0


@contextlib.contextmanager
def sigterm_blocked() -> Any:
    """Block SIGTERM in this thread while Ray starts its local processes (GCS, raylet, and the
    workers they start), which inherit the mask. A SIGTERM sent to the whole process group (a
    terminal, ``timeout``, a supervisor) then stops the driver alone, and the driver stops them in
    order; without it they died at once, and the driver waited 60 s for the lost GCS before Ray
    gave up with "Failed to connect to GCS". Ray does the same for SIGINT in the processes it
    starts. ``ray.shutdown()`` still stops them (SIGKILL after its one-second grace)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def wait_for_drain(drain: Any, replicas: int, timeout_s: float) -> bool:
    """Start ``drain`` and wait until every replica reports no request in flight, for at most
    ``timeout_s``; whether they all did (False too when Ray stops answering). Says on stdout how
    many requests it waits for, once every replica has reported, and how it ended."""
    deadline = time.monotonic() + timeout_s
    said = False
    try:
        ray.get(drain.start.remote(), timeout=max(timeout_s, 0.1))
        while True:
            reports = ray.get(drain.reports.remote(), timeout=max(deadline - time.monotonic(), 0.1))
            waiting = sum(reports.values())
            if len(reports) >= replicas and not said:
                print(f"gpt2-edge serve: draining: {waiting} request(s) in flight", flush=True)
                said = True
            if len(reports) >= replicas and not waiting:
                print("gpt2-edge serve: drained", flush=True)
                return True
            if time.monotonic() >= deadline:
                print(
                    f"gpt2-edge serve: drain timeout: {waiting} request(s) still in flight after "
                    f"{timeout_s:g} s",
                    flush=True,
                )
                return False
            time.sleep(DRAIN_REPORT_S)
    except ray.exceptions.RayError:  # GetTimeoutError among them: Ray stopped answering
        return False
