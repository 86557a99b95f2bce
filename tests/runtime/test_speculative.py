"""Speculative decoding (runtime/speculative.py): drafts verified in one pass, rolled back in place.

Greedy speculative output equals plain decoding for every in-place precision; sampled output keeps
the target's distribution (checked by enumeration on a tiny-vocabulary model) and is reproducible
with a seed; caches that cannot roll back decode plainly. Also: ``SequenceState``'s incremental
text equals detokenizing everything at every step.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from gpt2_edge.errors import Gpt2EdgeError
from gpt2_edge.runtime.draft_policy import Source, draft_length
from gpt2_edge.runtime.generator import Generator, decode
from gpt2_edge.runtime.kv_cache import CacheError
from gpt2_edge.runtime.sampling import GenerationConfig, TokenChooser, softmax
from gpt2_edge.runtime.sequence import SequenceState
from gpt2_edge.runtime.speculative import DraftModel, PromptLookup, Speculator
from gpt2_edge.runtime.tokenizer import Tokenizer
from tests.bundles import ModelSpec, spec

pytestmark = pytest.mark.filterwarnings("ignore")
PRECISIONS = ("fp32", "int8-dynamic", "int8-weight", "int4")
OTHER_MODEL = spec(model=ModelSpec(seed=5))  # another random model with the same tokenizer


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Random prompts that repeat their beginning (prompt lookup finds matches, right or wrong)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (5, 12, 3, 17, 8):
        p = rng.integers(0, vocab - 1, n).tolist()
        out.append(p + p[:3])
    return out


# prompt lookup ----------------------------------------------------------------------------------
def test_prompt_lookup_drafts_what_followed_the_latest_longest_match():
    lookup = PromptLookup()
    seen = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup.propose(seen, 2) == [7, 8]  # "2 3" last followed by 7 8 (the 3-gram "5 2 3" is new)
    assert lookup.propose([*seen, 7], 3) == [8, 5, 2]  # "2 3 7": the index grows with the sequence
    assert PromptLookup().propose([4, 5, 6], 3) == []  # no earlier occurrence
    assert PromptLookup(max_ngram=2, min_ngram=2).propose([1, 2, 5, 2], 2) == []  # no 2-gram match
    # a match close to the end: a loop continues itself
    assert PromptLookup().propose([1, 2, 1, 2, 1], 5) == [2, 1, 2, 1, 2]
    assert PromptLookup().propose([7, 7, 7], 4) == [7, 7, 7, 7]
    with pytest.raises(Gpt2EdgeError):
        PromptLookup(max_ngram=1, min_ngram=2)


def test_the_draft_length_follows_the_acceptance_rate():
    lengths = [draft_length(rate, 8) for rate in (0.05, 0.15, 0.3, 0.5, 0.8, 0.95)]
    assert lengths[:2] == [0, 0] and lengths == sorted(lengths) and lengths[-1] == 8
    # a source whose drafts keep failing stops drafting, then probes one token after 1, 3, 7, 15, ...
    source, drafted = Source(), []
    for _ in range(70):
        k = draft_length(source.rate, 8) or int(source.probe_due())
        if k:
            source.record(k, 0)
        drafted.append(k)
    assert drafted[:2] == [2, 1] and sum(drafted[2:]) == 5  # probes at 3, 7, 15, 31, 63
    source.record(1, 1)  # a probe accepted: the waits start over
    assert source.probes.wait == 1


def test_generation_config_checks_prompt_lookup():
    assert GenerationConfig(prompt_lookup=np.int64(4)).prompt_lookup == 4
    for bad in (-1, 2.5, True):
        with pytest.raises(Gpt2EdgeError, match="prompt_lookup"):
            GenerationConfig(prompt_lookup=bad)
    with pytest.raises(Gpt2EdgeError, match="needs num_beams=1"):
        GenerationConfig(prompt_lookup=4, num_beams=2)


# the cache: verify and truncate ---------------------------------------------------------------
def test_inplace_verify_and_truncate(make_bundle, concat_bundle):
    gen = Generator.from_bundle(str(make_bundle(spec())), threads=1)
    backend = gen.backend
    p, chunk = [5, 17, 3, 99, 42], [8, 1, 250, 7]
    cache = backend.new_cache(3, 32)
    cache.prefill([0, 1, 2], [p, p[:2], p])
    logits = cache.verify([0, 2], [chunk, chunk[:2]])
    assert logits.shape == (2, 4, gen.tokenizer.vocab_size) and cache.length(0) == 9 and cache.length(2) == 7
    # a verified position's logits are those of extending by the same chunk (any chunk >= 2 tokens)
    other = backend.new_cache(1, 32)
    other.prefill([0], [p])
    np.testing.assert_array_equal(other.extend([0], [chunk[:2]])[0], logits[0, 1])
    np.testing.assert_array_equal(other.extend([0], [chunk[2:]])[0], logits[0, 3])
    np.testing.assert_array_equal(logits[1, :2], logits[0, :2])  # rows are batch-invariant
    # roll back two drafted tokens and verify others: as if they had never been fed
    cache.truncate(0, 7)
    again = cache.verify([0], [[250, 11]])[0]
    fresh = backend.new_cache(1, 32)
    fresh.prefill([0], [p])
    np.testing.assert_array_equal(fresh.verify([0], [[8, 1, 250, 11]])[0, 2:], again)
    # slots that are not a contiguous range: one pass per slot, the same logits
    cache.truncate(0, 7)
    cache.truncate(2, 5)
    apart = cache.verify([2, 0], [chunk[:2], [250, 11]])
    np.testing.assert_array_equal(apart[0], logits[1, :2])
    np.testing.assert_array_equal(apart[1], again)
    with pytest.raises(CacheError):
        cache.truncate(0, 0)
    with pytest.raises(CacheError):
        cache.truncate(1, 3)  # holds 2
    concat = Generator.from_bundle(str(concat_bundle), threads=1).backend.new_cache(1, 32)
    assert not concat.can_verify and cache.can_verify
    concat.prefill([0], [p])
    with pytest.raises(CacheError):
        concat.verify([0], [chunk])


# greedy: the same tokens ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def draft_models(make_bundle):
    """The other random model (drafts mostly rejected) and the tiny fp32 model (drafts accepted)."""
    return {
        "other": DraftModel.from_bundle(make_bundle(OTHER_MODEL), max_tokens=3),
        "same": DraftModel.from_bundle(make_bundle(spec()), max_tokens=5),
    }


@pytest.mark.parametrize("precision", PRECISIONS)
def test_greedy_speculation_equals_plain_decoding(make_bundle, draft_models, tiny_tokenizer, precision):
    path = str(make_bundle(spec(precision=precision)))
    gen = Generator.from_bundle(path, threads=1)
    ps = prompts(tiny_tokenizer.vocab_size)
    for penalty in (1.0, 1.3):
        cfg = dict(max_new_tokens=40, repetition_penalty=penalty, ignore_eos=True)
        plain = [r.token_ids for r in gen.generate(ps, GenerationConfig(**cfg))]
        variants = [
            (None, 5),
            (draft_models["other"], 0),
            (draft_models["same"], 0),
            (draft_models["same"], 3),
        ]
        for draft, lookup in variants:
            g = Generator(replace(gen.model, draft=draft))
            c = GenerationConfig(**cfg, prompt_lookup=lookup)
            batch = g.generate(ps, c)
            assert [r.token_ids for r in batch] == plain
            pair = g.generate(ps[:2], c)  # two rows verify drafts of their own lengths in one pass
            assert [r.token_ids for r in pair] == plain[:2]
            assert pair[0].timings["spec_drafted"] > 0 or not lookup  # a pair drafts where it is cheap
            alone = [g.generate(p, c)[0] for p in ps]
            assert [r.token_ids for r in alone] == plain and all(r.timings["spec_drafted"] for r in alone)
    # streaming: the pieces join to the same text
    c = GenerationConfig(max_new_tokens=30, prompt_lookup=4)
    assert "".join(gen.stream(ps[1], c)) == gen.generate(ps[1], GenerationConfig(max_new_tokens=30))[0].text


def test_drafts_that_keep_failing_make_plain_steps(make_bundle, draft_models, tiny_tokenizer):
    gen = Generator.from_bundle(str(make_bundle(spec())), threads=1, draft=None)
    g = Generator(replace(gen.model, draft=draft_models["other"]))
    t = g.generate(prompts(tiny_tokenizer.vocab_size)[2], GenerationConfig(max_new_tokens=56))[0].timings
    assert t["spec_accepted"] == 0 and t["spec_drafted"] <= 3 * 6  # backs off: 1, 3, 7, 15 plain steps


def test_concatenating_cache_decodes_plainly(concat_bundle, tiny_tokenizer):
    gen = Generator.from_bundle(str(concat_bundle), threads=1)
    p = prompts(tiny_tokenizer.vocab_size)[3]
    spec_run = gen.generate(p, GenerationConfig(max_new_tokens=20, prompt_lookup=4))[0]
    assert spec_run.token_ids == gen.generate(p, GenerationConfig(max_new_tokens=20))[0].token_ids
    assert "spec_passes" not in spec_run.timings


def test_a_draft_needs_the_targets_tokenizer_and_to_be_cheap(make_bundle, draft_models, tmp_path):
    bundle = make_bundle(spec())
    gen = Generator.from_bundle(str(bundle), threads=1, draft=str(bundle))  # a draft as big as the target
    assert gen.draft is not None and gen.draft.cost == 1.0
    t = gen.generate([5, 6, 7, 5, 6], GenerationConfig(max_new_tokens=40))[0].timings
    assert t["spec_drafted"] <= 6  # it never pays: one-token probes only
    other = Tokenizer.train(["some other text, other words entirely"] * 3, vocab_size=300, min_frequency=1)
    other.save(tmp_path)
    with pytest.raises(Gpt2EdgeError, match="another tokenizer"):
        draft_models["same"].check_tokenizer(SimpleNamespace(dims=SimpleNamespace(vocab_size=300), path=tmp_path))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(Gpt2EdgeError, match="drafts an integer >= 1"):
            Generator.from_bundle(str(bundle), threads=1, draft=str(bundle), draft_tokens=bad)


def test_the_scheduler_hook_with_sequences_joining_and_leaving(make_bundle, tiny_tokenizer):
    """What the server's scheduler does: slots join and leave a running cache, each sequence with its
    own chooser; speculative steps give every sequence plain decoding's tokens."""
    gen = Generator.from_bundle(str(make_bundle(spec())), threads=1)
    ps = prompts(tiny_tokenizer.vocab_size, seed=1)
    lengths = [20, 7, 33, 12, 25]
    want = [
        gen.generate(p, GenerationConfig(max_new_tokens=n))[0].token_ids
        for p, n in zip(ps, lengths, strict=True)
    ]
    cache = gen.backend.new_cache(3, 64)
    spec_ = Speculator(cache)
    waiting = list(range(len(ps)))
    active: dict[int, tuple[int, SequenceState]] = {}
    done: dict[int, list[int]] = {}
    while waiting or active:
        for slot in range(3):  # admit into free slots
            if slot not in active and waiting:
                i = waiting.pop(0)
                cfg = GenerationConfig(max_new_tokens=lengths[i], prompt_lookup=2 + i)
                state = SequenceState(ps[i], cfg, gen.eos_token_id, tiny_tokenizer.decode)
                state.append(state.choose(cache.prefill([slot], [ps[i]])[0]))
                active[slot] = (i, state)
        slots = sorted(s for s, (_, st) in active.items() if not st.finished)
        if slots:
            for slot, r in zip(slots, spec_.step(slots, [active[s][1] for s in slots]), strict=True):
                assert len(r.tokens) == len(r.logits) >= 1
                active[slot][1].extend(r.tokens)
        for slot in [s for s, (_, st) in active.items() if st.finished]:
            i, state = active.pop(slot)
            done[i] = state.generated
            cache.release(slot)
            spec_.release(slot)
    assert [done[i] for i in range(len(ps))] == want
    assert spec_.stats.verify_passes and spec_.stats.accepted


