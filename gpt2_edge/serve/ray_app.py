"""Scale-out on Ray Serve: the same app in N replicas behind one HTTP endpoint.

Each replica loads the bundle into its own backend (any provider) and runs its own continuous-
batching scheduler; Ray's proxy spreads requests over them. Two ways to start it:

    gpt2-edge serve BUNDLE --ray --replicas 2 [--port 8000]          # a local Ray, or --ray-address
    serve run gpt2_edge.serve.ray_app:build bundle=BUNDLE replicas=2 # Ray's own CLI, any cluster

Both make one ``ServeSettings`` (checked when made, as for a single server); each replica checks
it again. Every node must see BUNDLE at the same path. The API key, when set, travels in the
deployment's arguments (visible to whoever can read the Ray cluster's state). Needs the ``ray``
extra.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

# No usage report leaves the machine unless the operator asked for one.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
from pydantic import BaseModel, ConfigDict, create_model
from ray import serve
from ray.serve import Application

from .app import create_app
from .model import ServedModel
from .settings import API_KEY_ENV, ServeSettings


@serve.deployment(name="gpt2-edge")
@serve.ingress()
class Gpt2EdgeReplica:
    """One replica: one model, one scheduler, the whole HTTP app."""

    def __init__(self, bundle: str, settings: dict[str, Any]) -> None:
        replica = serve.get_replica_context().replica_id.unique_id
        self.settings = ServeSettings(**{**settings, "replica": replica})
        s = self.settings
        self.model = ServedModel.from_bundle(bundle, s.provider, threads=s.threads, name=s.model_name)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.model, self.settings)


def deployment(bundle: str | Path, settings: ServeSettings) -> Application:
    """The Ray Serve application: ``settings.replicas`` copies of the app."""
    return Gpt2EdgeReplica.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        # Our own scheduler answers 429 past its queue; Ray should hand each replica that many
        # requests and one more rather than hold them in its proxy.
        max_ongoing_requests=settings.max_batch + settings.max_queue + 1,
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
    ).bind(str(bundle), settings.as_dict())


# `serve run`'s arguments: the bundle and every setting but where to listen (Ray's proxy binds;
# `serve start` or the config file says where) and the replica's own id.
_NOT_FROM_RUN = {"host", "port", "replica"}
_HINTS = get_type_hints(ServeSettings)
BuildArgs: type[BaseModel] = create_model(
    "BuildArgs",
    __config__=ConfigDict(extra="forbid"),  # a misspelt key is an error, not a silent default
    __doc__="``serve run gpt2_edge.serve.ray_app:build bundle=PATH [replicas=N] [max_batch=B] ...``",
    bundle=(str, ...),
    **{f.name: (_HINTS[f.name], f.default) for f in fields(ServeSettings) if f.name not in _NOT_FROM_RUN},
)


def build(args: dict[str, Any]) -> Application:
    """Application builder for Ray's ``serve run`` (arguments as ``key=value``; ``cors_origins``
    comma-separated; ``api_key`` defaults to ``$GPT2_EDGE_API_KEY`` where ``serve run`` runs)."""
    args = dict(args)
    if isinstance(args.get("cors_origins"), str):
        args["cors_origins"] = [o for o in args["cors_origins"].split(",") if o]
    # Ray hands a dict of strings: pydantic converts them to the settings' types (and refuses
    # unknown keys), ServeSettings checks the values.
    values = BuildArgs.model_validate(args).model_dump()
    bundle = values.pop("bundle")
    values["api_key"] = values["api_key"] or os.environ.get(API_KEY_ENV) or None
    return deployment(bundle, ServeSettings(**values))


def serve_with_ray(bundle: Path, settings: ServeSettings, address: str | None = None) -> int:
    """``gpt2-edge serve --ray``: start (or join, at ``address``) Ray, run the replicas, wait for
    SIGTERM/SIGINT."""
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
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
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(deployment(bundle.resolve(), settings), name="gpt2-edge", route_prefix="/")
        print(
            f"gpt2-edge serve: {settings.replicas} Ray Serve replica(s) of {bundle} ({settings.provider}) "
            f"on http://{settings.host}:{settings.port}",
            flush=True,
        )
        stop.wait()
    finally:
        # Ray drains each replica (graceful_shutdown_timeout_s) before it stops.
        serve.shutdown()
        ray.shutdown()
    return 0
