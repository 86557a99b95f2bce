"""Step invariance in the server (``serve --step-invariant auto|on|off``).

A speculating server verifies some rows' drafts in the same pass as other rows' single tokens,
padded to the widest chunk. Without step invariance a padded one-token row takes another attention
kernel than a one-token step, so its logits (and, at a near-tie, its token) depend on whether a
neighbour drafted. With it, a plain request's log-probabilities are bitwise the same alone and
beside drafting requests; "auto" turns it on where the server drafts for every request.
"""

from __future__ import annotations

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from gpt2_edge.runtime.generator import Generator  # noqa: E402
from gpt2_edge.runtime.sampling import GenerationConfig  # noqa: E402
from gpt2_edge.serve.settings import ServeSettings, SettingsError  # noqa: E402
from tests.serve.helpers import Run  # noqa: E402
from tests.serve.test_serve import free_port, serving  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
SAMPLED = dict(max_new_tokens=30, ignore_eos=True, prompt_lookup=6, do_sample=True, temperature=0.3)


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(4)
    out = []
    for n in (9, 14, 6, 11):
        p = rng.integers(0, vocab - 1, n).tolist()
        out.append(p + p[:4])  # repeats its beginning: prompt lookup drafts
    return out


def plain_logprobs(gen: Generator, beside: bool) -> list[list[tuple[int, float]]]:
    """The top-2 log-probabilities of a plain greedy request's tokens, served alone or beside three
    sampled requests that draft (prompt lookup), through one scheduler."""
    ps = prompts(gen.tokenizer.vocab_size)
    run = Run(gen, max_batch=4, prefill_chunk=0)
    plain = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    run.engine.start()
    seqs = [run.sequence("plain", ps[0], plain, logprobs=2)]
    if beside:
        # sampled: each drafts what its own rate is worth whatever the batch holds (greedy rows
        # of a batch draft only where the whole pass gains)
        seqs += [
            run.sequence(f"spec{i}", p, GenerationConfig(**SAMPLED, seed=i)) for i, p in enumerate(ps[1:])
        ]
    run.engine.submit(seqs)
    run.wait(close=True)
    if beside:
        assert run.metrics.spec_drafted_tokens._value.get() > 0
    return [list(e.top_logprobs) for e in run.events["plain"]]


def test_a_plain_request_beside_drafting_ones_is_bitwise_the_same_as_alone(inplace_bundle):
    gen = Generator.from_bundle(str(inplace_bundle), threads=1, step_invariant=True)
    assert plain_logprobs(gen, beside=True) == plain_logprobs(gen, beside=False)


def test_without_it_a_drafting_neighbour_moves_the_last_bits(inplace_bundle):
    """Why the server turns it on when it drafts (ONNX Runtime's CPU kernels on this machine)."""
    gen = Generator.from_bundle(str(inplace_bundle), threads=1)
    alone, beside = plain_logprobs(gen, beside=False), plain_logprobs(gen, beside=True)
    assert [[t for t, _ in e] for e in alone] == [[t for t, _ in e] for e in beside]  # no near-tie here
    if alone == beside:
        pytest.skip("this CPU's attention kernels agree for one row and for a chunk")
    diff = max(
        abs(a[1] - b[1]) for x, y in zip(alone, beside, strict=True) for a, b in zip(x, y, strict=True)
    )
    assert 0 < diff < 1e-4


def test_auto_is_on_where_the_server_drafts_for_every_request(inplace_bundle, concat_bundle):
    assert ServeSettings().step_invariance() is False
    assert ServeSettings(prompt_lookup=4).step_invariance() is None  # where the bundle can
    assert ServeSettings(draft="d").step_invariance() is None
    assert ServeSettings(step_invariant="on").step_invariance() is True
    assert ServeSettings(prompt_lookup=4, step_invariant="off").step_invariance() is False
    with pytest.raises(SettingsError, match="step_invariant must be one of auto, on, off"):
        ServeSettings(step_invariant="yes")
    with serving(inplace_bundle, max_batch=2) as s:
        assert httpx.get(f"{s.url}/health").json()["step_invariant"] is False
    from gpt2_edge.runtime.loader import load_model

    assert load_model(inplace_bundle, threads=1, step_invariant=None).step_invariant
    # a bundle without the input (the concatenating form): auto stays off, "on" is refused
    assert not load_model(concat_bundle, threads=1, step_invariant=None).step_invariant


def test_on_where_the_bundle_cannot_is_a_one_line_error(concat_bundle, capsys, monkeypatch):
    import gpt2_edge.serve.cli as cli

    def never(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(cli, "run_app", never)
    argv = [str(concat_bundle), "--step-invariant", "on", "--port", str(free_port()), "--log-level", "error"]
    assert cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no `step_invariant` input" in lines[0], lines
