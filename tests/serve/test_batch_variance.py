"""The server never lets one request's output depend on another's: a bundle whose rows can change
each other's logits (docs/runtime.md, "Batch invariance and causality"; runtime.session.batch_variance) is decoded one sequence at a time."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from gpt2_edge.runtime.loader import Model
from gpt2_edge.runtime.manifest import Quantization
from gpt2_edge.runtime.session import batch_variance
from gpt2_edge.runtime.trt.backend import TrtEngineBackend
from gpt2_edge.runtime.types import Capabilities
from gpt2_edge.serve.app import create_app
from gpt2_edge.serve.settings import ServeSettings


def bundle(precision: str, kv_form: str, quantization: dict | None = None):
    q = None
    if quantization is not None:
        q = Quantization(None, None, bool(quantization.get("batch_invariant", False)), quantization)
    return SimpleNamespace(
        path="b",
        precision=precision,
        kv_form=kv_form,
        manifest=SimpleNamespace(quantization=q),
        tokenizer_config=dict,  # no chat template: the plain one
        chat_template=lambda: None,
    )


def model(precision: str, kv_form: str, tokenizer, quantization: dict | None = None) -> Model:
    """A model whose (fake) ONNX Runtime CPU backend declares what ``OrtBackend`` would."""
    b = bundle(precision, kv_form, quantization)
    backend = SimpleNamespace(bundle=b, n_ctx=64, capabilities=Capabilities("cpu", batch_variance=batch_variance(b)))
    return Model(backend, tokenizer, tokenizer.eos_token_id, name="m", bundle=b)


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
    assert (batch_variance(bundle(precision, kv_form, quantization)) is None) is batched


def test_gpu_backends_are_not_judged_here():
    # the engine declares no batch variance (scripts/gpu-check compares served with alone on the GPU)
    assert TrtEngineBackend.capabilities.batch_variance is None and TrtEngineBackend.capabilities.device == "cuda"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_batch_variant_bundle_is_served_one_sequence_at_a_time(tiny_tokenizer):
    variant = model("int4", "concat", tiny_tokenizer, {})
    assert variant.batch_variance and "concatenating KV cache" in variant.batch_variance
    records, log = Records(), logging.getLogger("gpt2_edge.serve")
    log.addHandler(records)
    try:
        app = create_app(variant, ServeSettings(max_batch=8))
    finally:
        log.removeHandler(records)
    assert app.state.served.engine.max_batch == 1
    assert any("one sequence at a time" in m for m in records.messages)
    plain = model("fp32", "inplace", tiny_tokenizer)
    assert create_app(plain, ServeSettings(max_batch=8)).state.served.engine.max_batch == 8
