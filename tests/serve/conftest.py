"""The serve tests' shared fixtures: the tiny in-place bundle they serve, and a ``Generator`` on it
(the reference a served output is compared with)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2_edge.runtime.generator import Generator


@pytest.fixture(scope="module")
def bundle(inplace_bundle) -> Path:
    return inplace_bundle


@pytest.fixture(scope="module")
def gen(bundle) -> Generator:
    return Generator.from_bundle(str(bundle), threads=1)
