"""The server's settings: one dataclass that checks itself when it is made, and the one table of
its options.

Each field is declared once, with how a user gives it (``setting(default, help, ...)``: an
``Option`` in the field's metadata). From that table ``gpt2-edge serve`` (``serve/cli.py``)
generates its command-line options, the mapping of the parsed options onto the settings, and the
command line of a restarted server; Ray Serve (``serve/ray_app.py``) its ``serve run`` ``key=value``
arguments. All of them get the same checks, and a refusal names the field (``SettingsError.field``;
the CLI turns it into the option's name, ``Option.flag``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from ..errors import Gpt2EdgeError
from ..runtime.backends import PROVIDERS
from .admission import DEFAULT_PREFIX_CACHE_BLOCKS
from .scheduler import DEFAULT_PREFILL_CHUNK, DEFAULT_STEP_TOKENS, MAX_DRAFT_TOKENS, MAX_PROMPT_LOOKUP

STEP_INVARIANT = ("auto", "on", "off")
API_KEY_ENV = "GPT2_EDGE_API_KEY"  # the key where `ps` does not show it (CLI, `serve run`)


class SettingsError(Gpt2EdgeError):
    """A setting out of range or of the wrong type; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Option:
    """How a user gives one setting: ``gpt2-edge serve``'s option and ``serve run``'s key."""

    help: str  # the option's help; "(default: ...)" is added from the field's default
    flag: str = ""  # the option (default: --field-name; a bool that is on by default: --no-field-name)
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    cli: bool = True  # an option of `gpt2-edge serve`
    run: bool = True  # a key=value argument of Ray's `serve run`
    secret: bool = False  # never on a command line (`ps` shows it): a restarted server gets it by env
    group: str | None = None  # the help section it is listed in (None: the main one)


def setting(default: Any, help: str, **option: Any) -> Any:
    """A ``ServeSettings`` field with its ``Option`` (the table's row)."""
    return field(default=default, metadata={"option": Option(help, **option)})


RAY = "Ray Serve (scale-out; needs the `ray` extra)"


