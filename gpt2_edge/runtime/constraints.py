"""Structured output: what a sequence may say, as a token mask for each next position. Torch-free.

A ``Constraint`` (a JSON schema, any JSON object, a regular expression, a choice among strings, a
Lark or GBNF grammar) is plain frozen data in ``GenerationConfig.constraint``. ``llguidance``
(the ``structured`` extra; used by llama.cpp, vLLM and SGLang) turns it into exact token masks for
this byte-level BPE vocabulary, tokens that cross the pattern's boundaries included; it is
imported only when a constraint is used.

    compile_constraint(tokenizer, constraint)  -> CompiledConstraint   cached: one compile per
                                                  (tokenizer, constraint), bounded LRU
    CompiledConstraint.start()                 -> ConstraintState      one per sequence
    ConstraintState.allowed()                  -> (V,) bool            the next position's mask
    ConstraintState.advance(token)                                     after a token is taken

Compiling builds llguidance's matcher once (the grammar, its lexer); each sequence's matcher is a
``deep_copy`` of that pristine one, which shares the compiled grammar. ``<|endoftext|>`` is allowed
exactly when the constraint accepts the text so far; once nothing but eos can follow (the
constraint is complete), ``ConstraintState.complete`` is true and the sequence ends ("stop").
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import Gpt2EdgeError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
EXTRA = "gpt2-edge[structured]"
# JSON is written as Python's json.dumps writes it ("a": 1, "b": 2), with no other whitespace: a
# small model otherwise can spend its tokens on newlines. A schema's "x-guidance" overrides it.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 64  # compiled constraints kept per tokenizer (a schema compiles in milliseconds)


class ConstraintError(Gpt2EdgeError):
    """A constraint that does not compile (bad schema, regex or grammar), or llguidance missing."""


@dataclass(frozen=True)
class Constraint:
    """What the output must match. Build one with a class method; hashable, so it keys the cache.

    ``text`` is canonical: a schema as compact JSON (the same schema written twice is one key), the
    choices as a JSON list, a regex or grammar as given.
    """

    kind: ConstraintKind
    text: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Constraint:
        """JSON matching ``schema`` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ConstraintError(f"a JSON schema is a JSON object, got {type(schema).__name__}")
        # keys keep their order: a schema's property order is the order the output writes them
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object (OpenAI's ``{"type": "json_object"}``)."""
        return cls("json_object", '{"type":"object"}')

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Text matching the whole regular expression (Rust ``regex`` syntax)."""
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError(f"a regex is a non-empty string, got {pattern!r}")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        """Exactly one of ``options``."""
        if isinstance(options, str) or not isinstance(options, (list, tuple)) or not options:
            raise ConstraintError(f"a choice is a non-empty list of strings, got {options!r}")
        for o in options:
            if not isinstance(o, str) or not o:
                raise ConstraintError(f"each choice must be a non-empty string, got {o!r}")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        """Text of a grammar: Lark (llguidance's dialect) or GBNF (llama.cpp's), told apart by
        llguidance."""
        if not isinstance(text, str) or not text.strip():
            raise ConstraintError("a grammar is non-empty text (Lark or GBNF)")
        return cls("grammar", text)

    def __post_init__(self) -> None:
        if self.kind not in ("json_schema", "json_object", "regex", "choice", "grammar"):
            raise ConstraintError(f"unknown constraint kind {self.kind!r}")

    def describe(self) -> str:
        """A short name for messages: ``regex '\\d+'``."""
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return self.kind if self.kind == "json_object" else f"{self.kind} {text!r}"


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ConstraintError(f"structured output needs llguidance: pip install '{EXTRA}'") from None
    return llguidance


def _grammar_spec(llg: Any, c: Constraint) -> str:
    """The constraint as an llguidance grammar definition."""
    from llguidance import grammar_from

    if c.kind in ("json_schema", "json_object"):
        return llg.LLMatcher.grammar_from_json_schema(c.text, defaults=JSON_LAYOUT)
    if c.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(c.text)
    if c.kind == "choice":
        # each option a literal string of the grammar (lark string syntax = JSON's)
        return llg.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(o) for o in json.loads(c.text))
        )
    return grammar_from("grammar", c.text)  # llguidance tells Lark from GBNF and converts GBNF


def _one_line(message: str) -> str:
    """llguidance's message on one line: without its source excerpt and carets."""
    lines = [line.strip() for line in str(message).splitlines()]
    kept = [line for line in lines if line and set(line) - {"^", " "} and not re.match(r"\d+ \|", line)]
    return " ".join(kept)


def _refuse(c: Constraint, message: object) -> ConstraintError:
    return ConstraintError(f"{c.describe()} does not compile: {_one_line(str(message))}")


class CompiledConstraint:
    """One constraint compiled for one tokenizer: a pristine matcher to copy per sequence."""

    def __init__(
        self, constraint: Constraint, matcher: Any, vocab_size: int, mask_words: int, eos_token_id: int
    ) -> None:
        self.constraint = constraint
        self._template = matcher
        self.vocab_size = vocab_size
        self.mask_words = mask_words  # the tokenizer's vocabulary in 32-bit words, llguidance's mask
        self.eos_token_id = eos_token_id

    def start(self) -> ConstraintState:
        """A new sequence's matcher, at the start of the output."""
        return ConstraintState(self, self._template.deep_copy())


class ConstraintState:
    """One sequence's position in its constraint (lives on its ``SequenceState``)."""

    def __init__(self, compiled: CompiledConstraint, matcher: Any) -> None:
        self.compiled = compiled
        self.matcher = matcher
        self._bits = np.full(compiled.mask_words, -1, dtype=np.int32)
        self._allowed = np.zeros(compiled.vocab_size, dtype=np.bool_)
        self.error: str | None = None  # why the matcher failed, once it has

    def allowed(self) -> np.ndarray:
        """The tokens allowed at the next position, ``(V,)`` bool (V: the model's vocabulary)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self.matcher.is_error():
            # a parser limit (a pathological grammar): this sequence alone ends, with eos next,
            # and says why (``error``); the others in its batch go on
            self.error = self.error or f"{self.compiled.constraint.describe()}: {self.matcher.get_error()}"
            self._allowed[:] = False
            self._allowed[self.compiled.eos_token_id] = True
            return self._allowed
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little").view(np.bool_)
        n = min(len(bits), len(self._allowed))
        self._allowed[:n] = bits[:n]  # model rows past the tokenizer's vocabulary stay False
        return self._allowed

    def advance(self, token: int) -> bool:
        """Take ``token`` (one the mask allowed); False for eos, which ends the text and is not
        fed to the matcher (llguidance keeps no rollback record of an eos it takes)."""
        if token == self.compiled.eos_token_id:
            return False
        if not self.matcher.consume_token(int(token)):
            what = self.compiled.constraint.describe()
            raise Gpt2EdgeError(f"token {token} does not fit {what}: {self.matcher.get_error()}")
        return True

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` the constraint takes in order from here (nothing is consumed);
        an eos it allows there counts, and ends the run."""
        eos = self.compiled.eos_token_id
        body = list(itertools.takewhile(lambda t: t != eos, (int(t) for t in tokens)))
        n = int(self.matcher.validate_tokens(body)) if body else 0
        if n == len(body) < len(tokens) and self._eos_after(body):
            n += 1
        return n

    def _eos_after(self, tokens: list[int]) -> bool:
        """Whether eos is allowed after ``tokens`` (which must fit); the state is left as it was."""
        for t in tokens:
            self.advance(t)
        ok = bool(self.allowed()[self.compiled.eos_token_id])
        if tokens:
            self.matcher.rollback(len(tokens))
        return ok

    def masks_along(self, tokens: Sequence[int]) -> list[np.ndarray]:
        """The masks at the next position and after each of ``tokens`` (which must all fit):
        ``len(tokens) + 1`` masks, for a speculative verification; the state is left as it was."""
        out = [self.allowed().copy()]
        taken = 0
        for t in tokens:
            if not self.advance(t):  # eos: the text ends there; what follows is never used
                out += [out[-1]] * (len(tokens) + 1 - len(out))
                break
            taken += 1
            out.append(self.allowed().copy())
        if taken:
            self.matcher.rollback(taken)
        return out

    @property
    def complete(self) -> bool:
        """Nothing but eos may follow: the output is done."""
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self.matcher.is_accepting())



