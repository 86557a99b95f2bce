"""Speculative decoding: drafted tokens verified in one pass of the target model. Torch-free.

At batch 1 a decode step reads every weight once per token; a pass over ``[pending token, d1..dk]``
costs about one step (1.1x for k = 4 at 124M on 2 CPU cores) and gives the target's logits after
each of them, so every accepted drafted token is a step saved. Drafts come from

- **prompt lookup** (``GenerationConfig.prompt_lookup = k``): the tokens that followed the most
  recent earlier occurrence of the sequence's last n tokens (n = 3, 2, 1) in the prompt and the
  text so far; no model, a dictionary lookup per step; or
- **a draft model** (``DraftModel``): a smaller bundle with the same tokenizer, run greedily for
  k steps over its own in-place KV cache, kept in step with the accepted tokens.

Verification (``TokenChooser.verify``) keeps the output the target's: greedy takes a drafted token
only where plain decoding picks it; sampling uses the speculative sampling rule, so the emitted
tokens have the target's distribution (after the request's processors and warpers). Rejected
positions are rolled back by the cache's length alone (``KVCache.truncate``). How many tokens to
draft (``draft_policy``) follows each source's acceptance rate (per sequence; for prompt lookup per
n-gram length, and for the draft model): the number that maximises expected tokens per pass under a
fixed cost model of a verifying pass, 0 (a plain step, ``KVCache.decode``) when drafting does not
pay, with an occasional one-token probe; so text without matches costs about what plain decoding
costs. The policy depends on the tokens only (never on timings), so a seeded sampled request is
reproducible; a sampled sequence drafts what its own rate says whatever else shares the pass (the
server's batch), so its draws, and a seed's tokens, are the same alone and in any batch. Greedy
sequences fill the pass's width, which stays within what runs as one pass (every padded chunk
fits its slot, the slots one range; else a plain step); in a batch that width weighs the expected
tokens against the measured cost of a verifying pass per padded position (every row pays for the
widest draft: where batching already uses the compute, as on a small CPU, drafting stops paying).

With a draft model, a lone greedy sequence also watches the clock: where its drafting steps
(the draft's passes included) measure slower per emitted token than its plain steps (medians of
the last few), it stops drafting but for a probe every ``GUARD_PROBE`` steps (its tokens do not
depend on drafting; a sampled one keeps the token-only policy). That catches what the cost model,
which weighs a draft pass by its share of weight bytes, cannot see: passes that are mostly fixed
cost (a small target: docs/measured.md). Prompt lookup costs no pass and is not guarded (timing noise on a
small model cost it more than it saved).

Numerics: on ONNX Runtime's CPU provider a one-token step multiplies attention probabilities by V
with MLAS's M = 1 kernel and a chunk of two or more tokens with its GEMM; they sum in another
order, so a verified position's logits differ from a one-token step's in the last bits (fp32:
~2e-6 at 124M), which a variant that quantizes activations can turn into a quantization step.
Chunks of any length agree with each other bitwise. A backend made with ``step_invariant=True``
gives every pass the GEMM (runtime.session): greedy speculative output then equals plain decoding
bitwise, for every precision; without it, except where the two best tokens are that close
(measured on the shipped model, 72 continuations of 64 tokens: fp32 72/72 identical, int8-dynamic
71/72, int8-weight 70/72, int4 67/72; with it 72/72 each).

A concatenating KV cache (``tensorrt`` target, the TensorRT engine, the PyTorch reference) cannot
roll back: ``Speculator.step`` then runs plain steps. The server's scheduler calls ``step`` once
per decode iteration in place of ``decode`` + ``choose`` (see ``Speculator``).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import Gpt2EdgeError
from .draft_policy import KEEP, NGRAM_PRIOR, PASS_COST, PRIOR, TOKEN_COST, Plan, Probes, Source, pass_cost
from .drafters import DraftModel, PromptLookup
from .sampling import TokenChooser
from .sequence import SequenceState
from .types import KVCache, can_verify

DRIFT = 0.02  # per plain batch step: how fast a measured pass cost returns to the prior
GUARD_PROBE = 32  # a lone greedy sequence's steps between a drafting probe and a plain measure
GUARD_MARGIN = 0.05  # drafting steps may cost this much more per token before they stop
GUARD_SAMPLES = 8  # steps of each kind the guard's medians are over


@dataclass
class StepResult:
    """What one ``Speculator.step`` gives one sequence: the tokens to append, in order, and the
    target's logits each was chosen from (``(len(tokens), V)``, for log-probabilities)."""

    tokens: list[int]
    logits: np.ndarray
    drafted: int = 0  # tokens proposed for this sequence in this step


