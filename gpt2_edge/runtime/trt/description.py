"""``EngineDescription``: what running an engine needs to know about it, fixed when it is loaded.

The backend reads the bundle, ``engine.json`` and the deserialized engine's I/O tensors once,
checks they agree, and freezes the result here: tensor names and dtypes, model dims, the
optimization profiles and limits, the pad id and the prefill chunk. A runner (``runner.py``) reads
only this and its lane pool (``lanes.py``), never the backend; ``scripts/device-smoke.py`` builds
one by hand for a toy engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from .api import IoTensor
from .errors import EngineError
from .plan import EngineManifest
from .shapes import Profile

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


@dataclass(frozen=True)
class EngineDescription:
    """One engine's I/O, dims, profiles and limits, as a runner uses them."""

    source: Path  # the bundle, named in rebuild hints
    ids_dtype: np.dtype  # input_ids, as the engine takes it
    mask_dtype: np.dtype  # attention_mask
    pos_dtype: np.dtype  # position_ids
    past_names: tuple[str, ...]  # past_key_values.{i}.key / .value, in the bundle's order
    present_names: tuple[str, ...]  # present.{i}.key / .value, matching past_names
    kv_dtype: np.dtype
    logits_dtype: np.dtype
    n_head: int
    head_size: int
    vocab: int
    profiles: tuple[Profile, ...]  # every lane's, indexed as the engine numbers them
    max_batch: int  # sequences one cache may hold (--max-batch)
    max_context: int  # tokens the profiles admit (--max-context)
    n_ctx: int  # tokens one sequence can hold: the model's context or max_context, the smaller
    pad_id: int  # fills the rows of a re-padded batch
    prefill_chunk: int  # prompt tokens per engine run; longer prompts run in chunks

    @classmethod
    def of(
        cls, bundle: Bundle, manifest: EngineManifest, io: list[IoTensor], plan_file: Path
    ) -> EngineDescription:
        """The description of ``plan_file``'s engine, whose I/O tensors are ``io``; refuses an
        engine whose inputs and outputs differ from the bundle's contract."""
        by_name = {t.name: t for t in io}
        want_in = [s.name for s in bundle.inputs]
        want_out = [s.name for s in bundle.outputs]
        got_in = [t.name for t in io if t.is_input]
        got_out = [t.name for t in io if not t.is_input]
        if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
            raise EngineError(
                f"{plan_file}'s inputs/outputs differ from {bundle.path}'s bundle.json; rebuild the engine"
            )
        past = tuple(n for n in want_in if n.startswith(PAST_PREFIX))
        present = tuple(PRESENT_PREFIX + n[len(PAST_PREFIX) :] for n in past)
        if not past or any(n not in by_name for n in present):
            raise EngineError(
                f"{plan_file} lacks present outputs matching its past inputs; rebuild the engine"
            )
        d = bundle.dims
        n_ctx = min(bundle.context_length, manifest.max_context)
        return cls(
            source=bundle.path,
            ids_dtype=by_name["input_ids"].dtype,
            mask_dtype=by_name["attention_mask"].dtype,
            pos_dtype=by_name["position_ids"].dtype,
            past_names=past,
            present_names=present,
            kv_dtype=by_name[past[0]].dtype,
            logits_dtype=by_name["logits"].dtype,
            n_head=d.n_head,
            head_size=d.head_size,
            vocab=d.vocab_size,
            profiles=tuple(manifest.profiles),
            max_batch=manifest.max_batch,
            max_context=manifest.max_context,
            n_ctx=n_ctx,
            pad_id=bundle.eos_token_id if bundle.eos_token_id is not None else 0,
            prefill_chunk=max(
                (p.shapes["input_ids"].opt[1] for p in manifest.profiles if p.phase == "prefill"),
                default=n_ctx,
            ),
        )