@dataclass(frozen=True)
class ServeSettings:
    """How one server (or each Ray Serve replica) loads, batches, limits and protects."""

    # the model
    provider: str = setting(
        "cpu",
        "ONNX Runtime's cpu | cuda | tensorrt | auto, or trt-engine: the bundle's TensorRT engine for this "
        "GPU (gpt2-edge build-engine)",
        choices=PROVIDERS,
    )
    # ONNX Runtime intra-op threads per replica (None: its default)
    threads: int | None = setting(None, "ONNX Runtime intra-op threads (per replica)")
    # the id in /v1/models (default: the bundle directory's name)
    model_name: str | None = setting(
        None, "model id in /v1/models and responses (default: the bundle dir's name)"
    )
    # LoRA adapters served beside the base model (a bundle exported with --lora-slots): NAME=DIR;
    # a request picks one by its `model` (vLLM's convention), the base model's name serves none.
    lora: tuple[str, ...] = setting(
        (),
        "serve the PEFT LoRA adapter in DIR as model NAME beside the base model (repeatable; a bundle "
        "exported with --lora-slots)",
        metavar="NAME=DIR",
    )
    # batching
    max_batch: int = setting(8, "sequences decoded together (KV slots); 1 = no batching")
    max_queue: int = setting(32, "sequences waiting for a slot; beyond it requests get 429")
    # Tokens of one prompt prefilled per engine step: a long prompt is prefilled in chunks between
    # the running streams' decode steps instead of stalling them for its whole prefill. 0 = whole.
    prefill_chunk: int = setting(
        DEFAULT_PREFILL_CHUNK,
        "tokens of one prompt prefilled per step, between the running streams' tokens (0 = whole prompts)",
    )
    # Tokens per engine step: decoding rows first (one each), then prompt chunks, oldest first, up to
    # this (llama-server's batch, vLLM's max_num_batched_tokens). A burst of prompts goes in within
    # one step, so its sequences decode together and the next burst does not stall them (issue 23:
    # inter-token latency under closed-loop load; scheduler.py). 0 = no limit.
    step_tokens: int = setting(
        DEFAULT_STEP_TOKENS,
        "tokens per step: the decoding streams' first, then prompt chunks (at most --prefill-chunk of "
        "each), oldest first, up to this; a burst of prompts goes in together, so their streams decode "
        "together and the next burst does not stall them (0 = no limit)",
        metavar="TOKENS",
    )
    # KV memory: positions (slots x tokens per slot) at most; the cache grows to what the running
    # sequences need within it and shrinks when idle. None: max_batch x the context (raised to one
    # context when less). Like llama-server's total context, but allocated as the work needs it.
    kv_budget: int | None = setting(
        None,
        "KV-cache positions at most (slots x tokens per slot), like llama-server's total context; the "
        "cache grows to what the running sequences need within it and shrinks when idle; a request that "
        "does not fit waits its turn (default: --max-batch x the model's context)",
        metavar="TOKENS",
    )
    # A prompt starting with tokens another request prefilled reuses their KV (in-place bundles).
    prefix_cache: bool = setting(
        True,
        "do not reuse the KV of a prompt's leading tokens that another request already prefilled",
    )
    # What an idle server keeps of it: 64-token blocks (slots x tokens per slot it holds on to).
    prefix_cache_blocks: int = setting(
        DEFAULT_PREFIX_CACHE_BLOCKS,
        "64-token blocks of prefix cache an idle server keeps (slots x tokens per slot); a busy one "
        "keeps prefixes in its free slots",
        metavar="N",
    )
    # Speculative decoding by prompt lookup for requests that do not say (their `prompt_lookup`):
    # up to this many tokens drafted per step from the prompt and the text so far, verified in one
    # pass (in-place bundles; others decode plainly). 0: off.
    prompt_lookup: int = setting(
        0,
        "speculative decoding for requests that do not set `prompt_lookup`: draft up to N tokens per "
        "step from the prompt and the text so far, verified in one pass; the same tokens, more per step "
        "where the text repeats its prompt (in-place bundles; 0 = off)",
        metavar="N",
    )
    # Speculative decoding with a draft model for every request: a smaller bundle (same tokenizer,
    # in-place KV cache; a path every replica sees) drafts up to draft_tokens tokens per step, run
    # greedily on the CPU over its own cache of the server's cache's shape (beside the KV budget:
    # its positions are the same ones, at its own bytes per position). None: off.
    draft: str | None = setting(
        None,
        "speculative decoding with a draft model for every request: this smaller bundle (the same "
        "tokenizer, in-place KV cache) drafts tokens the served model verifies in one pass; the same "
        "greedy text and the same sampled distribution, more tokens per step where it guesses right "
        "(in-place bundles on ONNX Runtime; the draft runs on the CPU). Its KV cache follows the "
        "server's: the same slots and tokens per slot, at its own bytes per token",
        metavar="BUNDLE",
    )
    draft_tokens: int = setting(
        4,
        f"most tokens the draft model proposes per step, 1..{MAX_DRAFT_TOKENS} (with --draft); fewer "
        "where its acceptance rate says so",
        metavar="K",
    )
    # Step invariance (runtime: OrtBackend's step_invariant): every pass computes attention as for
    # a chunk, so a row's logits are bitwise the same whether it verifies a draft, decodes one
    # token, or is padded beside rows that verify: greedy speculation is plain decoding, and a
    # plain request never depends on a drafting neighbour. "auto": on when the server drafts for
    # every request (prompt_lookup or draft) and the bundle has the input; "on": required; "off".
    step_invariant: str = setting(
        "auto",
        "compute attention as for a chunk in every pass, so a row's tokens are bitwise the same whether "
        "it verifies drafts, decodes one token or is padded beside rows that verify: greedy speculation is "
        "plain decoding, and a plain request never depends on a drafting neighbour (costs attention time, "
        "more at long contexts); auto: on when --prompt-lookup or --draft is set and the bundle has the "
        "input",
        choices=STEP_INVARIANT,
    )
    # limits and protection
    timeout_s: float = setting(300.0, "seconds a request may take in all", flag="--timeout")  # from arrival
    max_body_bytes: int = setting(1 << 20, "request body limit, bytes")
    # when set, every route but /health needs `Authorization: Bearer`
    api_key: str | None = setting(
        None,
        f"require `Authorization: Bearer KEY` on every route but /health (better: set ${API_KEY_ENV}, "
        "which `ps` does not show)",
        run=False,  # serve run: $GPT2_EDGE_API_KEY only
        secret=True,
    )
    # none: no CORS headers, browsers on other origins are refused
    cors_origins: tuple[str, ...] = setting(
        (), "allow browser requests from this origin (repeatable; default: CORS off)", flag="--cors-origin"
    )
    # Host names a keyless server answers for besides its loopback names (127.0.0.1, localhost,
    # [::1], at the port it listens on): "name" (any port) or "name:port"; "*" any. With an API
    # key any Host is answered. Refusing other names stops DNS rebinding from a browser.
    allowed_hosts: tuple[str, ...] = setting(
        (),
        "without an API key, answer requests whose Host header is NAME (any port) or NAME:PORT, besides "
        "127.0.0.1, localhost and [::1] at the listening port (repeatable; '*': any name). Other names get "
        "400: a web page cannot reach a loopback server by rebinding its own DNS name",
        flag="--allowed-host",
        metavar="NAME",
    )
    # slow and surplus clients (uvicorn; behind Ray Serve its proxy has the sockets)
    header_timeout_s: float = setting(  # from connecting (or the last response) to a whole request head
        10.0,
        "seconds a connection has to send a whole request head, else 408 and closed",
        flag="--header-timeout",
    )
    body_timeout_s: float = setting(  # from the request head to the end of its body: else 408
        30.0, "seconds a request's body has to arrive after its head, else 408", flag="--body-timeout"
    )
    max_connections: int = setting(  # open connections at once; one more is answered 503 and closed
        256, "open connections at once; one more is answered 503 and closed"
    )
    # where it listens, and how long in-flight requests may finish on SIGTERM
    host: str = setting("127.0.0.1", "address to bind (loopback only unless told)", run=False)
    port: int = setting(8000, "port to listen on, 1..65535", run=False)
    drain_timeout_s: float = setting(
        30.0, "on SIGTERM, seconds to finish in-flight requests", flag="--drain-timeout"
    )
    # Ray Serve
    replicas: int = setting(  # copies of the app behind Ray's proxy, each with its own model and batch
        1, "Ray Serve replicas, each its own model and batch", group=RAY
    )
    replica_cpus: float = setting(1.0, "CPUs Ray reserves per replica", group=RAY)
    # shown by /health: which replica answered (set by each replica)
    replica: str | None = setting(None, "", cli=False, run=False)

    def __post_init__(self) -> None:
        for name, low, high in (
            ("max_batch", 1, None),
            ("max_queue", 0, None),
            ("prefill_chunk", 0, None),
            ("step_tokens", 0, None),
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
        for name, what in (
            ("cors_origins", "origins"),
            ("allowed_hosts", "host names"),
            ("lora", "NAME=DIR"),
        ):
            values = getattr(self, name)
            if isinstance(values, str) or not all(isinstance(v, str) and v.strip() for v in values):
                raise SettingsError(name, f"must be a list of {what} (non-empty strings), got {values!r}")
            object.__setattr__(self, name, tuple(values))  # frozen: normalise once, here
        self.lora_adapters()

    def lora_adapters(self) -> dict[str, str]:
        """``lora`` as adapter name -> directory (refused: no ``=``, an empty part, a name twice, or
        the base model's name)."""
        out: dict[str, str] = {}
        for item in self.lora:
            name, sep, directory = item.partition("=")
            if not sep or not name.strip() or not directory.strip():
                raise SettingsError("lora", f"must be NAME=DIR, got {item!r}")
            if name in out or name == self.model_name:
                raise SettingsError("lora", f"names adapter {name!r} twice (or as the base model)")
            out[name] = directory
        return out

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
        d["lora"] = list(self.lora)
        return d


def options() -> list[tuple[dataclasses.Field[Any], Option, Any]]:
    """The table: each setting's field, ``Option`` (its ``flag`` filled in) and type (``int``,
    ``float``, ``str``, ``bool`` or ``tuple``: what a command line gives)."""
    hints = get_type_hints(ServeSettings)
    rows = []
    for f in dataclasses.fields(ServeSettings):
        option: Option = f.metadata["option"]
        kind = _kind(hints[f.name])
        if not option.flag:
            name = f.name.replace("_", "-")
            flag = f"--no-{name}" if kind is bool and f.default is True else f"--{name}"
            option = dataclasses.replace(option, flag=flag)
        rows.append((f, option, kind))
    return rows


def _kind(hint: Any) -> Any:
    if isinstance(hint, types.UnionType):  # X | None
        hint = next(a for a in hint.__args__ if a is not type(None))
    base = typing.get_origin(hint) or hint
    return base if base in (int, float, str, bool, tuple) else str
