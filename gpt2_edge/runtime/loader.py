"""One loader: ``load_model(path, ...)`` gives a ``Model``, what every caller builds on.

``Generator`` (the library API), the HTTP server, ``gpt2-edge bench``, the demo and the CLI all
load through here, so a bundle is checked, its provider chosen, its tokenizer read and a draft
model attached in one way. A ``Model`` says what it is through declared fields
(``Model.capabilities``: provider, device, whether its cache rolls back, step invariance, why its
rows may not be batch-invariant): nobody asks a backend what it is.

>>> from gpt2_edge.runtime import load_model
>>> model = load_model("out/bundle", provider="cpu", threads=2)
>>> model.n_ctx, model.capabilities.can_roll_back
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import Gpt2EdgeError
from .backends import ENGINE_PROVIDER, PROVIDERS, load_backend
from .bundle import Bundle
from .drafters import DraftModel
from .manifest import Manifest
from .prefix_cache import KVStore
from .tokenizer import Tokenizer
from .types import Backend, Capabilities

__all__ = ["Model", "load_model"]


@dataclass(eq=False)
class Model:
    """A loaded model: its backend (shared by every caller; thread-safe), tokenizer, manifest, and
    what it was loaded with (a draft model, a prefix store). Build one with ``load_model``; tests and
    the PyTorch reference construct it from parts."""

    backend: Backend
    tokenizer: Tokenizer
    eos_token_id: int | None
    name: str = "model"
    # The bundle it was read from (None: not read from one, as the PyTorch reference).
    bundle: Bundle | None = field(default=None, repr=False)
    # Drafts tokens for every speculative step (runtime.speculative), or None.
    draft: DraftModel | None = None
    # Past calls' KV rows reused by prompts that begin alike (``Generator``; opt-in), or None.
    prefix_store: KVStore | None = None
    load_s: float = 0.0

    @property
    def manifest(self) -> Manifest | None:
        """The bundle's typed manifest (``bundle.json``)."""
        return self.bundle.manifest if self.bundle is not None else None

    @property
    def n_ctx(self) -> int:
        """Tokens one sequence can hold (the model's context, or less for an engine)."""
        return self.backend.n_ctx

    @property
    def capabilities(self) -> Capabilities:
        """What the backend declares it is (provider, device, rollback, step invariance, ...)."""
        return self.backend.capabilities

    @property
    def provider(self) -> str:
        return self.capabilities.provider

    @property
    def step_invariant(self) -> bool:
        return self.capabilities.step_invariant

    @property
    def batch_variance(self) -> str | None:
        """Why rows decoded together could change each other's tokens (the target's reason, else the
        draft model's: a draft whose rows change each other changes a seeded request's drafts, so its
        draws), or None."""
        reason = self.capabilities.batch_variance
        if reason is None and self.draft is not None:
            reason = self.draft.backend.capabilities.batch_variance
        return reason

    @property
    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapters served at run time (``load_model(lora=...)``), by name."""
        return self.capabilities.adapters

    def adapter_id(self, name: str | None) -> int:
        """The id a cache row runs adapter ``name`` with (0: None, the base model)."""
        if name is None:
            return 0
        if name not in self.adapters:
            have = ", ".join(self.adapters) or "none (load_model(lora={name: DIR}) on a --lora-slots bundle)"
            raise Gpt2EdgeError(f"unknown LoRA adapter {name!r}; this model serves: {have}")
        return self.adapters.index(name) + 1

    @cached_property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (asked once: tokenizers counts it, ~30 ms at GPT-2's)."""
        return self.tokenizer.vocab_size

    @cached_property
    def max_prompt_chars(self) -> int:
        """No text longer than this fits the context, whatever it tokenizes to: a prompt can be
        refused by its length before any tokenizing."""
        return self.n_ctx * self.tokenizer.max_token_bytes


