"""serve/protocol.py without a server: bodies parsed and validated into typed requests, refusals
as 400s naming the field, and error bodies that always encode (a lone surrogate in a field's name
included)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pydantic")

from gpt2_edge.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    parse_body,
)


def refusal(raw: bytes, model=CompletionRequest) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_body(raw, model)
    err = e.value
    assert err.status == 400
    json.dumps(err.body(), ensure_ascii=False).encode("utf-8")  # what the response sends: it encodes
    return err


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt":"a","\\ud800":1}',
        b'{"prompt":"a","x\\udfffy":1}',
        b'{"\\ud800":1,"prompt":"a"}',
        b'{"prompt":"a","\\ud83d\\ude00":1}',  # a surrogate pair: a character, and still unknown
    ],
    ids=["lone", "inside-a-name", "first", "pair"],
)
def test_an_unknown_field_is_a_400_whatever_its_name_holds(raw):
    err = refusal(raw)
    assert err.code == "unknown_field" and err.message.startswith("unknown field"), err.body()
    assert err.param and err.param in err.message


def test_an_unknown_field_names_it():
    err = refusal(b'{"prompt":"a","temprature":1}')
    assert (err.code, err.param, err.message) == ("unknown_field", "temprature", "unknown field 'temprature'")


def test_a_surrogate_in_a_nested_key_or_value_names_its_field():
    err = refusal(b'{"prompt":"a","logit_bias":{"\\ud800":1}}')
    assert err.param == "logit_bias" and "surrogate" in err.message
    err = refusal(b'{"prompt":["ok","\\udfff"]}')
    assert err.param == "prompt" and "surrogate" in err.message


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\xff", "UTF-8"),
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"prompt": "O", "max_tokens": 1' + b"0" * 5000 + b"}", "digits"),
        (b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}", "nested"),
        (b'{"max_tokens": 1}', "prompt is required"),
        (b'{"prompt": "O", "max_tokens": "1"}', "max_tokens"),  # strict: no coercion
        (b'{"prompt": 3}', "prompt must be"),
    ],
)
def test_bodies_a_parser_chokes_on_are_400s(raw, words):
    assert words in refusal(raw).message


def test_sampling_fields_are_the_same_for_completions_and_chat():
    body = {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 4,
        "seed": 7,
        "stop": ["\n"],
        "repetition_penalty": 1.1,
    }
    completion = parse_body(
        json.dumps({"prompt": [1, 2], "max_tokens": 3, **body}).encode(), CompletionRequest
    )
    chat = parse_body(
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **body}).encode(),
        ChatCompletionRequest,
    )
    assert chat.as_completion([1, 2], 128).generation_config(1) == completion.generation_config(1)


def test_tokenize_takes_either_name_of_the_text_but_not_both():
    assert parse_body(b'{"content": "a"}', TokenizeRequest).text == "a"
    with pytest.raises(ApiError, match="not both"):
        _ = parse_body(b'{"content": "a", "prompt": "b"}', TokenizeRequest).text


def test_the_sampling_fields_are_declared_once():
    from gpt2_edge.serve.protocol import SamplingFields

    for model in (CompletionRequest, ChatCompletionRequest):
        assert issubclass(model, SamplingFields)
        own = set(model.model_fields) - set(SamplingFields.model_fields)
        assert not own & {"temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty"}, own


def test_a_chunk_carries_usage_only_where_asked_and_keys_in_openais_order():
    from gpt2_edge.serve.protocol import CompletionChunk, CompletionChunkChoice, Usage, sse

    choice = CompletionChunkChoice(index=0, text="a", logprobs=None, finish_reason=None)
    chunk = CompletionChunk(id="x", created=1, model="m", choices=[choice])
    assert sse(chunk, False) == (
        'data: {"id":"x","object":"text_completion","created":1,"model":"m","choices":'
        '[{"index":0,"text":"a","logprobs":null,"finish_reason":null}]}\n\n'
    )
    assert sse(chunk, True).endswith(',"usage":null}\n\n')
    chunk.usage = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    assert json.loads(sse(chunk, True)[len("data: ") :])["usage"]["total_tokens"] == 3
