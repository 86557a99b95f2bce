"""``gpt2-edge serve``: the HTTP server on uvicorn, or N replicas on Ray Serve (``--ray``).

Also runnable as ``python -m gpt2_edge.serve`` (same options): that entry never imports torch.
The options become one ``ServeSettings``, which checks them; Ray Serve gets the same object.
The main CLI imports this module to build its parser: the HTTP stack (fastapi, uvicorn; the
``serve`` extra) and Ray load only when a server starts.

One file of about 450 lines: the options, their mapping onto ``ServeSettings`` and the
bind-before-load start-up are one command's parts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import Gpt2EdgeError
from ..runtime.backends import PROVIDERS
from .connections import bind
from .model import load_served_model
from .scheduler import MAX_DRAFT_TOKENS
from .settings import API_KEY_ENV, STEP_INVARIANT, ServeSettings, SettingsError

__all__ = ["API_KEY_ENV", "add_serve", "main", "resolve_bundle", "run", "run_app"]

CACHE_ENV = "GPT2_EDGE_CACHE"
DEFAULTS = ServeSettings()
# A setting's option is --its-name, except these.
FLAGS = {
    "timeout_s": "--timeout",
    "drain_timeout_s": "--drain-timeout",
    "cors_origins": "--cors-origin",
    "allowed_hosts": "--allowed-host",
    "header_timeout_s": "--header-timeout",
    "body_timeout_s": "--body-timeout",
}


class ServeError(Gpt2EdgeError):
    """A problem whose message is the whole story for the user."""


def default_bundle_dir() -> Path:
    """Where ``serve`` keeps its export of the shipped default model (``$GPT2_EDGE_CACHE``, else
    ``$XDG_CACHE_HOME/gpt2-edge``, else ``~/.cache/gpt2-edge``)."""
    root = (
        os.environ.get(CACHE_ENV)
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-edge"
    )
    return Path(root) / "default-bundle"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument(
        "bundle",
        nargs="?",
        help="bundle directory (gpt2-edge export -o DIR). Default: the shipped default model, exported once "
        "to $GPT2_EDGE_CACHE/default-bundle (~/.cache/gpt2-edge; the export needs the `export` extra)",
    )
    p.add_argument("--host", default=d.host, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=d.port, help=f"port to listen on, 1..65535 (default {d.port})")
    p.add_argument(
        "--provider",
        default=d.provider,
        choices=PROVIDERS,
        help="ONNX Runtime's cpu | cuda | tensorrt | auto, or trt-engine: the bundle's TensorRT engine for "
        "this GPU (gpt2-edge build-engine) (default: cpu)",
    )
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (per replica)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help="sequences decoded together (KV slots); 1 = no batching",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="sequences waiting for a slot; beyond it requests get 429",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=d.prefill_chunk,
        help="prompt tokens prefilled per step, between the running streams' tokens (0 = whole prompts; "
        f"default {d.prefill_chunk})",
    )
    p.add_argument(
        "--kv-budget",
        type=int,
        metavar="TOKENS",
        help="KV-cache positions at most (slots x tokens per slot), like llama-server's total context; the "
        "cache grows to what the running sequences need within it and shrinks when idle; a request that "
        "does not fit waits its turn (default: --max-batch x the model's context)",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="do not reuse the KV of a prompt's leading tokens that another request already prefilled",
    )
    p.add_argument(
        "--prefix-cache-blocks",
        type=int,
        default=d.prefix_cache_blocks,
        metavar="N",
        help="64-token blocks of prefix cache an idle server keeps (slots x tokens per slot; default "
        f"{d.prefix_cache_blocks}); a busy one keeps prefixes in its free slots",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=d.prompt_lookup,
        metavar="N",
        help="speculative decoding for requests that do not set `prompt_lookup`: draft up to N tokens per "
        "step from the prompt and the text so far, verified in one pass; the same tokens, more per step "
        "where the text repeats its prompt (in-place bundles; 0 = off, the default)",
    )
    p.add_argument(
        "--draft",
        metavar="BUNDLE",
        help="speculative decoding with a draft model for every request: this smaller bundle (the same "
        "tokenizer, in-place KV cache) drafts tokens the served model verifies in one pass; the same "
        "greedy text and the same sampled distribution, more tokens per step where it guesses right "
        "(in-place bundles on ONNX Runtime; the draft runs on the CPU). Its KV cache follows the "
        "server's: the same slots and tokens per slot, at its own bytes per token",
    )
    p.add_argument(
        "--draft-tokens",
        type=int,
        metavar="K",
        help=f"most tokens the draft model proposes per step, 1..{MAX_DRAFT_TOKENS} (with --draft; "
        f"default {d.draft_tokens}); fewer where its acceptance rate says so",
    )
    p.add_argument(
        "--step-invariant",
        choices=STEP_INVARIANT,
        default=d.step_invariant,
        help="compute attention as for a chunk in every pass, so a row's tokens are bitwise the same whether "
        "it verifies drafts, decodes one token or is padded beside rows that verify: greedy speculation is "
        "plain decoding, and a plain request never depends on a drafting neighbour (costs attention time, "
        "more at long contexts); auto (default): on when --prompt-lookup or --draft is set and the bundle "
        "has the input",
    )
    p.add_argument(
        "--api-key",
        help=f"require `Authorization: Bearer KEY` on every route but /health (better: set ${API_KEY_ENV}, "
        "which `ps` does not show)",
    )
    p.add_argument(
        "--timeout", type=float, default=d.timeout_s, help="seconds a request may take in all (default 300)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=d.max_body_bytes, help="request body limit (default 1 MiB)"
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allow browser requests from this origin (repeatable; default: CORS off)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="without an API key, answer requests whose Host header is NAME (any port) or NAME:PORT, besides "
        "127.0.0.1, localhost and [::1] at the listening port (repeatable; '*': any name). Other names get "
        "400: a web page cannot reach a loopback server by rebinding its own DNS name",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout_s,
        help=f"seconds a connection has to send a whole request head, else 408 and closed (default "
        f"{d.header_timeout_s:g})",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout_s,
        help=f"seconds a request's body has to arrive after its head, else 408 (default "
        f"{d.body_timeout_s:g})",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help=f"open connections at once; one more is answered 503 and closed (default {d.max_connections})",
    )
    p.add_argument(
        "--model-name", help="model id in /v1/models and responses (default: the bundle dir's name)"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout_s,
        help="on SIGTERM, seconds to finish in-flight requests",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g = p.add_argument_group("Ray Serve (scale-out; needs the `ray` extra)")
    g.add_argument(
        "--ray", action="store_true", help="run as a Ray Serve deployment with --replicas replicas"
    )
    g.add_argument(
        "--replicas", type=int, default=d.replicas, help="Ray Serve replicas, each its own model and batch"
    )
    g.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    g.add_argument("--replica-cpus", type=float, default=d.replica_cpus, help="CPUs Ray reserves per replica")


def add_serve(sub: argparse._SubParsersAction) -> None:
    """Register ``gpt2-edge serve`` on the main CLI."""
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with continuous batching (or Ray Serve replicas)",
        description="Serve a bundle over an OpenAI-style HTTP API: POST /v1/completions (SSE with stream), "
        "GET /v1/models, /health, /metrics, POST /tokenize, /detokenize. Binds 127.0.0.1 unless --host says "
        "otherwise. SIGTERM drains in-flight requests (--drain-timeout) and exits 0.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=run)



def _invoked_as_program() -> bool:
    """Whether this process is the ``gpt2-edge`` program itself, not code that calls ``main()``:
    only the program may be replaced by a fresh one."""
    prog = Path(sys.argv[0])
    return prog.name == "gpt2-edge" or (
        prog.name == "__main__.py" and prog.parent.name in ("gpt2_edge", "serve")
    )


def _start_over_if_needed(args: argparse.Namespace) -> None:
    """Replace this process (same pid) with a clean ``python -m gpt2_edge.serve`` when torch is
    loaded (a server would carry hundreds of MB it never uses) or when ``--api-key`` is on the
    command line (``ps`` shows argv to every user; the new process gets the key through its
    environment)."""
    if "torch" not in sys.modules and not args.api_key:
        return
    argv = [sys.executable, "-m", "gpt2_edge.serve"]
    if args.bundle:
        argv.append(args.bundle)
    for flag, value in (
        ("--host", args.host),
        ("--port", args.port),
        ("--provider", args.provider),
        ("--threads", args.threads),
        ("--max-batch", args.max_batch),
        ("--max-queue", args.max_queue),
        ("--prefill-chunk", args.prefill_chunk),
        ("--kv-budget", args.kv_budget),
        ("--prefix-cache-blocks", args.prefix_cache_blocks),
        ("--prompt-lookup", args.prompt_lookup),
        ("--draft", args.draft),
        ("--draft-tokens", args.draft_tokens),
        ("--step-invariant", args.step_invariant),
        ("--timeout", args.timeout),
        ("--max-body-bytes", args.max_body_bytes),
        ("--header-timeout", args.header_timeout),
        ("--body-timeout", args.body_timeout),
        ("--max-connections", args.max_connections),
        ("--model-name", args.model_name),
        ("--drain-timeout", args.drain_timeout),
        ("--log-level", args.log_level),
        ("--replicas", args.replicas),
        ("--ray-address", args.ray_address),
        ("--replica-cpus", args.replica_cpus),
    ):
        if value is not None:
            argv += [flag, str(value)]
    for origin in args.cors_origin:
        argv += ["--cors-origin", origin]
    for host in args.allowed_host:
        argv += ["--allowed-host", host]
    if not args.prefix_cache:
        argv.append("--no-prefix-cache")
    if args.ray:
        argv.append("--ray")
    env = dict(os.environ)
    if args.api_key:
        env[API_KEY_ENV] = args.api_key  # through the environment, not the visible command line
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def resolve_bundle(bundle: str | None, log: Any = print, option: str | None = None) -> Path:
    """The bundle to serve: the given one, or the shipped default model's (exported on first use).
    ``option``: the option that named it (``--draft``), for the refusal."""
    if bundle:
        path = Path(bundle)
        if not (path / "bundle.json").is_file():
            raise ServeError(
                f"{option + ' ' if option else ''}{path} is not a bundle (no bundle.json); make one with "
                f"`gpt2-edge export -o {path}`"
            )
        return path
    path = default_bundle_dir()
    if (path / "bundle.json").is_file():
        return path
    log(f"no BUNDLE given: exporting the shipped default model to {path} (once)")
    # In a child process: the export needs torch, the server must not carry it.
    cmd = [sys.executable, "-m", "gpt2_edge", "export", "-o", str(path), "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ServeError(
            f"could not export the default model ({tail[0]}); install the export extra "
            "(pip install 'gpt2-edge[export]') or pass a bundle: gpt2-edge serve BUNDLE"
        )
    return path


def settings_from_args(args: argparse.Namespace, api_key: str | None) -> ServeSettings:
    """The options as settings; a refusal names the option (``--max-batch``), not the field."""
    try:
        return ServeSettings(
            provider=args.provider,
            threads=args.threads,
            model_name=args.model_name,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            prefill_chunk=args.prefill_chunk,
            kv_budget=args.kv_budget,
            prefix_cache=args.prefix_cache,
            prefix_cache_blocks=args.prefix_cache_blocks,
            prompt_lookup=args.prompt_lookup,
            draft=args.draft,
            draft_tokens=DEFAULTS.draft_tokens if args.draft_tokens is None else args.draft_tokens,
            step_invariant=args.step_invariant,
            timeout_s=args.timeout,
            max_body_bytes=args.max_body_bytes,
            api_key=api_key,
            cors_origins=tuple(args.cors_origin),
            allowed_hosts=tuple(args.allowed_host),
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            max_connections=args.max_connections,
            host=args.host,
            port=args.port,
            drain_timeout_s=args.drain_timeout,
            replicas=args.replicas,
            replica_cpus=args.replica_cpus,
        )
    except SettingsError as e:
        flag = FLAGS.get(e.field, "--" + e.field.replace("_", "-"))
        raise ServeError(f"{flag} {e.problem}") from None


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT; 0 after a clean drain."""
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    settings = settings_from_args(args, api_key)
    if not args.ray and settings.replicas != 1:
        raise ServeError("--replicas needs --ray (one process serves one model; Ray Serve runs several)")
    if settings.draft is None and args.draft_tokens is not None:
        raise ServeError("--draft-tokens needs --draft (the draft model's bundle)")
    if settings.draft is not None:
        draft = resolve_bundle(settings.draft, option="--draft")  # a look for bundle.json, before binding
        settings = settings.replace(draft=str(draft.resolve()))  # every Ray replica finds it there too
    if args.bundle:
        bundle = resolve_bundle(args.bundle)  # a look for bundle.json
    # The address before anything slow: a port in use (or not ours) is one line now, not a
    # traceback after the model loaded (or the default model was exported).
    sock = bind(settings.host, settings.port)
    if args.ray or _invoked_as_program():
        sock.close()  # Ray's proxy binds it; a process that starts over binds it again
    if not args.bundle:
        bundle = resolve_bundle(None)  # the default model, exported on first use
    if _invoked_as_program():
        _start_over_if_needed(args)
        if not args.ray:
            sock = bind(settings.host, settings.port)
    if args.ray:
        from .ray_app import serve_with_ray  # Ray loads only when asked for

        return serve_with_ray(bundle, settings, address=args.ray_address)
    return serve_uvicorn(bundle, settings, log_level=args.log_level, sock=sock)