class _Compiler:
    """One tokenizer's llguidance tokenizer and its compiled constraints (LRU)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        llg = _llguidance()
        self.llg = llg
        self.eos_token_id = tokenizer.eos_token_id
        self.vocab_size = tokenizer.vocab_size  # asked once: tokenizers counts the vocabulary
        self.lltokenizer = llg.LLTokenizer(tokenizer.to_json(), eos_token=tokenizer.eos_token_id)
        self.cache: OrderedDict[tuple[Constraint, int], CompiledConstraint] = OrderedDict()
        self.compiles = 0
        self.lock = threading.Lock()

    def compile(self, c: Constraint, vocab_size: int) -> CompiledConstraint:
        key = (c, vocab_size)
        with self.lock:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                return hit
        try:
            spec = _grammar_spec(self.llg, c)
        except ValueError as e:  # llguidance: not valid JSON, a bad schema keyword
            raise _refuse(c, e) from None
        matcher = self.llg.LLMatcher(self.lltokenizer, spec, log_level=0)
        if matcher.is_error():
            raise _refuse(c, matcher.get_error())
        words = (self.lltokenizer.vocab_size + 31) // 32
        compiled = CompiledConstraint(c, matcher, vocab_size, words, self.eos_token_id)
        with self.lock:
            self.compiles += 1
            self.cache[key] = compiled
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        return compiled


_compilers: weakref.WeakKeyDictionary[Any, _Compiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def _compiler(tokenizer: Tokenizer) -> _Compiler:
    with _compilers_lock:
        found = _compilers.get(tokenizer)
    if found is None:
        found = _Compiler(tokenizer)  # ~1 s for GPT-2's vocabulary: once per tokenizer
        with _compilers_lock:
            found = _compilers.setdefault(tokenizer, found)
    return found


def compile_constraint(
    tokenizer: Tokenizer, constraint: Constraint, vocab_size: int | None = None
) -> CompiledConstraint:
    """``constraint`` compiled for ``tokenizer`` (masks of ``vocab_size`` tokens, default the
    tokenizer's; model rows past the tokenizer's vocabulary are never allowed). Cached: the same
    constraint again is no compile. Raises ``ConstraintError`` naming what does not compile."""
    if not isinstance(constraint, Constraint):
        raise ConstraintError(
            f"a constraint is a Constraint (Constraint.regex(...), ...), got {constraint!r}"
        )
    compiler = _compiler(tokenizer)
    return compiler.compile(constraint, vocab_size or compiler.vocab_size)


_worker: ThreadPoolExecutor | None = None


def mask_worker() -> ThreadPoolExecutor:
    """The one thread that computes masks while the model runs (``generator.iter_decode``)."""
    global _worker
    with _compilers_lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(1, thread_name_prefix="gpt2-edge-masks")
        return _worker


def masks_of(states: Sequence[Any]) -> list[np.ndarray | None]:
    """Each sequence state's mask for its next token (None for a free one): ``SequenceState.allowed``."""
    return [s.allowed() for s in states]


def validate_constraint(constraint: Constraint) -> None:
    """Refuse a constraint that does not compile, without a tokenizer (a CLI checks its flags
    before loading a model): ``ConstraintError`` naming it."""
    llg = _llguidance()
    try:
        spec = _grammar_spec(llg, constraint)
    except ValueError as e:
        raise _refuse(constraint, e) from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(spec)
    if is_error:
        raise _refuse(constraint, messages[0])


def compile_count(tokenizer: Tokenizer) -> int:
    """How many constraints were compiled for ``tokenizer`` (cache misses)."""
    found = _compilers.get(tokenizer)
    return found.compiles if found is not None else 0


def lltokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's tokenizer for ``tokenizer`` (cached with it), for checks by hand."""
    return _compiler(tokenizer).lltokenizer