@dataclass
class _Row:
    """What speculation knows of one sequence; it lives on the sequence (``SequenceState.speculation``),
    so a sequence's whole state travels with it (the server's ``Slot``) and leaving drops it."""

    lookup: PromptLookup | None
    sources: dict[Any, Source] = field(default_factory=dict)  # n-gram length or "model" -> record
    lookup_probes: Probes = field(default_factory=Probes)  # shared by its n-gram sources
    drafted_by: Any = None  # the source of the current draft
    draft_len: int = 0  # this sequence's tokens in the draft model's cache


@dataclass
class SpeculationStats:
    passes: int = 0  # target passes after the prefill (plain and verifying)
    verify_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens the passes emitted

    @property
    def acceptance(self) -> float:
        """Accepted / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_timings(self) -> dict[str, float]:
        return {
            "spec_passes": float(self.passes),
            "spec_verify_passes": float(self.verify_passes),
            "spec_drafted": float(self.drafted),
            "spec_accepted": float(self.accepted),
            "spec_acceptance": self.acceptance,
        }


@dataclass
class Speculator:
    """Speculative steps over one KV cache, for the sequences in its slots (a ``generate`` call's
    batch, or the server's running batch).

    Each slot's sequence is a ``SequenceState`` whose cache holds ``state.seen[:-1]``: its last
    token is pending, as after plain decoding's ``choose``. ``step(slots, states)`` drafts for every
    sequence (prompt lookup up to ``state.config.prompt_lookup`` tokens, else the draft model),
    runs the target once over all of them (``verify``, or a plain ``decode`` when nobody drafted),
    and returns each sequence's tokens; the caller appends them in order (``state.extend``, or
    ``state.append`` one by one, stopping when the sequence finishes) and releases a finished
    sequence's slot in the cache and here (``release``). The server's hook::

        spec = Speculator(cache, draft=draft_or_None)          # beside the scheduler's cache
        for slot, r in zip(slots, spec.step(slots, [seq[s].state for s in slots])):
            for token, logits in zip(r.tokens, r.logits):      # its own chooser, its own seed
                piece = seq[slot].state.append(token)          # + logprobs from logits, an event
                if seq[slot].state.finished: break             # then cache.release + spec.release
    """

    cache: KVCache
    draft: DraftModel | None = None
    max_ngram: int = 3
    min_ngram: int = 1
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    clock: Any = None  # seconds for the lone greedy guard (default time.perf_counter)

    def __post_init__(self) -> None:
        self.can_verify = can_verify(self.cache)
        # A batch's pass cost per drafted position, measured (greedy widths only use it, and they
        # never change the tokens): rows -> a plain step's seconds, and the cost per row x drafted
        # token in plain steps, both averaged; the cost drifts back to the prior while nothing is
        # verified, so a batch that stopped drafting tries again now and then.
        self._plain_s: dict[int, float] = {}
        self.token_cost = TOKEN_COST
        # With a draft model, a lone greedy sequence's seconds per emitted token over whole steps
        # (drafting included), the last GUARD_SAMPLES apart for steps that drafted (True) and plain
        # ones (False): the guard compares their medians.
        self._lone_s: dict[bool, deque[float]] = {k: deque(maxlen=GUARD_SAMPLES) for k in (True, False)}
        self._lone_seen = {True: 0, False: 0}  # the first drafting step is a warm-up (the draft's prefill)
        self._lone_steps = 0
        if self.clock is None:
            self.clock = time.perf_counter
        self._draft_cache: KVCache | None = None
        if self.draft is not None and self.can_verify:
            cap = min(self.cache.capacity, self.draft.backend.n_ctx)
            self._draft_cache = self.draft.backend.new_cache(self.cache.n_slots, cap)
            if not can_verify(self._draft_cache):
                raise Gpt2EdgeError("the draft model's KV cache cannot roll back (in-place bundles only)")

    def release(self, slot: int) -> None:
        """Free ``slot``'s rows in the draft model's cache (call it with ``cache.release``)."""
        if self._draft_cache is not None and self._draft_cache.length(slot):
            self._draft_cache.release(slot)

    def follow(self) -> None:
        """Give the draft model's cache the target cache's shape again: as many slots, as many
        tokens per slot (at most the draft's context). The server's cache grows and shrinks with its
        work (``reserve``); the draft rows of running sequences are kept (they never hold more
        tokens than their target rows). ``step`` calls it too, before the draft model runs."""
        cache, draft = self._draft_cache, self.draft
        if cache is None or draft is None:
            return
        shape = (self.cache.n_slots, min(self.cache.capacity, draft.backend.n_ctx))
        if (cache.n_slots, cache.capacity) != shape:
            cache.reserve(shape[1], shape[0])  # type: ignore[attr-defined]

    @property
    def draft_tokens_allocated(self) -> int:
        """The draft model's KV positions allocated (slots x tokens per slot; 0 without one)."""
        cache = self._draft_cache
        return cache.n_slots * cache.capacity if cache is not None else 0

    def feed_draft(self, slots: Sequence[int], states: Sequence[SequenceState], upto: Sequence[int]) -> None:
        """Run the draft model over each sequence's ``seen[:upto]`` not yet in its draft rows (one
        pass for the rows it starts, one for those it extends): the server feeds a prompt's chunks
        as it prefills them, so the first draft does not prefill the whole prompt at once. A slot
        whose tokens would not fit the draft's cache is left to ``step`` (which skips it)."""
        if self._draft_cache is None:
            return
        self.follow()
        cache = self._draft_cache
        first: dict[int, list[int]] = {}
        more: dict[int, list[int]] = {}
        rows: dict[int, _Row] = {}
        for slot, state, n in zip(slots, states, upto, strict=True):
            row = rows[slot] = self._row(slot, state)
            if row.draft_len < n <= cache.capacity:
                (more if row.draft_len else first)[slot] = state.seen[row.draft_len : n]
        for chunks, run in ((first, cache.prefill), (more, cache.extend)):
            if chunks:
                run(list(chunks), list(chunks.values()))
                for slot in chunks:
                    rows[slot].draft_len = cache.length(slot)

    def step(
        self,
        slots: Sequence[int],
        states: Sequence[SequenceState],
        choosers: Sequence[TokenChooser] | None = None,
    ) -> list[StepResult]:
        """One target pass over ``slots``: each sequence's next tokens (at least one). ``choosers``:
        one per sequence (default: each state's own; ``iter_decode`` passes its batch's one)."""
        choosers = list(choosers) if choosers is not None else [s.chooser for s in states]
        # the guard: a lone greedy sequence with a draft model (prompt lookup's drafts cost no pass)
        lone = len(slots) == 1 and self._draft_cache is not None and not choosers[0].config.do_sample
        t_step = self.clock()
        drafts = self._drafts(slots, states, choosers, guard=lone)
        pending = [s.seen[-1] for s in states]
        self.stats.passes += 1
        t0 = time.perf_counter()
        if not any(drafts):
            logits = self.cache.decode(slots, pending)[:, None]  # plain decoding's own step
        else:
            self.stats.verify_passes += 1
            logits = self.cache.verify(slots, [[t, *d] for t, d in zip(pending, drafts, strict=True)])
        self._measure(len(slots), max(len(d) for d in drafts), time.perf_counter() - t0)
        plain = None
        n = len(states[0].generated)
        if (
            not any(drafts)
            and all(c is choosers[0] for c in choosers)
            and all(len(s.generated) == n for s in states)
        ):
            # plain decoding's own choice for the whole batch, in one call (and one draw)
            plain = choosers[0](logits[:, 0], [s.seen for s in states], n)
        out = []
        for i, (slot, state, d) in enumerate(zip(slots, states, drafts, strict=True)):
            if plain is not None:
                out.append(StepResult([int(plain[i])], logits[i, :1]))
                self.stats.tokens += 1
                continue
            tokens = choosers[i].verify(logits[i, : len(d) + 1], state.seen, len(state.generated), d)
            accepted = len(tokens) - 1
            if accepted < len(d):  # roll the rejected drafted tokens back
                self.cache.truncate(slot, len(state.seen) + accepted)
            if d:
                row = state.speculation
                each = self.draft.cost if row.drafted_by == "model" and self.draft is not None else 0.0
                row.sources[row.drafted_by].record(len(d), accepted, each)
                self._sync_draft(slot, row, len(state.seen) + accepted)
            self.stats.drafted += len(d)
            self.stats.accepted += accepted
            self.stats.tokens += len(tokens)
            out.append(StepResult(tokens, logits[i, : len(tokens)], len(d)))
        if lone:
            per_token, kind = (self.clock() - t_step) / len(out[0].tokens), bool(drafts[0])
            self._lone_seen[kind] += 1
            if not kind or self._lone_seen[kind] > 1:  # a first drafting step prefills the draft
                self._lone_s[kind].append(per_token)
        return out

    def _guard(self) -> bool:
        """Whether a lone greedy sequence with a draft model may draft this step: not where its
        drafting steps measured slower per token than its plain ones (medians; but for a probe
        every ``GUARD_PROBE`` steps), and a plain step now and then to keep that measure fresh.
        Drafting is measured first, then two plain steps."""
        self._lone_steps += 1
        probe = self._lone_steps % GUARD_PROBE == 0
        drafting, plain = self._lone_s[True], self._lone_s[False]
        if len(drafting) < 2:
            return True
        if len(plain) < 2:
            return False
        if statistics.median(drafting) > statistics.median(plain) * (1 + GUARD_MARGIN):
            return probe
        return not probe

    # drafting ---------------------------------------------------------------------------------
    def _row(self, slot: int, state: SequenceState) -> _Row:
        row = state.speculation
        if row is None:  # a sequence new here: what the draft rows of its slot hold is another's
            self.release(slot)
            lookup = PromptLookup(self.max_ngram, self.min_ngram) if state.config.prompt_lookup else None
            row = state.speculation = _Row(lookup)
        return row

    @staticmethod
    def _source(row: _Row, key: Any) -> Source:
        source = row.sources.get(key)
        if source is None:
            lookup = key != "model"
            source = row.sources[key] = Source.new(
                NGRAM_PRIOR.get(key, PRIOR) if lookup else PRIOR, row.lookup_probes if lookup else None
            )
        return source

    @property
    def _draft_max(self) -> int:
        return self.draft.max_tokens if self._draft_cache is not None and self.draft else 0

    def _drafts(
        self,
        slots: Sequence[int],
        states: Sequence[SequenceState],
        choosers: Sequence[TokenChooser],
        guard: bool = False,
    ) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in slots]
        if not self.can_verify or (guard and not self._guard()):
            return drafts
        plans: list[Plan] = []
        cost = self.draft.cost if self.draft is not None else 0.0  # one draft pass, in target passes
        for i, (slot, state) in enumerate(zip(slots, states, strict=True)):
            row = self._row(slot, state)
            room = min(
                state.config.max_new_tokens - len(state.generated) - 1,  # tokens it may still emit
                self.cache.capacity - len(state.seen),  # the chunk must fit its slot
            )
            found = row.lookup.match(state.seen) if row.lookup is not None else None
            options = []
            if found is not None:
                options.append((found[1], min(room, state.config.prompt_lookup), found[0]))
            if self._draft_max and self.draft is not None:
                options.append(("model", min(room, self._draft_max), None))
            # the first source whose rate makes drafting pay, else the first (a probe's)
            made = [
                Plan(i, key, self._source(row, key), most, at, 0.0 if at is not None else cost)
                for key, most, at in options
                if most > 0
            ]
            if made:
                plans.append(next((p for p in made if p.want), made[0]))
        # A sampled sequence drafts what its own rate is worth (or a probe), whatever else is in the
        # pass: its draws, and so a seed's tokens, do not depend on the other sequences. Greedy ones
        # fill the pass's width (their tokens do not depend on how many were drafted).
        own = {
            p.index: p.want or int(p.source.probe_due()) for p in plans if choosers[p.index].config.do_sample
        }
        # Their width runs as one pass only where every row's padded chunk fits its slot and the
        # slots are one range (the server's batch may have gaps): else the cache verifies row by
        # row, a pass each, and a plain step costs less.
        one_range = max(slots) - min(slots) + 1 == len(slots)
        fits = min(self.cache.capacity - len(s.seen) for s in states) if one_range else 0
        greedy = self._width([p for p in plans if p.index not in own], len(slots))
        width = max([min(greedy, fits), *own.values()])
        by_model: dict[int, int] = {}  # index -> drafted tokens asked of the draft model
        for plan in plans if width else []:
            n = own.get(plan.index, plan.tokens(width))
            if not n:
                continue
            row = states[plan.index].speculation
            row.drafted_by = plan.key
            if plan.at is not None:
                drafts[plan.index] = PromptLookup.continuation(states[plan.index].seen, plan.at, n)
            else:
                by_model[plan.index] = n
        if by_model:
            for i, d in self._model_drafts(slots, states, choosers, by_model).items():
                drafts[i] = d
        return drafts

    def _measure(self, rows: int, width: int, seconds: float) -> None:
        if rows < 2:
            return
        plain = self._plain_s.get(rows)
        if width == 0:
            self._plain_s[rows] = seconds if plain is None else KEEP * plain + (1 - KEEP) * seconds
            self.token_cost += (TOKEN_COST - self.token_cost) * DRIFT
        elif plain is not None:
            seen = min(max((seconds / plain - 1 - PASS_COST) / (rows * width), 0.01), 1.0)
            self.token_cost = KEEP * self.token_cost + (1 - KEEP) * seen

    def _width(self, plans: list[Plan], rows: int) -> int:
        """The pass's drafted width: the one that maximises the batch's expected tokens per pass
        cost (0: a plain step). A lone sequence whose rate does not pay probes one token now and
        then (a batch does not: a probe would widen every row)."""
        if not plans:
            return 0
        if rows == 1:  # a lone sequence: what its rate is worth, or now and then a probe
            return plans[0].want or int(plans[0].source.probe_due())
        best, best_width = float(rows), 0
        expected = [p.expected for p in plans]
        for width in range(1, max([p.most for p in plans]) + 1):
            tokens = rows - len(plans) + sum(e[p.tokens(width)] for p, e in zip(plans, expected, strict=True))
            drafting = max([p.each * p.tokens(width) for p in plans])  # the draft model's batched passes
            value = tokens / (pass_cost(rows, width, self.token_cost) + drafting)
            if value > best + 1e-12:
                best, best_width = value, width
        return best_width

    def _model_drafts(
        self,
        slots: Sequence[int],
        states: Sequence[SequenceState],
        choosers: Sequence[TokenChooser],
        ask: dict[int, int],
    ) -> dict[int, list[int]]:
        """Greedy drafts of the draft model for the sequences ``ask`` names (index -> how many):
        first the tokens its cache misses (the prompt, or the last accepted ones) in one pass,
        then one pass per further drafted token."""
        self.follow()
        cache = self._draft_cache
        assert cache is not None
        ask = {i: n for i, n in ask.items() if len(states[i].seen) + n - 1 <= cache.capacity}
        first: dict[int, list[int]] = {}
        more: dict[int, list[int]] = {}
        for i in ask:
            row, seen = states[i].speculation, states[i].seen
            (more if row.draft_len else first)[i] = seen[row.draft_len :]
        logits: dict[int, np.ndarray] = {}
        for chunks, run in ((first, cache.prefill), (more, cache.extend)):
            if chunks:
                out = run([slots[i] for i in chunks], list(chunks.values()))
                logits.update(zip(chunks, out, strict=True))
        drafts: dict[int, list[int]] = {i: [] for i in ask}
        while True:
            for i, row_logits in logits.items():
                # the request's processors, so the draft is the target's greedy pick if it agrees
                penalised = states[i].config.repetition_penalty != 1.0
                seen = [*states[i].seen, *drafts[i]] if penalised else states[i].seen
                x = choosers[i].process(row_logits[None], [seen], len(states[i].generated) + len(drafts[i]))
                drafts[i].append(int(np.argmax(x[0])))
            for i in ask:
                states[i].speculation.draft_len = cache.length(slots[i])
            going = [i for i in ask if len(drafts[i]) < ask[i]]
            if not going:
                return drafts
            out = cache.decode([slots[i] for i in going], [drafts[i][-1] for i in going])
            logits = dict(zip(going, out, strict=True))

    def _sync_draft(self, slot: int, row: _Row, accepted_len: int) -> None:
        """The draft model's cache keeps what it shares with the accepted tokens: its own drafts
        up to the first rejected one (``accepted_len`` = the tokens the target keeps)."""
        if row.draft_len > accepted_len and self._draft_cache is not None:
            self._draft_cache.truncate(slot, accepted_len)
            row.draft_len = accepted_len