def serve_uvicorn(bundle: Path, settings: ServeSettings, log_level: str = "info", sock: Any = None) -> int:
    """Serve ``bundle`` on uvicorn, on ``sock`` (bound before the model loads) or a socket bound here."""
    from .app import create_app  # fastapi (the serve extra): not when the main CLI builds its parser

    sock = sock or bind(settings.host, settings.port)
    try:
        model = load_served_model(bundle, settings)
        app = create_app(model, settings)
    except BaseException:
        sock.close()
        raise
    print(
        f"gpt2-edge serve: {model.name} ({bundle}, {settings.provider}) on http://{settings.host}:{settings.port}"
        f" — max batch {settings.max_batch}, queue {settings.max_queue}, prefill chunk "
        f"{settings.prefill_chunk or 'whole'}, KV budget "
        f"{f'{settings.kv_budget} tokens' if settings.kv_budget else 'max batch x context'}, "
        f"prefix cache {'on' if settings.prefix_cache else 'off'}, "
        f"prompt lookup {settings.prompt_lookup or 'off'}, "
        f"draft {f'{settings.draft} (up to {settings.draft_tokens} tokens)' if settings.draft else 'off'}, "
        f"step invariance {'on' if model.step_invariant else 'off'}, "
        f"auth {'on' if settings.api_key else 'off'}",
        flush=True,
    )
    return run_app(app, settings, log_level, sockets=[sock])


