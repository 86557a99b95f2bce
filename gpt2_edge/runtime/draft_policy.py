"""How many tokens to draft: each source's acceptance rate against a cost model of a verifying
pass (``runtime.speculative`` asks it every step). Torch-free, deterministic: it depends on the
tokens only, never on timings, so a seeded sampled request is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The cost model of a verifying pass over k drafted tokens, in plain steps: 1 + PASS_COST + TOKEN_COST
# * k. Measured on 2 CPU cores: 124M (memory-bound) ~1.03 + 0.035 k; the shipped 4-layer model
# (0.5 ms steps, compute-bound) ~1.3 + 0.13 k. These constants sit between: neither drafts where
# it loses much. Fixed, not timed, so the policy is a function of the tokens.
PASS_COST = 0.05
TOKEN_COST = 0.10
PRIOR = 0.5  # acceptance rate assumed before any evidence (worth one drafted token)
NGRAM_PRIOR = {1: 0.15, 2: 0.35}  # shorter n-gram matches are weaker evidence (3-grams, model: PRIOR)
KEEP = 0.8  # evidence kept per verification: a source's rate follows the last few drafts
MAX_WAIT = 32  # most drafts a source with a low rate declines before a one-token probe


def expected_tokens(rate: float, most: int) -> list[float]:
    """Tokens a pass emits when k = 0..``most`` drafted tokens are each accepted with probability
    ``rate``: 1 + rate + ... + rate^k (the accepted run, then the target's own token)."""
    out, term = [1.0], 1.0
    for _ in range(most):
        term *= rate
        out.append(out[-1] + term)
    return out


def pass_cost(rows: int, width: int, token_cost: float = TOKEN_COST) -> float:
    """A pass over ``rows`` sequences each drafting up to ``width`` tokens, in plain steps. Every
    row is padded to the widest, so the drafted positions cost ``rows * width`` x ``token_cost``
    (the default: a conservative guess for batches; ``Speculator`` measures it for a batch)."""
    return 1.0 if width == 0 else 1 + PASS_COST + token_cost * rows * width


def draft_length(rate: float, most: int, expected: list[float] | None = None, each: float = 0.0) -> int:
    """The number of drafted tokens (0..``most``) that maximises a lone sequence's expected tokens
    per pass cost when each is accepted with probability ``rate`` and costs ``each`` to draft (a
    draft model's pass; prompt lookup's are free)."""
    expected = expected or expected_tokens(rate, most)
    best, best_k = 1.0, 0
    for k in range(1, most + 1):
        value = expected[k] / (1 + PASS_COST + TOKEN_COST * k + each * k)  # pass_cost(1, k) + drafting
        if value > best + 1e-12:
            best, best_k = value, k
    return best_k


@dataclass
class Probes:
    """When a sequence whose drafts do not pay tries one drafted token again: after ``wait``
    declined drafts, ``wait`` doubling (up to ``MAX_WAIT``) while they keep not paying. A row's
    prompt-lookup sources share one (text without matches is one property of the row)."""

    waited: int = 0  # drafts declined since the last probe
    wait: int = 1  # drafts to decline before the next probe


@dataclass
class Source:
    """The acceptance record of one way of drafting for one sequence."""

    hits: float = PRIOR  # accepted drafted tokens, decayed
    misses: float = 1 - PRIOR  # rejections, decayed
    probes: Probes = field(default_factory=Probes)
    _worth: tuple[int, float, int] | None = field(default=None, repr=False)

    @classmethod
    def new(cls, prior: float, probes: Probes | None = None) -> Source:
        return cls(prior, 1 - prior, probes or Probes())

    @property
    def rate(self) -> float:
        return self.hits / (self.hits + self.misses)

    def probe_due(self) -> bool:
        """Count one declined draft; True when a one-token probe is due."""
        p = self.probes
        p.waited += 1
        if p.waited < p.wait:
            return False
        p.waited = 0
        return True

    def worth(self, most: int, each: float) -> int:
        """``draft_length`` at this source's rate (kept until the next ``record``)."""
        if self._worth is None or self._worth[:2] != (most, each):
            self._worth = (most, each, draft_length(self.rate, most, each=each))
        return self._worth[2]

    def record(self, drafted: int, accepted: int, each: float = 0.0) -> None:
        """A verification's outcome: ``accepted`` of ``drafted`` tokens (each costing ``each``)."""
        self._worth = None
        self.hits = KEEP * self.hits + accepted
        self.misses = KEEP * self.misses + (accepted < drafted)
        if draft_length(self.rate, 1, each=each) == 0:  # not worth drafting: probe ever more rarely
            self.probes.wait = min(2 * self.probes.wait, MAX_WAIT)
        else:
            self.probes.wait = 1


class Plan:
    """What one sequence could draft this step: ``most`` tokens (its maximum, its room) from its
    source ``key`` (an n-gram length, or "model" at ``each`` per drafted token), prompt lookup's
    continuation starting at ``at``."""

    def __init__(
        self, index: int, key: Any, source: Source, most: int, at: int | None, each: float = 0.0
    ) -> None:
        self.index, self.key, self.source, self.most, self.at = index, key, source, most, at
        self.each = each
        self.want = source.worth(most, each)  # what its rate is worth alone

    @property
    def expected(self) -> list[float]:
        return expected_tokens(self.source.rate, self.most)

    def tokens(self, width: int) -> int:
        """Tokens it drafts in a pass ``width`` wide: prompt lookup fills the width (the padded
        positions are computed anyway), the draft model drafts what its rate is worth (>= 1)."""
        if self.at is not None:
            return min(self.most, width)
        return min(max(self.want, 1), width)
