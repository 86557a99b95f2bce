"""Structured output and logit_bias on the server: OpenAI's response_format, vLLM's guided_* and
structured_outputs, llama-server's json_schema and grammar, on both routes; refusals at admission;
constrained and free rows in one continuous batch; the openai client's response_format."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("llguidance")

from fastapi.testclient import TestClient

from gpt2_edge.runtime.constraints import Constraint, compile_count
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.loader import Model, load_model
from gpt2_edge.runtime.sampling import GenerationConfig, openai_generation_config
from gpt2_edge.serve.app import ServeSettings, create_app
from tests.serve.helpers import Run

pytestmark = pytest.mark.filterwarnings("ignore")

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
    "additionalProperties": False,
}
LARK = 'start: "id:" /[a-f]{3}/'
GBNF = 'root ::= "x=" [0-9] [0-9]'
# each request field, and the constraint it means
FIELDS = [
    ({"response_format": {"type": "json_object"}}, Constraint.json_object()),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "r", "schema": SCHEMA, "strict": True},
            }
        },
        Constraint.json_schema(SCHEMA),
    ),
    ({"guided_json": SCHEMA}, Constraint.json_schema(SCHEMA)),
    ({"guided_regex": "[0-9]{2}-[a-z]{2}"}, Constraint.regex("[0-9]{2}-[a-z]{2}")),
    ({"guided_choice": ["red", "green"]}, Constraint.choice(["red", "green"])),
    ({"guided_grammar": LARK}, Constraint.grammar(LARK)),
    ({"structured_outputs": {"json": SCHEMA}}, Constraint.json_schema(SCHEMA)),
    ({"structured_outputs": {"json_object": True}}, Constraint.json_object()),
    ({"structured_outputs": {"regex": "a[bc]+"}}, Constraint.regex("a[bc]+")),
    ({"structured_outputs": {"choice": ["up", "down"]}}, Constraint.choice(["up", "down"])),
    ({"structured_outputs": {"grammar": GBNF}}, Constraint.grammar(GBNF)),
    ({"json_schema": SCHEMA}, Constraint.json_schema(SCHEMA)),
    ({"grammar": GBNF}, Constraint.grammar(GBNF)),
]


@pytest.fixture(scope="module")
def model(inplace_bundle) -> Model:
    return load_model(inplace_bundle, threads=1, name="tiny")


@pytest.fixture(scope="module")
def gen(model) -> Generator:
    return Generator(model)


@pytest.fixture(scope="module")
def client(model) -> Iterator[TestClient]:
    with TestClient(
        create_app(model, ServeSettings(max_batch=4, max_queue=16)), base_url="http://localhost"
    ) as c:
        yield c


def post(client: TestClient, path: str, body: dict):
    return client.post(path, json=body)


@pytest.mark.parametrize(
    ("field", "constraint"), FIELDS, ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else ""
)
def test_every_field_constrains_completions_as_the_library_does(client, gen, field, constraint):
    prompt = "the king"
    expect = gen.generate(prompt, GenerationConfig(max_new_tokens=24, constraint=constraint))[0]
    for lookup in (0, 4):
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "prompt_lookup": lookup, **field}
        r = post(client, "/v1/completions", body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == expect.text
        assert choice["finish_reason"] == {"eos": "stop"}.get(expect.finish_reason, expect.finish_reason)


@pytest.mark.parametrize("field", [FIELDS[0][0], FIELDS[1][0], FIELDS[4][0], FIELDS[12][0]], ids=str)
def test_chat_takes_the_same_fields(client, field):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 24, "temperature": 0}
    r = post(client, "/v1/chat/completions", {**body, **field})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    reason = r.json()["choices"][0]["finish_reason"]
    if "guided_choice" in field:
        assert content in ("red", "green") and reason == "stop"
    if field.get("response_format", {}).get("type") == "json_schema":
        if reason == "stop":
            value = json.loads(content)
            assert set(value) == {"n", "ok"}
    if "grammar" in field:
        assert re.fullmatch(r"x=[0-9]{0,2}", content)


def test_a_schema_valid_answer_streams_too(client, gen):
    body = {"prompt": "a", "max_tokens": 30, "temperature": 0, "stream": True, "guided_json": SCHEMA}
    with client.stream("POST", "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(
        json.loads(line[6:])["choices"][0]["text"] for line in lines if json.loads(line[6:])["choices"]
    )
    expect = gen.generate("a", GenerationConfig(max_new_tokens=30, constraint=Constraint.json_schema(SCHEMA)))
    assert text == expect[0].text


BAD = [
    ({"guided_json": {"type": "nonsense"}}, "guided_json", "does not compile"),
    ({"guided_regex": "(a"}, "guided_regex", "does not compile"),
    ({"grammar": "root ::= missing"}, "grammar", "does not compile"),
    ({"structured_outputs": {"grammar": "start: a\na: b"}}, "structured_outputs.grammar", "does not compile"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
        "response_format",
        "does not compile",
    ),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs its json_schema"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_regex": "a", "json_schema": SCHEMA}, "json_schema", "guided_regex and json_schema"),
    (
        {"response_format": {"type": "json_object"}, "guided_choice": ["a"]},
        "guided_choice",
        "response_format and guided_choice",
    ),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice", "both"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "outside [-100, 100]"),
    ({"logit_bias": {"99999": 1}}, "logit_bias", "not in this vocabulary"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "not a token id"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
]


@pytest.mark.parametrize(("field", "param", "words"), BAD, ids=[b[1] + "-" + b[2] for b in BAD])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_refused_at_admission_naming_the_field(client, field, param, words, route):
    before = client.get("/metrics").text
    base = {"prompt": "a"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "a"}]}
    r = post(client, route, {**base, "max_tokens": 4, **field})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert "\n" not in err["message"]
    after = client.get("/metrics").text
    assert _generated(after) == _generated(before)  # refused before any decoding


def _generated(metrics: str) -> float:
    m = re.search(r"^gpt2_edge_generation_tokens_total (\S+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_text_response_format_changes_nothing(client):
    body = {"prompt": "the", "max_tokens": 8, "temperature": 0}
    plain = post(client, "/v1/completions", body).json()["choices"][0]["text"]
    r = post(client, "/v1/completions", {**body, "response_format": {"type": "text"}})
    assert r.json()["choices"][0]["text"] == plain


def test_the_same_schema_compiles_once_across_requests(client, model):
    schema = {"type": "object", "properties": {"z": {"type": "integer"}}, "required": ["z"]}
    before = compile_count(model.tokenizer)
    for _ in range(3):
        r = post(client, "/v1/completions", {"prompt": "a", "max_tokens": 4, "guided_json": schema})
        assert r.status_code == 200
    assert compile_count(model.tokenizer) == before + 1


def test_logit_bias_on_both_routes(client, gen, model):
    body = {"prompt": "the king", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = post(client, "/v1/completions", body).json()["choices"][0]
    first = gen.tokenizer.encode(plain["text"])[0]
    banned = post(client, "/v1/completions", {**body, "logit_bias": {str(first): -100}}).json()["choices"][0]
    assert not banned["text"].startswith(gen.tokenizer.decode([first]))
    expect = gen.generate(
        "the king", GenerationConfig(max_new_tokens=6, ignore_eos=True, logit_bias={first: -100})
    )
    assert banned["text"] == expect[0].text
    forced = post(client, "/v1/completions", {**body, "logit_bias": {"7": 100}}).json()["choices"][0]
    assert forced["text"] == gen.tokenizer.decode([7] * 6)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logit_bias": {"7": 100}}
    r = post(client, "/v1/chat/completions", chat)
    assert r.json()["choices"][0]["message"]["content"] == gen.tokenizer.decode([7] * 3)


def test_free_and_constrained_rows_in_one_batch_are_each_as_alone(gen):
    """A free row is unchanged by constrained rows beside it, and each constrained row (greedy,
    sampled, drafting by prompt lookup) gives what it gives alone."""
    tok = gen.tokenizer
    rows = [
        (
            "free",
            tok.encode("the king and"),
            openai_generation_config(max_tokens=20, temperature=0, ignore_eos=True),
        ),
        ("free-sampled", tok.encode("so"), openai_generation_config(max_tokens=16, temperature=0.8, seed=3)),
        (
            "json",
            tok.encode("a"),
            GenerationConfig(max_new_tokens=30, constraint=Constraint.json_schema(SCHEMA)),
        ),
        (
            "regex-lookup",
            tok.encode("the the the"),
            GenerationConfig(max_new_tokens=20, constraint=Constraint.regex("[a-z ]{3,30}"), prompt_lookup=3),
        ),
        (
            "choice-sampled",
            tok.encode("b"),
            openai_generation_config(
                max_tokens=10, temperature=1.0, seed=5, constraint=Constraint.choice(["yes", "no"])
            ),
        ),
    ]
    run = Run(gen, max_batch=len(rows))
    run.engine.start()
    run.engine.submit([run.sequence(name, p, c) for name, p, c in rows])
    run.wait(close=True)
    for name, p, c in rows:
        assert run.tokens[name] == run.alone(p, c), name


def test_the_openai_client_sends_response_format(client, gen):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=client, max_retries=0)
    schema_format = {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA, "strict": True}}
    out = oc.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=30,
        temperature=0,
        response_format=schema_format,
    )
    text = out.choices[0].message.content
    if out.choices[0].finish_reason == "stop":
        assert set(json.loads(text)) == {"n", "ok"}
    comp = oc.completions.create(
        model="tiny", prompt="a", max_tokens=30, temperature=0, extra_body={"guided_choice": ["red", "green"]}
    )
    assert comp.choices[0].text in ("red", "green")
    jo = oc.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=12,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert jo.choices[0].message.content.startswith("{")


def test_a_failed_matcher_fails_its_request_alone(gen):
    """A constrained sequence whose matcher fails gets an error event; the free row beside it
    decodes as it does alone."""
    import threading

    from gpt2_edge.serve.engine import Engine
    from gpt2_edge.serve.sequences import SequenceHandle

    tok = gen.tokenizer
    engine = Engine(gen.backend, n_ctx=gen.backend.n_ctx, max_batch=2)
    events: dict[str, list] = {"broken": [], "free": []}
    done = threading.Semaphore(0)

    def sink(name):
        def put(event):
            events[name].append(event)
            if event.error is not None or event.finish_reason is not None:
                done.release()

        return put

    broken_cfg = GenerationConfig(max_new_tokens=8, constraint=Constraint.regex("[0-9]+"))
    free_cfg = openai_generation_config(max_tokens=12, temperature=0, ignore_eos=True)
    handles = {
        name: SequenceHandle(
            tok.encode(p),
            c,
            sink(name),
            eos_token_id=gen.eos_token_id,
            detokenize=tok.decode,
            constraint=gen.compile(c),
        )
        for name, p, c in (("broken", "a", broken_cfg), ("free", "the king", free_cfg))
    }
    assert not handles["broken"].state.constraint.matcher.consume_token(tok.encode("x")[0])
    engine.start()
    engine.submit(list(handles.values()))
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    engine.close()
    assert "structured output failed" in events["broken"][-1].error
    assert [e.token for e in events["free"]] == gen.generate("the king", free_cfg)[0].token_ids
