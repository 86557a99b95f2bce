"""Sampling at the edges of the float range: never NaN, never a token the limit would not pick."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_edge.runtime.sampling import GenerationConfig, TokenChooser, apply_temperature, softmax


@pytest.mark.parametrize("t", [5e-324, 1e-300, 1e-12])
def test_a_tiny_temperature_is_the_greedy_limit(t):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 97)).astype(np.float32) * 4
    warped = apply_temperature(logits.astype(np.float64), t)
    assert not np.isnan(warped).any()
    probs = softmax(warped)
    np.testing.assert_array_equal(probs.argmax(-1), logits.argmax(-1))
    np.testing.assert_allclose(probs.max(-1), 1.0)
    chooser = TokenChooser(GenerationConfig(do_sample=True, temperature=t, seed=0), eos_token_id=None)
    for _ in range(5):
        np.testing.assert_array_equal(chooser(logits, [[], [], []], 0), logits.argmax(-1))


def test_a_huge_temperature_is_uniform_not_nan():
    logits = np.array([[1e30, -1e30, 0.0, 5.0]])
    probs = softmax(apply_temperature(logits, 1e308))
    assert not np.isnan(probs).any()
    np.testing.assert_allclose(probs.sum(), 1.0)
