"""Execution providers: a provider that is installed but fails to load is an error, not a fallback."""

from __future__ import annotations

import shutil

import pytest

from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.session import OrtBackend, ProviderError

pytestmark = pytest.mark.filterwarnings("ignore")


def test_a_provider_that_falls_back_is_refused(trt_target_bundle, tmp_path, monkeypatch):
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
        # a copy: the TensorRT provider's engine cache goes into the bundle's engines/
        OrtBackend(Bundle.load(shutil.copytree(trt_target_bundle, tmp_path / "b")), provider="tensorrt")


def test_inplace_bundles_refuse_gpu_providers(inplace_bundle, monkeypatch):
    import onnxruntime as ort

    b = inplace_bundle
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(ProviderError, match="in-place KV cache .* CPU provider only.*--kv-cache concat"):
        OrtBackend(Bundle.load(b), provider="cuda")
