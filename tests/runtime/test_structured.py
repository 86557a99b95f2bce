"""Structured output (runtime/constraints.py) and logit_bias (runtime/sampling.py): exact masks for
byte-level BPE, constrained greedy = greedy over the allowed set computed by hand, speculative =
plain, valid JSON on the shipped model, OpenAI's logit_bias semantics."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import replace

import numpy as np
import pytest

from gpt2_edge.errors import Gpt2EdgeError
from gpt2_edge.runtime import constraints as C
from gpt2_edge.runtime.constraints import Constraint, ConstraintError, compile_constraint, compile_count
from gpt2_edge.runtime.generator import Generator, decode
from gpt2_edge.runtime.sampling import GenerationConfig, TokenChooser
from gpt2_edge.runtime.sequence import SequenceState
from gpt2_edge.runtime.speculative import DraftModel
from gpt2_edge.runtime.tokenizer import Tokenizer
from tests.bundles import INPLACE, SHIPPED, spec

llguidance = pytest.importorskip("llguidance")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "member"],
    "additionalProperties": False,
}
CONSTRAINTS = [
    Constraint.json_schema(PERSON),
    Constraint.json_object(),
    Constraint.regex(r"[0-9]{3}-[a-z]{2,5}"),
    Constraint.choice(["positive", "negative", "neutral"]),
    Constraint.grammar('root ::= "x=" [0-9]+ ";"'),
    Constraint.grammar('start: "id:" /[a-f]{4}/'),
]


@pytest.fixture(scope="module")
def shipped(make_bundle) -> Generator:
    return Generator.from_bundle(str(make_bundle(SHIPPED)), threads=1)


@pytest.fixture(scope="module")
def tiny(make_bundle) -> Generator:
    return Generator.from_bundle(str(make_bundle(INPLACE)), threads=1)


def by_hand(gen: Generator, prompt: str, constraint: Constraint, max_new_tokens: int) -> list[int]:
    """Greedy decoding with the constraint's allowed set computed by llguidance directly (its own
    tokenizer and matcher, none of runtime/constraints.py) and argmax taken over it."""
    tok = gen.tokenizer
    lltok = llguidance.LLTokenizer(tok.to_json(), eos_token=tok.eos_token_id)
    kind = {"json_object": "json_schema", "json_schema": "json_schema", "regex": "regex", "choice": "choice"}
    fmt = kind.get(constraint.kind, "grammar")
    if fmt == "json_schema":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(constraint.text, defaults=C.JSON_LAYOUT)
    else:
        grammar = llguidance.grammar_from(fmt, constraint.text)
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    ids = tok.encode(prompt)
    cache = gen.backend.new_cache(1, len(ids) + max_new_tokens)
    logits = cache.prefill([0], [ids])[0]
    out: list[int] = []
    for _ in range(max_new_tokens):
        allowed = np.frombuffer(matcher.compute_logit_bias(), dtype=np.uint8)[: len(logits)] > 0
        pick = int(np.flatnonzero(allowed)[np.argmax(logits[allowed])])
        out.append(pick)
        if pick == tok.eos_token_id:
            break
        assert matcher.consume_token(pick)
        if matcher.is_stopped():
            break
        logits = cache.decode([0], [pick])[0]
    return out


# masks ------------------------------------------------------------------------------------------
def test_constraint_values_are_hashable_and_canonical():
    a = Constraint.json_schema({"type": "object", "properties": {"b": {}, "a": {}}})
    b = Constraint.json_schema('{"type": "object",  "properties": {"b": {}, "a": {}}}')
    assert a == b and hash(a) == hash(b)
    assert a.text.index('"b"') < a.text.index('"a"')  # property order is output order: kept
    cfg = GenerationConfig(constraint=a, logit_bias={"5": 1, 3: -2})
    assert hash(cfg) == hash(replace(cfg)) and cfg.logit_bias == ((3, -2.0), (5, 1.0))
    for bad in (lambda: Constraint.choice([]), lambda: Constraint.choice("ab"), lambda: Constraint.regex("")):
        with pytest.raises(ConstraintError):
            bad()
    with pytest.raises(ConstraintError, match="not valid JSON"):
        Constraint.json_schema("{nope")


@pytest.mark.parametrize(
    "options",
    [["yes", "yesterday", "no thanks", "n/a"], ["yesterday", "yesterdays"], ["abcde", "abcdx", " x"]],
)
@pytest.mark.parametrize("vocabulary", ["shipped", "gpt2"])
def test_choice_masks_are_exact_for_byte_level_bpe(request, options, vocabulary):
    """Every token whose bytes keep the text a prefix of an option is allowed, and no other: tokens
    that cross an option's end or span two parts of it included; eos exactly when complete. Where
    the constraint forces the next bytes, llguidance writes them in their canonical tokenization:
    the mask is then that tokenization's first token alone (when it has two or more tokens, or
    ends the text), which the brute force below predicts too."""
    if vocabulary == "gpt2":  # GPT-2's own 50,257 tokens
        tok = Tokenizer.from_vocab_merges(*request.getfixturevalue("gpt2_bpe_files"))
    else:  # the shipped model's 8,192
        tok = request.getfixturevalue("shipped").tokenizer
    state = compile_constraint(tok, Constraint.choice(options)).start()
    texts = [tok.decode([t]) for t in range(tok.vocab_size)]
    text = ""
    for step in tok.encode(options[0]):
        viable = [o[len(text) :] for o in options if o.startswith(text)]
        forced = os.path.commonprefix(viable)  # noqa: RUF071 (strings, not paths)
        canonical = tok.encode(forced) if forced else []
        if len(canonical) >= 2 or (forced and viable == [forced]):
            expect = {canonical[0]}
        else:
            expect = {
                t for t, piece in enumerate(texts) if piece and any(v.startswith(piece) for v in viable)
            }
        expect.discard(tok.eos_token_id)
        allowed = state.allowed()
        assert set(np.flatnonzero(allowed).tolist()) - {tok.eos_token_id} == expect, text
        assert bool(allowed[tok.eos_token_id]) == (text in options)
        state.advance(step)
        text += texts[step]
    assert text == options[0]
    assert state.complete == (not any(o != text and o.startswith(text) for o in options))


def test_eos_is_allowed_exactly_when_the_constraint_accepts(shipped):
    tok = shipped.tokenizer
    state = compile_constraint(tok, Constraint.regex(r"[0-9]+"), shipped.model.vocab_size).start()
    assert not state.allowed()[tok.eos_token_id] and not state.accepting
    state.advance(tok.encode("7")[0])
    assert state.allowed()[tok.eos_token_id] and state.accepting and not state.complete


def test_the_same_constraint_compiles_once(shipped):
    tok = shipped.tokenizer
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    before = compile_count(tok)
    a = compile_constraint(tok, Constraint.json_schema(schema), shipped.model.vocab_size)
    b = compile_constraint(tok, Constraint.json_schema(json.dumps(schema)), shipped.model.vocab_size)
    assert a is b and compile_count(tok) == before + 1
    cfg = GenerationConfig(max_new_tokens=8, constraint=Constraint.json_schema(schema))
    shipped.generate(["a", "b"], cfg)
    shipped.generate("c", cfg)
    assert compile_count(tok) == before + 1


@pytest.mark.parametrize(
    "bad",
    [
        Constraint.json_schema({"type": "nonsense"}),
        Constraint.regex("(unclosed"),
        Constraint.grammar("root ::= missing"),
        Constraint.grammar("start: a\na: b"),
    ],
)
def test_what_does_not_compile_is_refused_on_one_line(shipped, bad):
    with pytest.raises(ConstraintError, match="does not compile") as e:
        shipped.generate("x", GenerationConfig(constraint=bad))
    assert "\n" not in str(e.value)
    with pytest.raises(ConstraintError, match="does not compile"):
        C.validate_constraint(bad)


def test_a_missing_llguidance_names_the_extra(monkeypatch, tiny_tokenizer):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    other = type(tiny_tokenizer)(tiny_tokenizer._tok)  # a tokenizer not compiled for yet
    with pytest.raises(ConstraintError, match=re.escape("pip install 'gpt2-edge[structured]'")):
        compile_constraint(other, Constraint.regex("a"))


# decoding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=lambda c: c.kind)
def test_constrained_greedy_is_greedy_over_the_allowed_set(shipped, tiny, constraint):
    for gen in (shipped, tiny):
        for prompt in ("The person:", "Once upon a time"):
            got = gen.generate(prompt, GenerationConfig(max_new_tokens=24, constraint=constraint))[0]
            assert got.token_ids == by_hand(gen, prompt, constraint, 24)


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=lambda c: c.kind)
def test_speculative_constrained_greedy_is_plain_constrained_greedy(make_bundle, shipped, tiny, constraint):
    draft = DraftModel.from_bundle(make_bundle(spec(model=INPLACE.model)), max_tokens=4)
    prompts = ["The person: The person:", "Once upon a time, once upon a time", "x"]
    cfg = GenerationConfig(max_new_tokens=24, constraint=constraint)
    for gen, drafts in ((shipped, [None]), (tiny, [None, draft])):
        plain = [r.token_ids for r in gen.generate(prompts, cfg)]
        for d in drafts:
            g = Generator(replace(gen.model, draft=d))
            assert [r.token_ids for r in g.generate(prompts, replace(cfg, prompt_lookup=4))] == plain
            assert [g.generate(p, replace(cfg, prompt_lookup=3))[0].token_ids for p in prompts] == plain


def test_outputs_match_their_constraint_and_end_with_stop(shipped):
    prompts = ["The", "A list:", "Answer:"]
    cases = [
        (Constraint.regex(r"[0-9]{3}-[a-z]{2,5}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t)),
        (Constraint.choice(["positive", "negative"]), lambda t: t in ("positive", "negative")),
        (Constraint.grammar('root ::= "x=" [0-9] [0-9] ";"'), lambda t: re.fullmatch(r"x=[0-9]{2};", t)),
        (Constraint.grammar('start: "id:" /[a-f]{4}/'), lambda t: re.fullmatch(r"id:[a-f]{4}", t)),
    ]
    for constraint, ok in cases:
        for sample in (False, True):
            cfg = GenerationConfig(max_new_tokens=20, constraint=constraint, do_sample=sample, seed=1)
            for r in shipped.generate(prompts, cfg):
                assert ok(r.text), (constraint, r.text)
                assert r.finish_reason in ("stop", "eos")


def test_schema_valid_json_every_time_on_the_shipped_model(shipped):
    """100 prompts, greedy and sampled: each output parses and fits the schema."""
    words = shipped.tokenizer.decode(list(range(300, 400))).split()
    prompts = [f"{words[i % len(words)]} {i}:" for i in range(100)]
    constraint = Constraint.json_schema(PERSON)
    outs = []
    for sample, batch in ((False, prompts[:50]), (True, prompts[50:])):
        cfg = GenerationConfig(max_new_tokens=48, constraint=constraint, do_sample=sample, seed=7)
        for i in range(0, len(batch), 25):
            outs += shipped.generate(batch[i : i + 25], cfg)
    assert len(outs) == 100
    for r in outs:
        assert r.finish_reason in ("stop", "eos"), r.text
        _validate(json.loads(r.text), PERSON)


def _validate(value: object, schema: dict) -> None:
    try:
        import jsonschema
    except ImportError:  # the torch-free venv: the schema's rules by hand
        assert isinstance(value, dict) and set(value) == set(schema["required"])
        assert isinstance(value["name"], str) and len(value["name"]) <= 12
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
        assert value["city"] in ("Paris", "Oslo", "Lima") and isinstance(value["member"], bool)
        return
    jsonschema.validate(value, schema)


def test_streaming_and_the_sequence_state_keep_to_the_constraint(shipped):
    constraint = Constraint.regex(r"[0-9]{2}:[0-9]{2}")
    cfg = GenerationConfig(max_new_tokens=12, constraint=constraint)
    whole = shipped.generate("Time:", cfg)[0]
    assert "".join(shipped.stream("Time:", cfg)) == whole.text
    compiled = shipped.compile(cfg)
    ids = shipped.encode("Time:")
    state = SequenceState(ids, cfg, shipped.eos_token_id, shipped.tokenizer.decode, compiled)
    cache = shipped.backend.new_cache(1, 32)
    logits = cache.prefill([0], [ids])[0]
    while True:
        state.append(state.choose(logits))
        if state.finished:
            break
        logits = cache.decode([0], [state.generated[-1]])[0]
    assert state.generated == whole.token_ids and state.finish_reason == "stop"
    with pytest.raises(Gpt2EdgeError, match="compiled"):
        SequenceState(ids, cfg, shipped.eos_token_id, shipped.tokenizer.decode)


def test_constraints_refuse_beam_search_and_ignore_eos():
    with pytest.raises(Gpt2EdgeError, match="num_beams=1"):
        GenerationConfig(constraint=Constraint.json_object(), num_beams=2)
    with pytest.raises(Gpt2EdgeError, match="ignore_eos"):
        GenerationConfig(constraint=Constraint.json_object(), ignore_eos=True)
    with pytest.raises(Gpt2EdgeError, match="Constraint"):
        GenerationConfig(constraint="json")


# logit_bias -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({1: 101}, r"outside \[-100, 100\]"),
        ({1: float("nan")}, r"outside \[-100, 100\]"),
        ({-1: 1}, "not a token id"),
        ({"x": 1}, "not a token id"),
        ({1: "a"}, "must be a number"),
        ({i: 1 for i in range(301)}, "at most 300"),
        ("5:1", "dict of token id"),
    ],
)
def test_logit_bias_is_checked_by_name(bias, message):
    with pytest.raises(Gpt2EdgeError, match=message):
        GenerationConfig(logit_bias=bias)


def test_logit_bias_outside_the_vocabulary_is_refused(tiny):
    with pytest.raises(Gpt2EdgeError, match="not in this vocabulary"):
        tiny.generate("a", GenerationConfig(logit_bias={tiny.model.vocab_size: 1}))


def test_logit_bias_bans_and_forces_in_every_decoding(tiny, tiny_tokenizer):
    prompts = ["the king", "and so"]
    plain = tiny.generate(prompts, GenerationConfig(max_new_tokens=12, ignore_eos=True))
    banned = {t: -100 for r in plain for t in r.token_ids[:3]}
    forced = {t: 100 for t in (7, 42)}
    for extra in ({}, {"prompt_lookup": 4}, {"do_sample": True, "seed": 3}, {"num_beams": 3}):
        cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True, **extra)
        for r in tiny.generate(prompts, replace(cfg, logit_bias=banned)):
            assert not set(r.token_ids) & set(banned)
        for r in tiny.generate(prompts, replace(cfg, logit_bias=forced)):
            assert set(r.token_ids) <= set(forced)


def test_logit_bias_shifts_sampling_and_speculation_equals_plain(tiny):
    chooser = TokenChooser(GenerationConfig(do_sample=True, seed=0, logit_bias={3: 4.0}), None)
    logits = np.zeros((4000, 10))
    picks = chooser(logits, [[]] * 4000, 0)
    share = np.mean(picks == 3)  # e^4 / (e^4 + 9)
    assert abs(share - np.exp(4) / (np.exp(4) + 9)) < 0.03
    prompts = ["the king the king", "and so and so"]
    cfg = GenerationConfig(max_new_tokens=20, ignore_eos=True, logit_bias={5: 3.0, 9: -100, 11: 2.5})
    plain = [r.token_ids for r in tiny.generate(prompts, cfg)]
    assert [r.token_ids for r in tiny.generate(prompts, replace(cfg, prompt_lookup=4))] == plain


def test_a_forced_token_the_constraint_forbids_yields_to_the_constraint(tiny):
    constraint = Constraint.regex("[0-9]+")
    digit = tiny.tokenizer.encode("5")[0]
    letter = tiny.tokenizer.encode("e")[0]
    r = tiny.generate(
        "a", GenerationConfig(max_new_tokens=4, constraint=constraint, logit_bias={letter: 100})
    )[0]
    assert re.fullmatch("[0-9]*", r.text)
    r = tiny.generate(
        "a", GenerationConfig(max_new_tokens=4, constraint=constraint, logit_bias={digit: 100})
    )[0]
    assert r.text == "5555"


def test_masks_computed_while_the_model_runs_change_nothing(shipped):
    cfg = GenerationConfig(
        max_new_tokens=30, constraint=Constraint.json_schema(PERSON), do_sample=True, seed=4
    )
    prompts = [shipped.encode(p) for p in ("a", "The person is", "b c")]
    kw = dict(eos_token_id=shipped.eos_token_id, n_ctx=shipped.n_ctx, detokenize=shipped.tokenizer.decode)
    runs = [
        decode(shipped.backend, prompts, cfg, constraint=shipped.compile(cfg), mask_ahead=ahead, **kw)
        for ahead in (True, False)
    ]
    assert [r.token_ids for r in runs[0]] == [r.token_ids for r in runs[1]]


def test_a_failed_matcher_ends_its_sequence_alone(shipped):
    """A matcher in error (llguidance's parser limits, say) ends its own sequence with eos and
    finish reason "error", saying why; nothing raises into a batch's loop."""
    tok = shipped.tokenizer
    cfg = GenerationConfig(max_new_tokens=8, constraint=Constraint.regex("[0-9]+"))
    state = SequenceState(tok.encode("a"), cfg, tok.eos_token_id, tok.decode, shipped.compile(cfg))
    assert not state.constraint.matcher.consume_token(tok.encode("x")[0])  # not a digit: it fails
    token = state.choose(np.zeros(shipped.model.vocab_size, np.float32))
    assert token == tok.eos_token_id
    state.append(token)
    assert state.finish_reason == "error" and "regex" in state.constraint.error


@pytest.mark.parametrize("options", [["no"], ["yes", "yesterday"]])
def test_drafts_ending_in_eos_are_checked_and_leave_the_matcher_as_it_was(shipped, options):
    """A drafted eos where the constraint accepts (complete, or could go on) counts as valid, and
    looking along a draft leaves the matcher where it was (llguidance keeps no rollback record of
    an eos it takes: the runtime never feeds it one)."""
    tok = shipped.tokenizer
    state = compile_constraint(tok, Constraint.choice(options)).start()
    ids = tok.encode(options[0])
    before = state.allowed().copy()
    draft = [*ids, tok.eos_token_id, ids[0]]
    assert state.valid_prefix(draft) == len(ids) + 1
    masks = state.masks_along(draft[: len(ids) + 1])
    assert len(masks) == len(ids) + 2 and masks[-2][tok.eos_token_id]
    assert (state.allowed() == before).all()
    for t in ids:
        assert state.advance(t)
    assert not state.advance(tok.eos_token_id) and state.accepting


def test_llguidance_is_imported_only_when_a_constraint_is_used(tiny):
    import os
    import subprocess

    code = (
        "import sys; from gpt2_edge import Generator, GenerationConfig, Constraint; "
        f"g = Generator.from_bundle({str(tiny.model.bundle.path)!r}); "
        "g.generate('a', GenerationConfig(max_new_tokens=2, logit_bias={1: 5})); "
        "Constraint.regex('a'); print('llguidance' in sys.modules, end=' '); "
        "g.generate('a', GenerationConfig(max_new_tokens=2, constraint=Constraint.regex('a'))); "
        "print('llguidance' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout == "False True\n"


def test_greedy_with_masks_is_the_masked_argmax_row_by_row():
    # The greedy shortcut (a row whose top token is allowed keeps it; only barred rows are masked)
    # against the argmax of the masked logits, with ties, free rows, a row with nothing allowed.
    rng = np.random.default_rng(0)
    chooser = TokenChooser(GenerationConfig(), None)
    for _ in range(200):
        logits = rng.integers(0, 4, size=(5, 40)).astype(np.float32)  # many ties
        allowed = [rng.random(40) < 0.3 for _ in range(5)]
        allowed[1] = None
        allowed[2][:] = False
        allowed[3][int(np.argmax(logits[3]))] = True  # its top token allowed
        want = [
            int(np.argmax(np.where(a, x, -np.inf) if a is not None else x))
            for a, x in zip(allowed, logits, strict=True)
        ]
        assert chooser(logits, [[]] * 5, 0, allowed).tolist() == want