def load_model(
    path: str | Path,
    provider: str = "cpu",
    *,
    threads: int | None = None,
    verify: bool = True,
    draft: str | Path | None = None,
    draft_tokens: int = 4,
    prefix_cache: int = 0,
    step_invariant: bool | None = False,
    name: str | None = None,
    lora: dict[str, str | Path] | None = None,
    **options: Any,
) -> Model:
    """Load and verify the bundle at ``path`` and everything that runs it.

    ``provider``: cpu | cuda | tensorrt | auto (ONNX Runtime; auto takes the best installed, and
    OpenVINO for a bf16 bundle where it can), openvino (a bf16 bundle computed in bf16 by OpenVINO on
    a CPU with AVX512-BF16 or AMX), or trt-engine (the bundle's TensorRT engine for this GPU; ``path``
    may be an engine directory).
    ``threads``: ONNX Runtime's intra-op threads. ``verify``: re-hash every file (sizes are always
    checked). ``draft``: a smaller in-place bundle with the same tokenizer that drafts up to
    ``draft_tokens`` tokens per step (speculative decoding; on the CPU provider); the model's own
    cache must roll back (an in-place bundle on ONNX Runtime's CPU provider). ``prefix_cache``: keep
    up to this many tokens of past calls' KV and start a prompt that begins the same way from them
    (``Generator``; in-place bundles; output unchanged; memory = this many tokens x the KV bytes per
    token, 72 KiB at 124M fp32). ``step_invariant``: True = every pass computes attention as a chunk
    does, so a position's logits are bitwise the same decoded, verified or prefilled (in-place
    bundles on the CPU provider; slower at long contexts); None = so where the bundle can; False =
    off. ``lora``: adapter name -> PEFT LoRA adapter directory, served at run time by a bundle
    exported with ``--lora-slots`` (each checked: rank, shapes, targets); a call picks one by name
    (``Generator.generate(adapter=...)``, the server's ``model`` field). ``name``: the id clients
    call it by (default: the bundle directory's name). ``options`` go
    to the backend (``runtime.backends.load_backend``: ``session_config``, ``trt_*``,
    ``lane_timeout_s``; ``prompt_graph=False`` runs an int4 bundle's prompts on its int4 graph
    instead of its int8 prompt graph: less memory, slower prefill). Every refusal is one
    ``Gpt2EdgeError`` that says what to change.
    """
    if provider not in PROVIDERS:
        raise Gpt2EdgeError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
    store = KVStore(prefix_cache)  # a bad size is refused before the model loads
    if step_invariant and provider != "cpu":
        raise Gpt2EdgeError(
            f"step invariance is for in-place bundles on the CPU provider, not {provider!r}; "
            "turn it off (--step-invariant off) or use --provider cpu"
        )
    if draft is not None and provider == ENGINE_PROVIDER:
        raise Gpt2EdgeError(
            "a draft model (--draft) needs a target whose KV cache rolls back: the TensorRT engine's "
            "concatenates (use an in-place bundle on ONNX Runtime's cpu provider)"
        )
    if lora:
        if provider == ENGINE_PROVIDER:
            raise Gpt2EdgeError("run-time LoRA adapters are served by ONNX Runtime providers, not trt-engine")
        options["lora"] = dict(lora)
    if provider == "cpu" and step_invariant is not False:
        options["step_invariant"] = step_invariant  # None: OrtBackend's "where the bundle has it"
    t0 = time.perf_counter()
    if provider != ENGINE_PROVIDER:
        # The tokenizer first: parsing tokenizer.json peaks at ~40 MiB, which then does not land on
        # top of the loaded weights (peak RSS at batch 1: docs, "Memory").
        bundle = Bundle.load(path, verify=verify)
        tokenizer = bundle.tokenizer()
        backend = load_backend(bundle, provider, threads=threads, **options)
    else:
        backend = load_backend(path, provider, threads=threads, verify=verify, **options)
        bundle = backend.bundle
        assert bundle is not None  # the engine is always built from a bundle
        tokenizer = bundle.tokenizer()
    drafter = None
    if draft is not None:
        if not backend.capabilities.can_roll_back:
            raise Gpt2EdgeError(
                f"a draft model (--draft) needs a target whose KV cache rolls back: {bundle.path} has the "
                "concatenating one; export it with `--kv-cache inplace` (the ort target's default)"
            )
        drafter = DraftModel.from_bundle(draft, draft_tokens, threads=threads, verify=verify)
        drafter.attach(bundle)  # the tokenizer must be the model's
    return Model(
        backend=backend,
        tokenizer=tokenizer,
        eos_token_id=bundle.eos_token_id,
        name=name or bundle.path.name,
        bundle=bundle,
        draft=drafter,
        prefix_store=store if store.max_tokens else None,
        load_s=time.perf_counter() - t0,
    )
