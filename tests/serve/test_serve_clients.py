"""Real clients with their defaults: the requests lm-evaluation-harness and guidellm send, and
the fields they read, asserted as they read them.

- lm-eval 0.4.13, ``--model local-completions`` (lm_eval/models/openai_completions.py,
  lm_eval/models/api_models.py) auto-detects the remote tokenizer (lm_eval/utils.py
  ``check_remote_tokenizer_support`` / ``RemoteTokenizer``): ``GET /tokenizer_info`` needs
  ``eos_token``; ``POST /tokenize {"prompt", "add_special_tokens": false}`` -> ``tokens``;
  ``POST /detokenize {"tokens"}`` -> ``prompt``; ``chat_template`` for ``--apply_chat_template``.
  Its loglikelihood posts ``{"model", "prompt": [[ids]], "temperature": 0, "max_tokens": 1,
  "logprobs": 1, "seed", "echo": true}`` and reads ``choices`` (sorted by ``index``)
  ``.logprobs.token_logprobs[ctxlen:-1]`` and ``.top_logprobs[ctxlen:-1]`` (greedy = each
  token's logprob is its top one). ``max_tokens: 0`` (vLLM, OpenAI's legacy API) scores a prompt
  that fills the whole context.
- guidellm 0.8.1's OpenAI HTTP backend (guidellm/backends/openai/request_handlers.py) posts to
  ``/v1/chat/completions`` by default, with ``stream``, ``stream_options: {"include_usage",
  "continuous_usage_stats"}``, ``max_completion_tokens`` + ``ignore_eos`` (exactly that many
  tokens), a system message and a user message of text parts, no ``None`` fields; it reads each
  chunk's ``choices[0].delta.content`` and ``usage`` (the last one wins). Its ``/v1/completions``
  form sends ``max_tokens`` and reads ``choices[0].text``.

In-process (the ASGI app through Starlette's test client); the module needs no client installed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from gpt2_edge.runtime.loader import Model, load_model
from gpt2_edge.runtime.sampling import log_softmax
from gpt2_edge.serve.app import ServeSettings, create_app
from gpt2_edge.serve.chat import DEFAULT_TEMPLATE, ChatTemplate

pytestmark = pytest.mark.filterwarnings("ignore")

JSON = {"Content-Type": "application/json"}
GUIDELLM_STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


@pytest.fixture(scope="module")
def model(inplace_bundle) -> Model:
    return load_model(inplace_bundle, threads=1, name="tiny")


@pytest.fixture(scope="module")
def client(model) -> Iterator[TestClient]:
    # base_url: a keyless server answers loopback names only (not TestClient's "testserver")
    with TestClient(
        create_app(model, ServeSettings(max_batch=4, max_queue=8)), base_url="http://localhost"
    ) as c:
        yield c


def post(client: TestClient, path: str, body: dict | bytes):
    if isinstance(body, bytes):
        return client.post(path, content=body, headers=JSON)
    return client.post(path, json=body, headers=JSON)


def sse(client: TestClient, path: str, body: dict) -> list:
    """The JSON bodies of a stream, and "[DONE]" where it came."""
    with client.stream("POST", path, json=body, headers=JSON) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    out = []
    for line in lines:
        data = line[len("data:") :].strip()
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def reference_logprobs(model: Model, ids: list[int]) -> list[float]:
    """log P(ids[i] | ids[:i]) for i >= 1, from one full pass of the backend."""
    logits = model.backend.logits(np.asarray([ids], np.int64))[0]
    return [float(log_softmax(logits[i - 1].astype(np.float64))[ids[i]]) for i in range(1, len(ids))]


# lm-evaluation-harness ----------------------------------------------------------------------------
def test_lm_eval_detects_the_remote_tokenizer_and_round_trips_through_it(client, model):
    # check_remote_tokenizer_support: /tokenizer_info is a dict with eos_token; /tokenize answers tokens
    info = client.get("/tokenizer_info")
    assert info.status_code == 200, info.text
    info = info.json()
    assert info["eos_token"] == info["bos_token"] == model.tokenizer.eos_token
    assert info["pad_token"] is None and info["tokenizer_class"] == "GPT2TokenizerFast"
    assert info["model_max_length"] == model.n_ctx
    assert info["chat_template"] == DEFAULT_TEMPLATE  # RemoteTokenizer.apply_chat_template renders it
    r = post(client, "/tokenize", {"prompt": "test", "add_special_tokens": False})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["tokens"], list)
    # RemoteTokenizer.encode / .eos_token_id / .decode
    text = "First Citizen:\nBefore we proceed"
    t = post(client, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert t == {
        "tokens": model.tokenizer.encode(text),
        "count": len(t["tokens"]),
        "max_model_len": model.n_ctx,
    }
    eos = post(client, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"][0] == model.eos_token_id
    d = post(client, "/detokenize", {"tokens": t["tokens"]}).json()
    assert d["prompt"] == text
    # llama-server's names for the same routes
    assert post(client, "/tokenize", {"content": text, "add_special": False}).json()["tokens"] == t["tokens"]
    assert d["content"] == text


def lm_eval_parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """LocalCompletionsAPI.parse_logprobs (lm_eval/models/openai_completions.py, 0.4.13)."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens, strict=False):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops, strict=False))))
    return res