# sampling: the target's distribution ----------------------------------------------------------
def test_the_acceptance_rule_keeps_the_target_distribution():
    """One drafted token, drawn from q (a point mass, or a distribution): the emitted first token
    is distributed as p."""
    logits = np.log(np.array([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]], np.float32))
    p = softmax(logits[0].astype(np.float64))
    q = np.array([0.1, 0.6, 0.1, 0.2])
    n = 20000
    chooser = TokenChooser(GenerationConfig(do_sample=True, seed=0), None)
    rng = np.random.default_rng(1)
    for draft_probs in (None, q):
        counts = np.zeros(4)
        for _ in range(n):
            x = 1 if draft_probs is None else int(rng.choice(4, p=q))
            dp = None if draft_probs is None else draft_probs[None]
            counts[chooser.verify(logits, [0], 1, [x], dp)[0]] += 1
        assert np.abs(counts / n - p).max() < 0.015, counts / n


class FakeLM:
    """A 3-token 'model' whose logits depend on the last two tokens, with a cache that verifies and
    rolls back: small enough to enumerate the exact distribution of a short continuation."""

    V = 3

    def __init__(self, seed: int = 0) -> None:
        self.table = (
            np.random.default_rng(seed).normal(0, 1.2, (self.V + 1, self.V, self.V)).astype(np.float32)
        )
        self.n_ctx = 64

    def logits(self, seq: list[int]) -> np.ndarray:
        return self.table[seq[-2] if len(seq) > 1 else self.V, seq[-1]]

    def new_cache(self, n_slots: int, capacity: int) -> FakeCache:
        return FakeCache(self, n_slots, capacity)


