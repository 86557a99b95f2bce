"""Beam search honours stop strings: a continuation ends at a stop string as it ends at eos."""

from __future__ import annotations

import pytest

from gpt2_edge.runtime.generator import decode
from gpt2_edge.runtime.sampling import GenerationConfig
from tests.helpers import random_gpt, tiny_config


def char(token: int) -> str:
    return chr(0x4E00 + token)  # one character per token: a stop string of one char is one token


def detokenize(ids) -> str:
    return "".join(char(t) for t in ids)


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("torch")
    from gpt2_edge.model.generate import TorchBackend

    return TorchBackend(random_gpt(tiny_config(), seed=5))


def beams(backend, prompt, eos=None, **kw):
    # the repetition penalty keeps the random model from repeating one token
    cfg = GenerationConfig(max_new_tokens=10, num_beams=3, repetition_penalty=1.5, **kw)
    return decode(backend, [prompt], cfg, eos_token_id=eos, n_ctx=64, detokenize=detokenize)[0]


PROMPT = [7, 100, 3, 3, 41]


@pytest.mark.parametrize("at", [0, 2, 5])
@pytest.mark.parametrize("kw", [{}, dict(early_stopping=True), dict(length_penalty=0.0)])
def test_a_one_token_stop_string_ends_beams_as_eos_does(backend, at, kw):
    plain = beams(backend, PROMPT, **kw)
    token = plain.token_ids[at]  # a token the unstopped search produces
    as_eos = beams(backend, PROMPT, eos=token, **kw)
    stopped = beams(backend, PROMPT, stop=[char(token)], **kw)
    assert stopped.token_ids == as_eos.token_ids  # the same search, the same winner
    assert stopped.text == as_eos.text and char(token) not in stopped.text
    assert stopped.finish_reason == ("stop" if as_eos.finish_reason == "eos" else as_eos.finish_reason)


def test_a_stop_string_across_tokens_cuts_the_text(backend):
    plain = beams(backend, PROMPT)
    stop = plain.text[3:5]  # two tokens of the unstopped winner
    out = beams(backend, PROMPT, stop=["never there", stop])
    assert stop not in out.text and out.finish_reason == "stop"
    full = detokenize(out.token_ids)
    assert full.startswith(out.text) and full[len(out.text) :].startswith(stop)
    assert stop not in detokenize(out.token_ids[:-1])  # it ended at the token that completed it


def test_without_a_match_stop_strings_change_nothing(backend):
    plain = beams(backend, PROMPT)
    out = beams(backend, PROMPT, stop=["never there"])
    assert (out.token_ids, out.text, out.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)
