"""A bundle with run-time LoRA slots quantizes like any other: the slot inputs stay float32 (the
low-rank branches take no constant weight, so the quantizers leave them fp32) and adapters load."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_edge.runtime.loader import load_model
from tests.bundles import LORA_SLOTS
from tests.lora_helpers import write_adapter

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("precision", ["int8-dynamic", "int4"])
def test_slot_bundle_quantizes_and_takes_adapters(precision, make_bundle, tmp_path):
    from gpt2_edge.quantize.pipeline import quantize_bundle

    out = quantize_bundle(make_bundle(LORA_SLOTS), precision, tmp_path / "q", force=True)[0]
    model = load_model(out, lora={"a": write_adapter(tmp_path / "a")})
    assert model.manifest.lora_slots is not None and model.manifest.precision == precision
    cache = model.backend.new_cache(2, 16)
    cache.set_adapter(0, 1)
    rows = cache.prefill([0, 1], [[5, 6, 7], [5, 6, 7]])
    alone = load_model(out).backend.new_cache(1, 16).prefill([0], [[5, 6, 7]])[0]
    assert np.array_equal(rows[1], alone)  # the row without an adapter: the plain path, bitwise
    assert np.abs(rows[0] - rows[1]).max() > 0.01