class FakeCache:
    can_verify = True

    def __init__(self, lm: FakeLM, n_slots: int, capacity: int) -> None:
        self.lm, self.n_slots, self.capacity, self.seqs = lm, n_slots, capacity, {}

    def length(self, slot):
        return len(self.seqs.get(slot, ()))

    def verify(self, slots, chunks):
        out = np.zeros((len(slots), max(map(len, chunks)), self.lm.V), np.float32)
        for i, (s, c) in enumerate(zip(slots, chunks, strict=True)):
            for j, t in enumerate(c):
                self.seqs.setdefault(s, []).append(t)
                out[i, j] = self.lm.logits(self.seqs[s])
        return out

    def prefill(self, slots, prompts):
        return self.verify(slots, prompts)[np.arange(len(slots)), [len(p) - 1 for p in prompts]]

    extend = prefill

    def decode(self, slots, tokens):
        return self.verify(slots, [[t] for t in tokens])[:, 0]

    def truncate(self, slot, length):
        del self.seqs[slot][length:]

    def release(self, slot):
        self.seqs.pop(slot, None)


def exact_distribution(lm: FakeLM, prompt: list[int], cfg: GenerationConfig, n: int) -> dict:
    """P(first n tokens) by enumeration, with the chooser's processors and warpers."""
    chooser = TokenChooser(cfg, None)
    out = {}
    for seq in itertools.product(range(lm.V), repeat=n):
        prob, ctx = 1.0, list(prompt)
        for i, t in enumerate(seq):
            prob *= softmax(chooser.process(lm.logits(ctx)[None], [ctx], i))[0, t]
            ctx.append(t)
        out[seq] = prob
    return out


