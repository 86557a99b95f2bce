"""Scale-out on Ray Serve: the same app in N replicas behind one HTTP endpoint.

Each replica loads the bundle into its own ONNX Runtime session and runs its own continuous-
batching scheduler; Ray's proxy spreads requests over them. Two ways to start it:

    gpt2-edge serve BUNDLE --ray --replicas 2 [--port 8000]          # a local Ray, or --ray-address
    serve run gpt2_edge.serve.ray_app:build bundle=BUNDLE replicas=2 # Ray's own CLI, any cluster

Every node must see BUNDLE at the same path. The API key, when set, travels in the deployment's
arguments (visible to whoever can read the Ray cluster's state). Needs the ``ray`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import threading
from pathlib import Path
from typing import Any

from ..errors import Gpt2EdgeError

# No usage report leaves the machine unless the operator asked for one.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from .app import ServedModel, ServeSettings, create_app


@serve.deployment(name="gpt2-edge")
@serve.ingress()
class Gpt2EdgeReplica:
    """One replica: one model, one scheduler, the whole HTTP app."""

    def __init__(
        self, bundle: str, settings: dict[str, Any], provider: str = "cpu", threads: int | None = None
    ):
        self.model = ServedModel.from_bundle(
            bundle, provider=provider, threads=threads, name=settings.get("model_name")
        )
        replica = serve.get_replica_context().replica_id.unique_id
        self.settings = ServeSettings(**{**settings, "replica": replica})

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.model, self.settings)


def deployment(
    bundle: str | Path,
    settings: ServeSettings,
    replicas: int = 1,
    provider: str = "cpu",
    threads: int | None = None,
    replica_cpus: float = 1.0,
) -> Application:
    """The Ray Serve application: ``replicas`` copies of the app."""
    if replicas < 1:
        raise Gpt2EdgeError(f"replicas must be >= 1, got {replicas}")
    as_dict = dataclasses.asdict(settings)
    as_dict["cors_origins"] = list(settings.cors_origins)
    return Gpt2EdgeReplica.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        # Our own scheduler answers 429 past its queue; Ray should hand each replica that many
        # requests and one more rather than hold them in its proxy.
        max_ongoing_requests=settings.max_batch + settings.max_queue + 1,
    ).bind(str(bundle), as_dict, provider, threads)


class BuildArgs(BaseModel):
    """``serve run gpt2_edge.serve.ray_app:build bundle=PATH [replicas=N] [max_batch=B] ...``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default

    bundle: str
    replicas: int = 1
    provider: str = "cpu"
    threads: int | None = None
    replica_cpus: float = 1.0
    max_batch: int = ServeSettings.max_batch
    max_queue: int = ServeSettings.max_queue
    timeout_s: float = ServeSettings.timeout_s
    max_body_bytes: int = ServeSettings.max_body_bytes
    model_name: str | None = None
    api_key: str | None = None  # default: $GPT2_EDGE_API_KEY where `serve run` runs


def build(args: dict[str, Any] | BuildArgs) -> Application:
    """Application builder for Ray's ``serve run`` (arguments as ``key=value``)."""
    from .cli import API_KEY_ENV

    # Ray hands a dict of strings (it converts to the annotated model only when the annotation is
    # a class, which postponed annotations are not): validate here either way.
    if not isinstance(args, BuildArgs):
        args = BuildArgs.model_validate(args)

    settings = ServeSettings(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        timeout_s=args.timeout_s,
        max_body_bytes=args.max_body_bytes,
        model_name=args.model_name,
    )
    return deployment(args.bundle, settings, args.replicas, args.provider, args.threads, args.replica_cpus)


def serve_with_ray(bundle: Path, settings: ServeSettings, args: argparse.Namespace) -> int:
    """``gpt2-edge serve --ray``: start (or join) Ray, run the replicas, wait for SIGTERM/SIGINT."""
    import ray

    if args.ray_address:
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(
            num_cpus=max(int(args.replicas * args.replica_cpus + 0.999), 1),
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",  # a local cluster talks over loopback only
        )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = deployment(
            bundle.resolve(), settings, args.replicas, args.provider, args.threads, args.replica_cpus
        )
        serve.run(app, name="gpt2-edge", route_prefix="/")
        print(
            f"gpt2-edge serve: {args.replicas} Ray Serve replica(s) of {bundle} on http://{args.host}:{args.port}",
            flush=True,
        )
        stop.wait()
    finally:
        # Ray drains each replica (graceful_shutdown_timeout_s) before it stops.
        serve.shutdown()
        ray.shutdown()
    return 0
