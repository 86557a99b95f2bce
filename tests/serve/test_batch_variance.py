"""The server never lets one request's output depend on another's: a bundle whose rows can change
each other's logits (README, "Batch invariance and causality") is decoded one sequence at a time."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from gpt2_edge.serve.app import create_app
from gpt2_edge.serve.model import ServedModel, batch_variance
from gpt2_edge.serve.settings import ServeSettings


def backend(precision: str, kv_form: str, quantization: dict | None = None, device: str = "cpu"):
    manifest = {"quantization": quantization} if quantization is not None else {}
    bundle = SimpleNamespace(
        path="b",
        precision=precision,
        kv_form=kv_form,
        manifest=manifest,
        tokenizer_config=dict,  # no chat template: the plain one
        chat_template=lambda: None,
    )
    return SimpleNamespace(bundle=bundle, device=device, n_ctx=64)


@pytest.mark.parametrize(
    "precision, kv_form, quantization, batched",
    [
        ("fp32", "inplace", None, True),
        ("int4", "inplace", {"method": "MatMulNBits"}, True),
        ("int8-weight", "inplace", {}, True),
        ("int8-qdq", "inplace", {}, True),
        ("int8-dynamic", "inplace", {"batch_invariant": True}, True),
        ("int8-dynamic", "inplace", {"method": "onnxruntime quantize_dynamic"}, False),  # per-tensor scale
        ("fp32", "concat", None, True),
        ("fp16", "concat", {}, False),
        ("int4", "concat", {}, False),
        ("int8-weight", "concat", {}, False),
    ],
)
def test_which_bundles_are_decoded_together(precision, kv_form, quantization, batched):
    assert (batch_variance(backend(precision, kv_form, quantization)) is None) is batched


def test_gpu_backends_are_not_judged_here():
    assert batch_variance(backend("int4", "concat", {}, device="cuda")) is None


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_batch_variant_bundle_is_served_one_sequence_at_a_time(tiny_tokenizer):
    variant = ServedModel(backend("int4", "concat", {}), tiny_tokenizer, tiny_tokenizer.eos_token_id, 64, "m")
    assert variant.batch_variance and "concatenating KV cache" in variant.batch_variance
    records, log = Records(), logging.getLogger("gpt2_edge.serve")
    log.addHandler(records)
    try:
        app = create_app(variant, ServeSettings(max_batch=8))
    finally:
        log.removeHandler(records)
    assert app.state.served.engine.max_batch == 1
    assert any("one sequence at a time" in m for m in records.messages)
    plain = ServedModel(backend("fp32", "inplace"), tiny_tokenizer, tiny_tokenizer.eos_token_id, 64, "m")
    assert create_app(plain, ServeSettings(max_batch=8)).state.served.engine.max_batch == 8
