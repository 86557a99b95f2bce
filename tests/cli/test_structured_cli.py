"""`gpt2-edge generate` with structured output (--json-schema, --json-object, --regex, --choice,
--grammar) and --logit-bias: the same tokens as the library, one-line errors (exit 2) before the
model loads."""

from __future__ import annotations

import json
import re

import pytest

from gpt2_edge.cli import main
from gpt2_edge.runtime.constraints import Constraint
from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig

pytest.importorskip("llguidance")
pytestmark = pytest.mark.filterwarnings("ignore")

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["n"],
    "additionalProperties": False,
}


def generate(capsys, bundle, *flags: str) -> dict:
    argv = ["generate", str(bundle), "--prompt", "the king", "--max-new-tokens", "20", "--json", *flags]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_each_flag_gives_the_librarys_tokens(inplace_bundle, capsys, tmp_path):
    gen = Generator.from_bundle(str(inplace_bundle), threads=1)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    grammar_file = tmp_path / "g.gbnf"
    grammar_file.write_text('root ::= "x=" [0-9]+')
    cases = [
        (["--json-schema", json.dumps(SCHEMA)], Constraint.json_schema(SCHEMA)),
        (["--json-schema", str(schema_file)], Constraint.json_schema(SCHEMA)),
        (["--json-object"], Constraint.json_object()),
        (["--regex", "[a-c]{2,4}"], Constraint.regex("[a-c]{2,4}")),
        (["--choice", "red,green", "--choice", "blue"], Constraint.choice(["red", "green", "blue"])),
        (["--grammar", str(grammar_file)], Constraint.grammar('root ::= "x=" [0-9]+')),
    ]
    for flags, constraint in cases:
        out = generate(capsys, inplace_bundle, *flags)
        expect = gen.generate("the king", GenerationConfig(max_new_tokens=20, constraint=constraint))[0]
        assert out["token_ids"] == expect.token_ids, flags
    assert re.fullmatch("[a-c]{2,4}", generate(capsys, inplace_bundle, "--regex", "[a-c]{2,4}")["text"])
    assert generate(capsys, inplace_bundle, "--choice", "red,green")["text"] in ("red", "green")


def test_logit_bias_flags(inplace_bundle, capsys):
    out = generate(capsys, inplace_bundle, "--logit-bias", "7:100", "--max-new-tokens", "4")
    assert out["token_ids"] == [7, 7, 7, 7]
    out = generate(capsys, inplace_bundle, "--logit-bias", '{"7": 100, "9": 100}', "--max-new-tokens", "6")
    assert set(out["token_ids"]) <= {7, 9}
    plain = generate(capsys, inplace_bundle)["token_ids"]
    banned = generate(capsys, inplace_bundle, "--logit-bias", f"{plain[0]}:-100")["token_ids"]
    assert plain[0] not in banned


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--json-schema", '{"type": "nonsense"}'], "--json-schema: json_schema"),
        (["--json-schema", "{nope"], "not valid JSON"),
        (["--json-schema", "/nonexistent/schema.json"], "No such file"),
        (["--regex", "(a"], "--regex: regex '(a' does not compile"),
        (["--grammar", "/nonexistent.gbnf"], "No such file"),
        (["--regex", "a", "--json-object"], "--json-object and --regex both"),
        (["--logit-bias", "5"], "ID:BIAS"),
        (["--logit-bias", "5:101"], "outside [-100, 100]"),
        (["--logit-bias", "[1]"], "ID:BIAS"),
        (["--json-object", "--num-beams", "2"], "num_beams=1"),
    ],
)
def test_mistakes_are_one_line_before_the_model_loads(capsys, flags, words):
    # no model argument at all: the default model is a checkpoint that would need torch to load,
    # so these fail before anything loads
    assert main(["generate", "--prompt", "a", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_logit_bias_outside_the_vocabulary(inplace_bundle, capsys):
    assert main(["generate", str(inplace_bundle), "--prompt", "a", "--logit-bias", "300:1"]) == 2
    assert "not in this vocabulary (0..299)" in capsys.readouterr().err