def run_app(app: Any, settings: ServeSettings, log_level: str = "info", sockets: Any = None) -> int:
    """Run ``app`` (from ``create_app``) on uvicorn until SIGTERM / SIGINT, on ``sockets`` (else
    it binds ``settings.host:port``), with the settings' header timeout and connection cap.
    In-flight requests get ``drain_timeout_s`` seconds to finish while new completions are
    refused; then 0."""
    import uvicorn  # the ASGI server: only where one runs here (not in a Ray replica)

    from .connections import guarded_protocol

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # /health says so and new completions get 503 while in-flight ones finish
            app.state.served.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=settings.drain_timeout_s,
        lifespan="on",
        http=guarded_protocol(settings.header_timeout_s, settings.max_connections),
    )
    server = DrainingServer(config)
    # uvicorn re-raises the signal it stopped on once it has drained; the default action of that
    # second SIGTERM would kill us with status -15. A no-op handler lets a drained server exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=sockets)
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m gpt2_edge.serve``: the same options as ``gpt2-edge serve``."""
    p = argparse.ArgumentParser(
        prog="python -m gpt2_edge.serve", description="gpt2-edge serve (torch-free entry)"
    )
    add_serve_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (Gpt2EdgeError, OSError) as e:
        print(f"gpt2-edge serve: error: {e}", file=sys.stderr)
        return 2