def test_lm_eval_loglikelihood_requests_score_the_continuations(client, model):
    tok = model.tokenizer
    pairs = [("First Citizen:\nBefore we", " proceed any further"), ("All:\n", "Speak, speak.")]
    inputs, ctxlens = [], []
    for context, continuation in pairs:
        inputs.append(tok.encode(context) + tok.encode(continuation))
        ctxlens.append(len(tok.encode(context)))
    body = {"model": "tiny", "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234}
    one = post(client, "/v1/completions", {**body, "echo": True})
    assert one.status_code == 200, one.text
    for (total, greedy), ids, ctxlen in zip(
        lm_eval_parse_logprobs(one.json(), ctxlens), inputs, ctxlens, strict=True
    ):
        assert total == pytest.approx(sum(reference_logprobs(model, ids)[ctxlen - 1 :]), abs=1e-4)
        assert isinstance(greedy, bool)
    # max_tokens 0: the same prompt scores, and nothing generated
    zero = post(client, "/v1/completions", {**body, "max_tokens": 0, "echo": True})
    assert zero.status_code == 200, zero.text
    for c0, c1, ids in zip(zero.json()["choices"], one.json()["choices"], inputs, strict=True):
        assert c0["finish_reason"] == "length"
        assert len(c0["logprobs"]["token_logprobs"]) == len(ids) == len(c1["logprobs"]["token_logprobs"]) - 1
        assert c0["logprobs"]["token_logprobs"] == c1["logprobs"]["token_logprobs"][:-1]
        assert c0["logprobs"]["top_logprobs"] == c1["logprobs"]["top_logprobs"][:-1]
        assert c0["text"] == tok.decode(ids)
    assert zero.json()["usage"]["completion_tokens"] == 0


def test_max_tokens_0_scores_a_prompt_that_fills_the_whole_context(client, model):
    ids = (model.tokenizer.encode("First Citizen:\nSpeak, speak. ") * model.n_ctx)[: model.n_ctx]
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    r = post(client, "/v1/completions", body)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == model.n_ctx and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(reference_logprobs(model, ids), abs=1e-4)
    assert choice["finish_reason"] == "length"
    assert r.json()["usage"] == {
        "prompt_tokens": model.n_ctx,
        "completion_tokens": 0,
        "total_tokens": model.n_ctx,
    }
    # one more token does not fit: the old bound, still there for generation
    r = post(client, "/v1/completions", {**body, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # streamed: one chunk per prompt with its text, scores and finish_reason, then [DONE]
    events = sse(client, "/v1/completions", {**body, "prompt": ids[:5], "stream": True})
    assert events[-1] == "[DONE]" and len(events) == 2
    (c,) = events[0]["choices"]
    assert c["text"] == model.tokenizer.decode(ids[:5]) and c["finish_reason"] == "length"
    assert len(c["logprobs"]["token_logprobs"]) == 5
    # echo without logprobs: the prompt back, nothing else
    r = post(client, "/v1/completions", {"prompt": "All:\nSpeak", "max_tokens": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == "All:\nSpeak" and r["choices"][0]["logprobs"] is None


# guidellm ------------------------------------------------------------------------------------------
def guidellm_chat_body(max_tokens: int) -> dict:
    """ChatCompletionsRequestHandler.format with stream=True and output_tokens set (None dropped)."""
    return {
        "model": "tiny",
        "stream": True,
        "stream_options": GUIDELLM_STREAM_OPTIONS,
        "max_completion_tokens": max_tokens,
        "ignore_eos": True,
        "messages": [
            {"role": "system", "content": "All:"},
            {"role": "user", "content": [{"type": "text", "text": "Speak"}]},
        ],
    }


def test_guidellm_chat_stream_reads_delta_content_and_usage_per_chunk(client, model):
    events = sse(client, "/v1/chat/completions", guidellm_chat_body(12))
    assert events[-1] == "[DONE]"
    texts, usages = [], []
    for e in events[:-1]:  # ChatCompletionsRequestHandler.add_streaming_line
        assert "error" not in e
        assert e["object"] == "chat.completion.chunk" and e["id"].startswith("chatcmpl-")
        choices = e.get("choices", [])
        if choices and (content := choices[0].get("delta", {}).get("content")):
            texts.append(content)
        if e.get("usage"):
            usages.append(e["usage"])
    assert len(usages) == len(events) - 1  # continuous_usage_stats: every chunk
    prompt = model.tokenizer.encode("System: All:\nUser: Speak\nAssistant:")
    final = usages[-1]  # include_usage: the last chunk, choices []
    assert events[-2]["choices"] == []
    assert final == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}
    assert [u["completion_tokens"] for u in usages] == sorted(u["completion_tokens"] for u in usages)
    assert "".join(texts)
    first = events[0]["choices"][0]
    assert first["delta"]["role"] == "assistant" and first["finish_reason"] is None
    assert [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]] == ["length"]


def test_guidellm_text_completions_stream_with_ignore_eos(client, model):
    body = {
        "model": "tiny",
        "stream": True,
        "stream_options": GUIDELLM_STREAM_OPTIONS,
        "max_tokens": 10,
        "ignore_eos": True,
        "prompt": "First Citizen: Before we proceed",
    }
    events = sse(client, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    assert all(e["usage"] for e in events[:-1])
    assert events[-2]["usage"]["completion_tokens"] == 10
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])


def test_ignore_eos_decodes_past_the_end_of_text(client, model):
    """A request that stops at eos without ignore_eos runs to max_tokens with it."""
    eos = model.eos_token_id
    # Prompt with eos after eos: the tiny model then likes eos; find one that stops early.
    body = {"prompt": [eos] * 4, "max_tokens": 40, "temperature": 0}
    plain = post(client, "/v1/completions", body).json()
    ignoring = post(client, "/v1/completions", {**body, "ignore_eos": True}).json()
    assert (
        ignoring["usage"]["completion_tokens"] == 40 and ignoring["choices"][0]["finish_reason"] == "length"
    )
    if plain["choices"][0]["finish_reason"] == "stop":
        assert plain["usage"]["completion_tokens"] < 40


# chat ------------------------------------------------------------------------------------------------
def test_chat_completion_is_openais_shape_and_the_default_template(client, model):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Speak"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    r = post(client, "/v1/chat/completions", {**body, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    chat = r.json()
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    (choice,) = chat["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    # the default template: "User: ...\nAssistant:", the answer stops at the next "\nUser:"
    same = post(
        client,
        "/v1/completions",
        {"prompt": "User: Speak\nAssistant:", "max_tokens": 8, "temperature": 0, "stop": ["\nUser:"]},
    ).json()
    assert choice["message"]["content"] == same["choices"][0]["text"]
    assert choice["finish_reason"] == same["choices"][0]["finish_reason"]
    assert chat["usage"] == same["usage"]
    content = choice["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy
        assert entry["bytes"] == list(entry["token"].encode())
    # the stream's deltas join to the same answer
    events = sse(client, "/v1/chat/completions", {**body, "stream": True})
    assert (
        "".join(c["delta"].get("content", "") for e in events[:-1] for c in e["choices"])
        == choice["message"]["content"]
    )
    openai = pytest.importorskip("openai")  # the official client's own types accept the bodies
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    ChatCompletion.model_validate(chat)
    for e in events[:-1]:
        ChatCompletionChunk.model_validate(e)
    assert openai


def test_default_template_renders_the_same_in_jinja():
    jinja2 = pytest.importorskip("jinja2")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as lm-eval and transformers render
    rendered = env.from_string(DEFAULT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert rendered == ChatTemplate().render(messages)
    assert rendered == "System: Be brief.\nUser: Hi\nthere\nAssistant: Hello.\nUser: Bye\nAssistant:"


def bundle_with(src: Path, dst: Path, files: dict[str, str], listed: bool = True) -> Path:
    """A copy of the bundle ``src`` with ``files`` added (and listed in its manifest)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "bundle.json").read_text())
    for name, text in files.items():
        (dst / name).write_text(text)
        if listed:
            data = (dst / name).read_bytes()
            manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (dst / "bundle.json").write_text(json.dumps(manifest))
    return dst


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_bundles_own_chat_template_is_rendered_and_shown(tmp_path, inplace_bundle):
    pytest.importorskip("jinja2")
    config = {"tokenizer_class": "GPT2TokenizerFast", "eos_token": "<|endoftext|>", "chat_template": TEMPLATE}
    path = bundle_with(inplace_bundle, tmp_path / "chat", {"tokenizer_config.json": json.dumps(config)})
    m = load_model(path, threads=1, name="tiny")
    with TestClient(create_app(m, ServeSettings(max_batch=2, max_queue=2)), base_url="http://localhost") as c:
        assert c.get("/tokenizer_info").json()["chat_template"] == TEMPLATE
        body = {"messages": [{"role": "user", "content": "Speak"}], "max_tokens": 4, "temperature": 0}
        r = post(c, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        rendered = "<|endoftext|><|user|>Speak\n<|assistant|>"
        assert r.json()["usage"]["prompt_tokens"] == len(m.tokenizer.encode(rendered))
        same = post(c, "/v1/completions", {"prompt": rendered, "max_tokens": 4, "temperature": 0}).json()
        assert r.json()["choices"][0]["message"]["content"] == same["choices"][0]["text"]  # no "\nUser:" stop
        bad = post(c, "/v1/chat/completions", {**body, "messages": [{"role": "tool", "content": "x"}]})
        assert bad.status_code == 400 and "no tools here" in bad.json()["error"]["message"]
    # the list form of tokenizer_config.json, and chat_template.jinja (which wins)
    listed = {
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}]
    }
    path = bundle_with(inplace_bundle, tmp_path / "list", {"tokenizer_config.json": json.dumps(listed)})
    assert ChatTemplate.for_model(load_model(path, threads=1)).source == TEMPLATE
    path = bundle_with(path, tmp_path / "jinja", {"chat_template.jinja": "{{ messages[0]['content'] }}"})
    assert ChatTemplate.for_model(load_model(path, threads=1)).source.startswith("{{ messages")
    # a file the manifest does not list is not the bundle's: the default template
    path = bundle_with(inplace_bundle, tmp_path / "unlisted", {"chat_template.jinja": TEMPLATE}, listed=False)
    assert ChatTemplate.for_model(load_model(path, threads=1)).is_default


def test_a_template_that_cannot_be_rendered_stops_the_server_at_startup(monkeypatch):
    from gpt2_edge.serve.chat import ChatTemplateError

    pytest.importorskip("jinja2")
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        ChatTemplate("{% for m in messages %}")
    monkeypatch.setitem(sys.modules, "jinja2", None)  # not installed
    with pytest.raises(ChatTemplateError, match="pip install jinja2"):
        ChatTemplate(TEMPLATE)
    assert (
        ChatTemplate().render([{"role": "user", "content": "Hi"}]) == "User: Hi\nAssistant:"
    )  # no jinja2 needed


# refusals, each naming its field ----------------------------------------------------------------------
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BAD = [
    # (id, path, body, param, words in the message)
    ("tokenize-lone-surrogate", "/tokenize", b'{"prompt": "a\\ud800b"}', "prompt", "surrogate"),
    ("tokenize-both", "/tokenize", {"prompt": "a", "content": "b"}, "prompt", "not both"),
    ("tokenize-neither", "/tokenize", {"add_special_tokens": False}, "prompt", "required"),
    ("max-tokens-0-without-echo", "/v1/completions", {"prompt": "O", "max_tokens": 0}, "max_tokens", "echo"),
    (
        "chat-unknown-role",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
        "messages",
        "wizard",
    ),
    (
        "chat-image-part",
        "/v1/chat/completions",
        {
            **CHAT,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        },
        "messages",
        "image_url",
    ),
    ("chat-no-messages", "/v1/chat/completions", {**CHAT, "messages": []}, "messages", "messages"),
    (
        "chat-max-tokens-differ",
        "/v1/chat/completions",
        {**CHAT, "max_completion_tokens": 3},
        "max_completion_tokens",
        "differ",
    ),
    (
        "chat-top-logprobs-alone",
        "/v1/chat/completions",
        {**CHAT, "top_logprobs": 2},
        "top_logprobs",
        "logprobs",
    ),
    (
        "chat-too-long",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]},
        "messages",
        "characters",
    ),
    ("chat-no-room", "/v1/chat/completions", {**CHAT, "max_tokens": 10_000}, "max_tokens", "context"),
    (
        "chat-lone-surrogate",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
        "messages",
        "surrogate",
    ),
    ("chat-unknown-field", "/v1/chat/completions", {**CHAT, "tools": []}, "tools", "unknown"),
    (
        "chat-penalty",
        "/v1/chat/completions",
        {**CHAT, "presence_penalty": 1},
        "presence_penalty",
        "not supported",
    ),
]


@pytest.mark.parametrize(("path", "body", "param", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_client_mistakes_get_a_400_naming_the_field(client, path, body, param, words):
    r = post(client, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
