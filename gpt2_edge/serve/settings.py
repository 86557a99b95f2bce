"""The server's settings: one dataclass that checks itself when it is made.

``gpt2-edge serve`` (``serve/cli.py``) fills it from its options, Ray Serve (``serve/ray_app.py``)
from ``serve run``'s ``key=value`` arguments or from the CLI's; both get the same checks, and a
refusal names the field (``SettingsError.field``; the CLI turns it into the option's name).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import Gpt2EdgeError
from ..runtime.backends import PROVIDERS
from .admission import DEFAULT_PREFIX_CACHE_BLOCKS
from .scheduler import DEFAULT_PREFILL_CHUNK, MAX_DRAFT_TOKENS, MAX_PROMPT_LOOKUP

STEP_INVARIANT = ("auto", "on", "off")
API_KEY_ENV = "GPT2_EDGE_API_KEY"  # the key where `ps` does not show it (CLI, `serve run`)


class SettingsError(Gpt2EdgeError):
    """A setting out of range or of the wrong type; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class ServeSettings:
    """How one server (or each Ray Serve replica) loads, batches, limits and protects."""

    # the model
    provider: str = "cpu"  # runtime.backends.PROVIDERS: cpu | cuda | tensorrt | auto (ORT), trt-engine
    threads: int | None = None  # ONNX Runtime intra-op threads per replica (None: its default)
    model_name: str | None = None  # the id in /v1/models (default: the bundle directory's name)
    # batching
    max_batch: int = 8  # KV-cache slots: sequences decoded together in one step
    max_queue: int = 32  # sequences waiting for a slot before new requests get 429
    # Prompt tokens prefilled per scheduler step: a long prompt is prefilled in chunks between the
    # running streams' decode steps instead of stalling them for its whole prefill. 0 = whole.
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    # KV memory: positions (slots x tokens per slot) at most; the cache grows to what the running
    # sequences need within it and shrinks when idle. None: max_batch x the context (raised to one
    # context when less). Like llama-server's total context, but allocated as the work needs it.
    kv_budget: int | None = None
    # A prompt starting with tokens another request prefilled reuses their KV (in-place bundles).
    prefix_cache: bool = True
    # What an idle server keeps of it: 64-token blocks (slots x tokens per slot it holds on to).
    prefix_cache_blocks: int = DEFAULT_PREFIX_CACHE_BLOCKS
    # Speculative decoding by prompt lookup for requests that do not say (their `prompt_lookup`):
    # up to this many tokens drafted per step from the prompt and the text so far, verified in one
    # pass (in-place bundles; others decode plainly). 0: off.
    prompt_lookup: int = 0
    # Speculative decoding with a draft model for every request: a smaller bundle (same tokenizer,
    # in-place KV cache; a path every replica sees) drafts up to draft_tokens tokens per step, run
    # greedily on the CPU over its own cache of the server's cache's shape (beside the KV budget:
    # its positions are the same ones, at its own bytes per position). None: off.
    draft: str | None = None
    draft_tokens: int = 4
    # Step invariance (runtime: OrtBackend's step_invariant): every pass computes attention as for
    # a chunk, so a row's logits are bitwise the same whether it verifies a draft, decodes one
    # token, or is padded beside rows that verify: greedy speculation is plain decoding, and a
    # plain request never depends on a drafting neighbour. "auto": on when the server drafts for
    # every request (prompt_lookup or draft) and the bundle has the input; "on": required; "off".
    step_invariant: str = "auto"
    # limits and protection
    timeout_s: float = 300.0  # per request, from arrival to its last token
    max_body_bytes: int = 1 << 20
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer`
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers, browsers on other origins are refused
    # Host names a keyless server answers for besides its loopback names (127.0.0.1, localhost,
    # [::1], at the port it listens on): "name" (any port) or "name:port"; "*" any. With an API
    # key any Host is answered. Refusing other names stops DNS rebinding from a browser.
    allowed_hosts: tuple[str, ...] = ()
    # slow and surplus clients (uvicorn; behind Ray Serve its proxy has the sockets)
    header_timeout_s: float = 10.0  # from connecting (or the last response) to a whole request head
    body_timeout_s: float = 30.0  # from the request head to the end of its body: else 408
    max_connections: int = 256  # open connections at once; one more is answered 503 and closed
    # where it listens, and how long in-flight requests may finish on SIGTERM
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = 8000
    drain_timeout_s: float = 30.0
    # Ray Serve
    replicas: int = 1  # copies of the app behind Ray's proxy, each with its own model and batch
    replica_cpus: float = 1.0  # CPUs Ray reserves per replica
    replica: str | None = None  # shown by /health: which replica answered (set by each replica)

    def __post_init__(self) -> None:
        for name, low, high in (
            ("max_batch", 1, None),
            ("max_queue", 0, None),
            ("prefill_chunk", 0, None),
            ("max_body_bytes", 1, None),
            ("port", 1, 65535),
            ("replicas", 1, None),
            ("max_connections", 1, None),
            ("prefix_cache_blocks", 0, None),
            ("prompt_lookup", 0, MAX_PROMPT_LOOKUP),
            ("draft_tokens", 1, MAX_DRAFT_TOKENS),
        ):
            self._count(name, low, high)
        for name in ("threads", "kv_budget"):
            if getattr(self, name) is not None:
                self._count(name, 1, None)
        if not isinstance(self.prefix_cache, bool):
            raise SettingsError("prefix_cache", f"must be true or false, got {self.prefix_cache!r}")
        for name, low, inclusive in (
            ("timeout_s", 0.0, False),
            ("header_timeout_s", 0.0, False),
            ("body_timeout_s", 0.0, False),
            ("drain_timeout_s", 0.0, True),
            ("replica_cpus", 0.0, False),
        ):
            self._number(name, low, inclusive)
        for name, optional in (
            ("host", False),
            ("model_name", True),
            ("api_key", True),
            ("replica", True),
            ("draft", True),
        ):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not isinstance(value, str) or not value:
                raise SettingsError(name, f"must be a non-empty string, got {value!r}")
        if self.step_invariant not in STEP_INVARIANT:
            raise SettingsError(
                "step_invariant", f"must be one of {', '.join(STEP_INVARIANT)}, got {self.step_invariant!r}"
            )
        if self.provider not in PROVIDERS:
            raise SettingsError("provider", f"must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        for name, what in (("cors_origins", "origins"), ("allowed_hosts", "host names")):
            values = getattr(self, name)
            if isinstance(values, str) or not all(isinstance(v, str) and v.strip() for v in values):
                raise SettingsError(name, f"must be a list of {what} (non-empty strings), got {values!r}")
            object.__setattr__(self, name, tuple(values))  # frozen: normalise once, here

    def _count(self, name: str, low: int, high: int | None) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(name, f"must be an integer, got {value!r}")
        if value < low:
            raise SettingsError(name, f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise SettingsError(name, f"must be <= {high}, got {value}")

    def _number(self, name: str, low: float, inclusive: bool) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SettingsError(name, f"must be a finite number, got {value!r}")
        if value < low or (value == low and not inclusive):
            raise SettingsError(name, f"must be {'>=' if inclusive else '>'} {low:g}, got {value:g}")
        object.__setattr__(self, name, float(value))

    def step_invariance(self) -> bool | None:
        """What ``runtime.load_model`` is asked: True (required), False, or None (where the
        bundle allows it): "auto" is on when every request is drafted for by default."""
        if self.step_invariant != "auto":
            return self.step_invariant == "on"
        return None if (self.prompt_lookup or self.draft is not None) else False

    def replace(self, **changes: Any) -> ServeSettings:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for a process boundary (Ray's deployment arguments)."""
        d = dataclasses.asdict(self)
        d["cors_origins"] = list(self.cors_origins)
        d["allowed_hosts"] = list(self.allowed_hosts)
        return d
