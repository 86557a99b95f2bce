"""What the server serves: one backend (any provider), its tokenizer, eos id, context and name, and
the draft model that drafts for it (``--draft``), if any."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import Gpt2EdgeError
from ..runtime.backends import ENGINE_PROVIDER, load_backend
from ..runtime.drafters import DraftModel
from ..runtime.types import Backend

# Precisions whose rows stay within 1.1e-5 of each other with the concatenating cache's left padding
# (fp32: the attention sums only run in another order); the others move by up to a quantization
# step (README, "Batch invariance and causality").
CONCAT_BATCH_SAFE = ("fp32",)


def batch_variance(backend: Any) -> str | None:
    """Why rows decoded together on ``backend`` could change each other's tokens, or ``None``.

    Measured on ONNX Runtime's CPU provider: the in-place cache is bitwise batch-invariant for
    every precision except int8-dynamic bundles made with ONNX Runtime's per-tensor activation
    scale (``DynamicQuantizeLinear``, before per-row scales); the concatenating cache only for fp32.
    GPU providers and the TensorRT engine are not judged here (``scripts/gpu-check`` compares the
    served output with ``Generator`` alone on them)."""
    bundle = getattr(backend, "bundle", None)
    if bundle is None or getattr(backend, "device", "cpu") != "cpu":
        return None
    quantization = bundle.manifest.get("quantization") or {}
    if bundle.precision == "int8-dynamic" and not quantization.get("batch_invariant"):
        return (
            f"{bundle.path} is an int8-dynamic bundle with one activation scale per tensor (made before "
            "per-row scales), so rows change each other's logits; quantize it again"
        )
    if bundle.kv_form == "concat" and bundle.precision not in CONCAT_BATCH_SAFE:
        return (
            f"{bundle.path} is a {bundle.precision} bundle with the concatenating KV cache, whose padded "
            "rows can move a quantized activation by a step; use the in-place cache (the ort target)"
        )
    return None


class ServedModel:
    """A backend (shared by the scheduler and prompt scoring; thread-safe), its tokenizer, eos id,
    the tokens one sequence may hold (``n_ctx``), the id clients call it by, and ``draft``: the draft
    model of speculative decoding (only the scheduler runs it), or None."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Any,
        eos_token_id: int | None,
        n_ctx: int,
        name: str,
        draft: DraftModel | None = None,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.n_ctx = n_ctx
        self.name = name
        self.draft = draft
        self.step_invariant: bool = bool(getattr(backend, "step_invariant", False))
        self.vocab_size: int = tokenizer.vocab_size
        # No text longer than this fits the context, whatever it tokenizes to: a prompt or a
        # /tokenize text is refused by its length before any tokenizing (a 1 MB body stays cheap).
        self.max_prompt_chars: int = n_ctx * tokenizer.max_token_bytes
        # Set when rows decoded together could change each other's tokens: then the server
        # decodes one sequence at a time, so a request's output never depends on the others.
        # A draft model whose rows change each other would change a seeded request's drafts, so
        # its draws: the same rule.
        self.batch_variance: str | None = batch_variance(backend) or (
            batch_variance(draft.backend) if draft is not None else None
        )

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        name: str | None = None,
        verify: bool = True,
        draft: str | Path | None = None,
        draft_tokens: int = 4,
        step_invariant: bool | None = False,
        **options: Any,
    ) -> ServedModel:
        """Load and verify the bundle at ``path`` on ``provider`` (any of
        ``runtime.backends.PROVIDERS``: ONNX Runtime's cpu, cuda, tensorrt, auto, or the native
        TensorRT engine, trt-engine); ``options`` go to the backend (``load_backend``).

        ``draft``: a smaller bundle with the same tokenizer and the in-place KV cache that drafts up
        to ``draft_tokens`` tokens per step for every request (on ONNX Runtime's CPU provider);
        the target must roll back too (an in-place bundle on ONNX Runtime). ``step_invariant``:
        True = every pass computes attention as for a chunk (``OrtBackend``; refused where the
        bundle cannot), None = so where the bundle can (an in-place bundle with the input, on the
        CPU provider), False = off. Every refusal is one ``Gpt2EdgeError`` that says what to change."""
        if draft is not None and provider == ENGINE_PROVIDER:
            raise Gpt2EdgeError(
                "a draft model (--draft) needs a target whose KV cache rolls back: the TensorRT engine's "
                "concatenates (serve an in-place bundle on an ONNX Runtime provider)"
            )
        if step_invariant and provider != "cpu":
            raise Gpt2EdgeError(
                f"step invariance is for in-place bundles on the cpu provider, not {provider!r}; "
                "use --step-invariant off (or auto)"
            )
        if provider == "cpu" and step_invariant is not False:
            options["step_invariant"] = step_invariant  # None: OrtBackend's "where the bundle has it"
        backend: Any = load_backend(path, provider, threads=threads, verify=verify, **options)
        bundle = backend.bundle
        drafter = None
        if draft is not None:
            if bundle.kv_form != "inplace":
                raise Gpt2EdgeError(
                    f"a draft model (--draft) needs a target whose KV cache rolls back: {bundle.path} has "
                    "the concatenating one; export it with `--kv-cache inplace` (the ort target's default)"
                )
            drafter = DraftModel.from_bundle(draft, draft_tokens, threads=threads, verify=verify)
            drafter.attach(bundle)  # the tokenizer must be the target's
        return cls(
            backend,
            bundle.tokenizer(),
            bundle.eos_token_id,
            backend.n_ctx,
            name or bundle.path.name,
            draft=drafter,
        )
