"""Execution providers: a provider that is installed but fails to load is an error, not a fallback."""

from __future__ import annotations

import pytest

from gpt2_edge.export.bundle import export_bundle
from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.session import OrtBackend, ProviderError

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def concat_bundle(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("prov") / "b"
    return export_bundle(tiny_checkpoint, out, target="tensorrt", log=lambda _: None)


def test_a_provider_that_falls_back_is_refused(concat_bundle, monkeypatch):
    """onnxruntime-gpu without libnvinfer retries on CUDA and only prints (seen on an H100)."""
    import onnxruntime as ort

    real = ort.InferenceSession

    class FellBack(real):
        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def session(path, so, providers):
        return FellBack(path, so, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session)
    have = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: have)
    with pytest.raises(
        ProviderError,
        match=r"TensorrtExecutionProvider is installed but failed to load .*"
        r"fell back to CUDAExecutionProvider",
    ):
        OrtBackend(Bundle.load(concat_bundle), provider="tensorrt")


def test_inplace_bundles_refuse_gpu_providers(tiny_checkpoint, tmp_path, monkeypatch):
    import onnxruntime as ort

    b = export_bundle(tiny_checkpoint, tmp_path / "ip", log=lambda _: None)
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(ProviderError, match="in-place KV cache .* CPU provider only.*--kv-cache concat"):
        OrtBackend(Bundle.load(b), provider="cuda")