@pytest.mark.parametrize("warp", [dict(), dict(temperature=0.7, repetition_penalty=1.5), dict(top_k=2)])
def test_speculative_sampling_has_the_plain_distribution(warp):
    lm, prompt, n, runs = FakeLM(), [0, 1, 2, 0, 1, 1, 2], 3, 3000
    cfg = dict(max_new_tokens=n, do_sample=True, **warp)
    exact = exact_distribution(lm, prompt, GenerationConfig(**cfg), n)
    kw = dict(eos_token_id=None, n_ctx=lm.n_ctx, detokenize=lambda ids: "".join("abc"[i] for i in ids))
    for lookup in (0, 3):
        seen = Counter(
            tuple(
                decode(lm, [prompt], GenerationConfig(**cfg, seed=s, prompt_lookup=lookup), **kw)[0].token_ids
            )
            for s in range(runs)
        )
        tv = 0.5 * sum(abs(seen[k] / runs - exact[k]) for k in exact)
        assert tv < 0.06, (lookup, tv)  # measured <= 0.04; a rule accepting too often: >= 0.13


def test_eos_and_stop_strings_inside_accepted_drafts_end_the_text_as_plainly():
    lm = FakeLM(seed=3)
    lm.table[:] = -5.0
    for a, b in itertools.product(range(lm.V + 1), range(lm.V)):
        lm.table[a, b, (b + 1) % lm.V] = 5.0  # 0 1 2 0 1 2 ...: drafts of a loop, all accepted
    kw = dict(n_ctx=lm.n_ctx, detokenize=lambda ids: "".join("abc"[i] for i in ids))
    for eos, stop in ((2, ()), (None, ("bc",)), (None, ())):
        for lookup in (0, 4):
            r = decode(
                lm,
                [[0, 1, 2, 0]],
                GenerationConfig(max_new_tokens=9, stop=stop, prompt_lookup=lookup),
                eos_token_id=eos,
                **kw,
            )[0]
            if lookup == 0:
                want = (r.token_ids, r.text, r.finish_reason)
            else:
                assert (r.token_ids, r.text, r.finish_reason) == want
                assert r.timings["spec_accepted"] > 0


