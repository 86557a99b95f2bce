"""Token selection in pure numpy, with Hugging Face ``generate`` semantics.

First, as OpenAI and vLLM do, ``logit_bias`` and then a structured-output constraint's mask of
allowed tokens (``runtime.constraints``; the mask comes from the sequence, one per row). Then, in
order as in transformers: logits processors (repetition penalty, min-new-tokens) apply in greedy
and sampling alike; then the sampling warpers temperature -> top-k -> top-p; then a draw from a
seeded ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import Gpt2EdgeError
from .constraints import Constraint

NEG_INF = -np.inf
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: [-100, 100]; -100 bans a token, +100 forces it
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit on entries


@dataclass(frozen=True)
class GenerationConfig:
    """How to continue a prompt. Greedy unless ``do_sample`` (temperature 0 also means greedy)."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0  # eos is suppressed until this many tokens exist
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # HF rule: divide positive / multiply negative logits of seen tokens
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings (not included in the text)
    truncate: bool = False  # left-truncate a prompt that does not fit instead of refusing it
    num_beams: int = 1  # > 1: beam search (HF semantics), greedy beams only
    length_penalty: float = 1.0  # beam score = sum logprob / generated_length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never", as in transformers
    ignore_eos: bool = False  # keep decoding past eos to max_new_tokens (benchmarks; vLLM, llama.cpp)
    # Speculative decoding by prompt lookup: at most this many tokens drafted per step from an
    # n-gram match in the prompt and text so far, verified in one pass (0 = off; in-place KV only).
    # Greedy output is unchanged, sampling keeps the target's distribution (runtime.speculative).
    prompt_lookup: int = 0
    # OpenAI's logit_bias: token id -> bias in [-100, 100] added to its logit before anything else
    # (a dict is taken; kept as sorted (id, bias) pairs, so the config stays hashable). -100 bans the
    # token outright (-inf); +100 forces it: the tokens at +100 are then the only candidates.
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    # Structured output (runtime.constraints): the text must match it; greedy, sampling and
    # speculative decoding; not beam search.
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        self._check_types()
        if self.max_new_tokens < 1:
            raise Gpt2EdgeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise Gpt2EdgeError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise Gpt2EdgeError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.do_sample and self.temperature == 0:
            raise Gpt2EdgeError(
                "temperature must be > 0 when sampling (temperature 0 without sampling is greedy)"
            )
        if self.top_k < 0:
            raise Gpt2EdgeError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise Gpt2EdgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise Gpt2EdgeError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise Gpt2EdgeError(f"num_beams must be >= 1, got {self.num_beams}")
        if any(not s for s in self.stop):
            raise Gpt2EdgeError("stop strings must be non-empty")
        if self.prompt_lookup < 0:
            raise Gpt2EdgeError(f"prompt_lookup must be >= 0 (0 = off), got {self.prompt_lookup}")
        if self.prompt_lookup and self.num_beams != 1:
            raise Gpt2EdgeError(
                f"prompt_lookup (speculative decoding) needs num_beams=1, got num_beams={self.num_beams}; "
                "drop one of them"
            )
        if self.constraint is not None and self.num_beams != 1:
            raise Gpt2EdgeError(
                f"constraint (structured output) needs num_beams=1, got num_beams={self.num_beams}; "
                "beam search cannot keep beams to a constraint here"
            )
        if self.constraint is not None and self.ignore_eos:
            raise Gpt2EdgeError("constraint (structured output) ends the text itself: drop ignore_eos")

    def _check_types(self) -> None:
        """Refuse values of the wrong type before they fail deep inside ``generate``: a float where a
        count is meant, a bool for a number, a bare string of stops (it would split into letters).
        numpy scalars are taken as the Python numbers they hold."""

        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # frozen: normalise in place once, here

        for name in ("max_new_tokens", "min_new_tokens", "top_k", "num_beams", "prompt_lookup"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise Gpt2EdgeError(f"{name} must be an integer, got {value!r}")
            put(name, int(value))
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(
                value, (int, float, np.integer, np.floating)
            ):
                finite = "finite " if name == "length_penalty" else ""  # nan/inf: an empty beam text
                raise Gpt2EdgeError(f"{name} must be a {finite}number, got {value!r}")
            put(name, float(value))
        if not math.isfinite(self.length_penalty):
            raise Gpt2EdgeError(f"length_penalty must be a finite number, got {self.length_penalty}")
        seed = self.seed
        if seed is not None:
            if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
                raise Gpt2EdgeError(f"seed must be a non-negative integer, got {seed!r}")
            put("seed", int(seed))
        for name in ("do_sample", "truncate", "ignore_eos"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise Gpt2EdgeError(f"{name} must be True or False, got {value!r}")
            put(name, bool(value))
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise Gpt2EdgeError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        stop = self.stop
        if isinstance(stop, (str, bytes)) or not isinstance(stop, (list, tuple)):
            raise Gpt2EdgeError(
                f"stop must be a list or tuple of strings, got {stop!r}; pass [{stop!r}] for one stop string"
                if isinstance(stop, str)
                else f"stop must be a list or tuple of strings, got {stop!r}"
            )
        for i, s in enumerate(stop):
            if not isinstance(s, str):
                raise Gpt2EdgeError(f"stop[{i}] must be a string, got {s!r}")
        put("stop", tuple(stop))
        put("logit_bias", logit_bias_pairs(self.logit_bias))
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise Gpt2EdgeError(
                f"constraint must be a Constraint (Constraint.json_schema(...), ...), got {self.constraint!r}"
            )


def logit_bias_pairs(value: object) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted ``(token id, bias)`` pairs, checked: ids are non-negative integers
    (a dict's keys may be strings of them, as JSON has), biases numbers in [-100, 100], at most 300."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise Gpt2EdgeError(f"logit_bias must be a dict of token id -> bias, got {value!r}")
    if len(items) > MAX_LOGIT_BIAS_ENTRIES:
        raise Gpt2EdgeError(f"logit_bias has {len(items)} entries; at most {MAX_LOGIT_BIAS_ENTRIES}")
    out: dict[int, float] = {}
    for item in items:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise Gpt2EdgeError(f"logit_bias entries are (token id, bias) pairs, got {item!r}")
        key, bias = item
        token: object = key
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            token = int(key)
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)) or token < 0:
            raise Gpt2EdgeError(f"logit_bias: {key!r} is not a token id (a non-negative integer)")
        if isinstance(bias, (bool, np.bool_)) or not isinstance(bias, (int, float, np.integer, np.floating)):
            raise Gpt2EdgeError(f"logit_bias[{key}] must be a number, got {bias!r}")
        if not -MAX_LOGIT_BIAS <= float(bias) <= MAX_LOGIT_BIAS:  # also refuses nan
            raise Gpt2EdgeError(f"logit_bias[{key}] = {bias} is outside [-100, 100]")
        out[int(token)] = float(bias)
    return tuple(sorted(out.items()))


def check_logit_bias_vocab(config: GenerationConfig, vocab_size: int) -> None:
    """Refuse a ``logit_bias`` token outside a vocabulary of ``vocab_size`` tokens, by name."""
    bad = [t for t, _ in config.logit_bias if t >= vocab_size]
    if bad:
        raise Gpt2EdgeError(f"logit_bias: token id {bad[0]} is not in this vocabulary (0..{vocab_size - 1})")


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    """OpenAI's ``logit_bias`` on ``(B, V)`` logits (a new array): each bias added to its token's
    logit; a token at -100 banned (-inf), and where any token is at +100 only those remain."""
    if not bias:
        return logits
    ids = np.fromiter((t for t, _ in bias), np.int64, len(bias))
    values = np.fromiter((b for _, b in bias), np.float64, len(bias))
    if ids.max() >= logits.shape[-1]:
        raise Gpt2EdgeError(f"logit_bias: token id {int(ids.max())} is not in this vocabulary")
    out = logits.astype(np.float64, copy=True)
    out[:, ids] += values
    out[:, ids[values <= -MAX_LOGIT_BIAS]] = NEG_INF
    forced = ids[values >= MAX_LOGIT_BIAS]
    if len(forced):
        keep = out[:, forced]
        out[:] = NEG_INF
        out[:, forced] = keep
    return out


def apply_allowed(logits: np.ndarray, allowed: Sequence[np.ndarray | None] | None) -> np.ndarray:
    """A constraint's masks on ``(B, V)`` logits: row ``b``'s disallowed tokens -inf where
    ``allowed[b]`` is a ``(V,)`` bool mask (None: the row is free), in the logits' own dtype (one
    ``np.where`` over the batch: float64 copies and per-row scatters cost a batch of 8 more than a
    step of the int4 model). Where a row would have no token left (``logit_bias`` forced one the
    constraint forbids), the caller (``TokenChooser.process``) lets the constraint win."""
    if allowed is None or all(a is None for a in allowed):
        return logits
    if len(allowed) == 1:
        keep = allowed[0][None, :]
    else:
        free = np.ones(logits.shape[-1], dtype=np.bool_)
        keep = np.stack([free if a is None else a for a in allowed])
    return np.where(keep, logits, logits.dtype.type(NEG_INF))


# processors (logits -> logits), each on a (B, V) float array --------------------------------
def apply_repetition_penalty(logits: np.ndarray, seen: Sequence[Sequence[int]], penalty: float) -> np.ndarray:
    """HF ``RepetitionPenaltyLogitsProcessor``: every token already in the row is penalised once."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for b, ids in enumerate(seen):
        if len(ids) == 0:
            continue
        idx = np.unique(np.asarray(ids, dtype=np.int64))
        s = out[b, idx]
        out[b, idx] = np.where(s < 0, s * penalty, s / penalty)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """HF ``TemperatureLogitsWarper``, shifted so each row's largest logit is 0 first (softmax,
    top-k and top-p do not change under a shift): a tiny temperature such as 5e-324 then gives
    0 for the best tokens and -inf for the rest (the greedy limit) instead of inf - inf = NaN."""
    if temperature == 1.0:
        return logits
    with np.errstate(over="ignore", invalid="ignore"):
        return (logits - np.max(logits, axis=-1, keepdims=True)) / temperature


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """HF ``TopKLogitsWarper``: keep logits >= the k-th largest (ties kept), others -inf."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -top_k, axis=-1)[..., -top_k][..., None]
    return np.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """HF ``TopPLogitsWarper``: drop the low tail whose total probability is <= 1 - top_p."""
    if top_p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending, as HF sorts
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    cum = np.cumsum(softmax(sorted_logits), axis=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1] = False  # min_tokens_to_keep = 1
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, NEG_INF, logits)


def softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


class TokenChooser:
    """Picks the next token of every row from last-position logits ``(B, V)``."""

    def __init__(self, config: GenerationConfig, eos_token_id: int | None) -> None:
        self.config = config
        self.eos_token_id = eos_token_id
        self.rng = np.random.default_rng(config.seed)

    def process(
        self,
        logits: np.ndarray,
        seen: Sequence[Sequence[int]],
        n_generated: int,
        allowed: Sequence[np.ndarray | None] | None = None,
    ) -> np.ndarray:
        """Logits after logit_bias, the constraint's ``allowed`` masks (one per row, or None),
        processors and (when sampling) warpers, as float64."""
        c = self.config
        x = np.asarray(logits, dtype=np.float64)
        if c.logit_bias:
            biased = apply_logit_bias(x, c.logit_bias)
            if allowed is not None:
                masked = apply_allowed(biased, allowed)
                empty = ~np.isfinite(masked).any(axis=-1)
                x = np.where(empty[:, None], apply_allowed(x, allowed), masked) if empty.any() else masked
            else:
                x = biased
        else:
            x = apply_allowed(x, allowed)
        x = apply_repetition_penalty(x, seen, c.repetition_penalty)
        if n_generated < c.min_new_tokens and self.eos_token_id is not None:
            x = x.copy()
            eos = x[:, self.eos_token_id].copy()
            x[:, self.eos_token_id] = NEG_INF
            only_eos = ~np.isfinite(x).any(axis=-1)  # a constraint that allows nothing but eos wins
            x[only_eos, self.eos_token_id] = eos[only_eos]
        if c.do_sample:
            x = apply_top_p(apply_top_k(apply_temperature(x, c.temperature), c.top_k), c.top_p)
        return x

    def _plain_greedy(self, n_generated: int) -> bool:
        """Greedy with no processor in effect: the argmax of the raw logits (no float64 copy)."""
        c = self.config
        return (
            not c.do_sample
            and c.repetition_penalty == 1.0
            and not c.logit_bias
            and not (n_generated < c.min_new_tokens and self.eos_token_id is not None)
        )

    def __call__(
        self,
        logits: np.ndarray,
        seen: Sequence[Sequence[int]],
        n_generated: int,
        allowed: Sequence[np.ndarray | None] | None = None,
    ) -> np.ndarray:
        """The next token of every row; ``allowed``: each row's constraint mask ``(V,)`` bool, or
        None for a free row (no mask work at all when the whole argument is None)."""
        if allowed is not None and all(a is None for a in allowed):
            allowed = None
        if self._plain_greedy(n_generated):
            top = np.argmax(logits, axis=-1)
            if allowed is None:
                return top
            # A row's top token that its constraint allows is its masked argmax too (the first
            # maximum stays first): only rows whose top token is barred pay for the mask.
            barred = [
                b for b, (a, t) in enumerate(zip(allowed, top, strict=True)) if a is not None and not a[t]
            ]
            if barred:
                top[barred] = np.argmax(apply_allowed(logits[barred], [allowed[b] for b in barred]), axis=-1)
            return top
        x = self.process(logits, seen, n_generated, allowed)
        if not self.config.do_sample:
            return np.argmax(x, axis=-1)
        probs = softmax(x)
        cdf = np.cumsum(probs, axis=-1)
        u = self.rng.random(len(x))[:, None] * cdf[:, -1:]
        return np.minimum((cdf <= u).sum(axis=-1), x.shape[-1] - 1)

    def verify(
        self,
        logits: np.ndarray,
        seen: Sequence[int],
        n_generated: int,
        draft: Sequence[int],
        draft_probs: np.ndarray | None = None,
        allowed: Sequence[np.ndarray] | None = None,
    ) -> list[int]:
        """The tokens one speculative step emits for one sequence: the accepted prefix of ``draft``
        and one more (the target's own token where a drafted one is rejected, or the token after
        a draft accepted whole).

        ``logits`` ``(len(draft) + 1, V)``: the target's logits after the pending token and after
        each drafted one; ``seen``: the prompt and the tokens generated so far (``n_generated``),
        the processors' context, extended by each accepted token in turn. Greedy: a drafted token
        is accepted when it is the token plain decoding picks there. Sampling: the speculative
        sampling rule (Leviathan et al. 2023; Chen et al. 2023), so the emitted tokens have the
        distribution ``p`` of plain sampling (after processors and warpers): accept a drafted ``x``
        with probability ``min(1, p(x) / q(x))``, else draw from ``norm(max(0, p - q))``. ``q`` is
        ``draft_probs[i]``, or a point mass at the drafted token (prompt lookup, greedy drafts).
        ``allowed``: with a constraint, its mask at each of the ``len(draft) + 1`` positions (the
        matcher advanced over the drafted tokens before it; each drafted token must fit it).
        """
        out: list[int] = []
        penalised = self.config.repetition_penalty != 1.0
        for i in range(len(draft) + 1):
            mask = None if allowed is None else [allowed[i]]
            if self._plain_greedy(n_generated + i):
                x = logits[i : i + 1] if mask is None else apply_allowed(logits[i : i + 1], mask)
            else:
                context = [list(seen) + out] if penalised else [seen]
                x = self.process(logits[i : i + 1], context, n_generated + i, mask)
            if not self.config.do_sample:
                out.append(int(np.argmax(x[0])))
                if i == len(draft) or out[-1] != draft[i]:
                    return out
                continue
            p = softmax(x)[0]
            if i == len(draft):
                out.append(self._draw(p))
                return out
            token = int(draft[i])
            q = None if draft_probs is None else np.asarray(draft_probs[i], np.float64)
            if self.rng.random() * (1.0 if q is None else q[token]) < p[token]:
                out.append(token)
                continue
            residual = np.maximum(p - q, 0.0) if q is not None else p.copy()
            if q is None:
                residual[token] = 0.0
            out.append(self._draw(residual if residual.sum() > 0 else p))
            return out
        raise AssertionError("unreachable")

    def _draw(self, weights: np.ndarray) -> int:
        """One token drawn from ``weights`` (non-negative, not necessarily normalised), by the
        inverse CDF as ``__call__`` draws."""
        cdf = np.cumsum(weights)
        u = self.rng.random() * cdf[-1]
        return int(min((cdf <= u).sum(), len(cdf) - 1))


def openai_generation_config(
    *,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_tokens: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    logit_bias: dict[int, float] | None = None,
    constraint: Constraint | None = None,
) -> GenerationConfig:
    """OpenAI-style sampling parameters (``/v1/completions``'s, with vLLM's ``top_k``) as a
    ``GenerationConfig``: temperature 0 is greedy and top_p / top_k then do nothing; any other
    temperature samples; top_k 0 or -1 is off. ``GenerationConfig`` checks the values."""
    sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_tokens,
        min_new_tokens=min_tokens,
        do_sample=sample,
        temperature=temperature if sample else 1.0,
        top_k=max(top_k, 0) if sample else 0,
        top_p=top_p if sample else 1.0,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop),
        ignore_eos=ignore_eos,
        logit_bias=tuple((logit_bias or {}).items()),
        constraint=constraint,
    )