def test_seeded_speculative_sampling_is_reproducible(make_bundle, draft_models, tiny_tokenizer):
    gen = Generator.from_bundle(str(make_bundle(spec())), threads=1)
    g = Generator(replace(gen.model, draft=draft_models["same"]))
    p = prompts(tiny_tokenizer.vocab_size)[1]
    for generator, lookup in ((gen, 4), (g, 0), (g, 2)):
        cfg = dict(max_new_tokens=30, do_sample=True, temperature=0.8, prompt_lookup=lookup)
        runs = [generator.generate(p, GenerationConfig(**cfg, seed=s))[0].text for s in (7, 7, 8)]
        assert runs[0] == runs[1] and runs[0] != runs[2]


# per-token cost: the incremental text ---------------------------------------------------------
class FullText:
    """SequenceState's text rules as they were: detokenize every id and search the whole text."""

    def __init__(self, config, eos, detokenize):
        self.config, self.eos, self.detokenize = config, eos, detokenize
        self.generated, self.emitted, self.text, self.reason = [], 0, "", None

    def append(self, token):
        from gpt2_edge.runtime.sequence import safe_text_length

        self.generated.append(token)
        if token == self.eos:
            self.reason, self.text = "eos", self.detokenize(self.generated[:-1])
        else:
            text = self.detokenize(self.generated)
            hits = [text.find(s) for s in self.config.stop if s in text]
            if hits:
                self.reason, self.text = "stop", text[: min(hits)]
            elif len(self.generated) >= self.config.max_new_tokens:
                self.reason, self.text = "length", text
            else:
                safe = safe_text_length(text, self.config.stop)
                piece = text[self.emitted : safe] if safe > self.emitted else ""
                self.emitted = max(self.emitted, safe)
                return piece
        piece, self.emitted = self.text[self.emitted :], len(self.text)
        return piece


def test_incremental_text_equals_detokenizing_everything(tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    rng = random.Random(0)
    words = tok.encode("All:\nSpeak, speak. Café naïve, 日本語 🎉 — we know't.\n\n")
    byte_tokens = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]  # split characters
    assert byte_tokens
    for _ in range(600):
        gen = [rng.choice(words + byte_tokens + [eos]) for _ in range(rng.randint(1, 40))]
        full = tok.decode(gen)
        stops = tuple(
            full[a : a + rng.randint(1, 5)]
            if full and rng.random() < 0.7
            else rng.choice(["\n\n", "ak", "\ufffd"])
            for a in [rng.randrange(max(len(full), 1)) for _ in range(rng.randint(0, 3))]
        )
        cfg = GenerationConfig(max_new_tokens=rng.randint(1, 45), stop=tuple(s for s in stops if s))
        new, old = SequenceState([1], cfg, eos, tok.decode), FullText(cfg, eos, tok.decode)
        for t in gen:
            assert new.append(t) == old.append(t)
            if new.finished or old.reason:
                break
        assert (new.text, new.finish_reason) == (old.text, old.reason)


@pytest.mark.parametrize("verify_cost", [10.0, 1.0])
def test_a_lone_greedy_sequence_stops_drafting_where_drafting_measures_slower(
    make_bundle, draft_models, tiny_tokenizer, monkeypatch, verify_cost
):
    """The guard times whole steps (here a fake clock: a one-token pass of either model costs 1, a
    verifying pass ``verify_cost``): where drafting with the draft model costs more per token than
    plain steps, a lone greedy sequence drafts only in probes; where it pays, it keeps drafting.
    The tokens are plain decoding's either way."""
    import types

    from gpt2_edge.runtime import kv_cache, speculative

    gen = Generator.from_bundle(str(make_bundle(spec())), threads=1)
    g = Generator(replace(gen.model, draft=draft_models["same"]))
    p = prompts(tiny_tokenizer.vocab_size)[4]  # 11 tokens: 50 new fit the tiny model's 64
    cfg = GenerationConfig(max_new_tokens=50, ignore_eos=True)
    plain = gen.generate(p, cfg)[0].token_ids
    now = [0.0]
    for name, cost in (("decode", 1.0), ("verify", verify_cost)):
        real = getattr(kv_cache.InPlaceCache, name)

        def timed(self, *a, _real=real, _cost=cost, **k):
            now[0] += _cost
            return _real(self, *a, **k)

        monkeypatch.setattr(kv_cache.InPlaceCache, name, timed)
    monkeypatch.setattr(speculative, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    r = g.generate(p, cfg)[0]
    assert r.token_ids == plain
    steps, verified = r.timings["spec_passes"], r.timings["spec_verify_passes"]
    if verify_cost > 1:  # a warm-up and two drafting steps measured, two plain, then probes only
        assert verified <= 3 + 1 + steps // 32
    else:
        assert verified > steps // 2 and r.timings["spec_drafted"] > 20
