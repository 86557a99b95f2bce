"""The accuracy gate: a variant against the fp32 bundle of the same checkpoint, on held-out text.

Measures perplexity (the foundation's sliding window), mean KL(fp32 || variant) of next-token
distributions, top-1 agreement, and how many of the first 64 greedy tokens agree on a set of
prompts; the gate on the perplexity increase comes from ``gpt2_edge.tolerances``.

A variant whose prompt chunks run another graph than its generated tokens (int4's int8 prompt
graph) is also measured as it runs (``served_perplexity``): each window's context through the
prompt graph, its scored tokens through the main graph over that cache; the gate holds both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..model.evaluate import sliding_windows
from ..progress import Progress
from ..runtime.generator import decode
from ..runtime.sampling import GenerationConfig, log_softmax
from ..runtime.types import can_verify
from ..tolerances import TOLERANCES

GREEDY_TOKENS = 64


@dataclass
class AccuracyReport:
    precision: str
    perplexity_fp32: float
    perplexity: float
    ppl_increase: float  # relative: 0.01 = +1%
    mean_kl: float  # nats per token, KL(fp32 || variant)
    top1_agreement: float
    greedy_agreement: float  # fraction of the first GREEDY_TOKENS greedy tokens that agree, over prompts
    tokens: int
    gate: float | None = None
    passed: bool = True
    # the variant as it runs where prompts take another graph (prefill the context, decode the rest)
    perplexity_served: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gate = f" (gate +{100 * self.gate:.1f}%)" if self.gate is not None else ""
        served = ""
        if self.perplexity_served is not None:
            up = self.perplexity_served / self.perplexity_fp32 - 1
            served = f"; served (prompt graph, then decoding) {self.perplexity_served:.3f} ({100 * up:+.2f}%)"
        return (
            f"{self.precision}: perplexity {self.perplexity:.3f} vs fp32 {self.perplexity_fp32:.3f} "
            f"({100 * self.ppl_increase:+.2f}%{gate}), mean KL {self.mean_kl:.4f}, top-1 agreement "
            f"{100 * self.top1_agreement:.2f}%, greedy {100 * self.greedy_agreement:.1f}% of "
            f"{GREEDY_TOKENS} tokens agree{served}"
        )


def eval_prompts(ids: list[int], count: int = 8, length: int = 16) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens spread evenly over the evaluation text."""
    n = len(ids)
    return [ids[i : i + length] for i in range(0, max(1, n - length), max(1, n // count))][:count]


def gate_for(precision: str) -> float | None:
    family = precision.split("-")[0]
    tol = TOLERANCES.get(family)
    return tol.max_ppl_increase if tol else None


def compare(
    ref,
    variant,
    ids: list[int],
    precision: str,
    max_length: int,
    stride: int | None = None,
    prompts: list[list[int]] | None = None,
    eos_token_id: int | None = None,
    n_ctx: int = 1024,
    progress: bool = False,
) -> AccuracyReport:
    """Run both models over the same sliding windows and prompts; judge by the precision's gate."""
    stride = stride or max_length // 2
    wins = sliding_windows(len(ids), max_length, stride)
    arr = np.asarray(ids, dtype=np.int64)
    nll_r = nll_q = kl = 0.0
    agree = count = 0
    with Progress(wins, enabled=progress, desc=f"gate {precision}", unit="window") as it:
        for begin, end, n_target in it:
            w = arr[begin:end][None, :]
            lr = log_softmax(np.asarray(ref.logits(w)[0], np.float64))[-n_target - 1 : -1]
            lq = log_softmax(np.asarray(variant.logits(w)[0], np.float64))[-n_target - 1 : -1]
            tgt = w[0, -n_target:]
            rows = np.arange(n_target)
            nll_r -= float(lr[rows, tgt].sum())
            nll_q -= float(lq[rows, tgt].sum())
            kl += float((np.exp(lr) * (lr - lq)).sum())
            agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
            count += n_target
    ppl_r, ppl_q = math.exp(nll_r / count), math.exp(nll_q / count)
    served = None
    if variant.capabilities.prompt_graph:
        served = served_perplexity(variant, arr, wins, progress=progress, desc=f"served {precision}")

    greedy = 1.0
    if prompts:
        new = min(GREEDY_TOKENS, n_ctx - max(map(len, prompts)))
        cfg = GenerationConfig(max_new_tokens=new, ignore_eos=True)
        same = total = 0
        for p in Progress(prompts, enabled=progress, desc=f"greedy {precision}", unit="prompt"):
            a, b = (
                decode(m, [p], cfg, eos_token_id=None, n_ctx=n_ctx, detokenize=lambda _: "")[0].token_ids
                for m in (ref, variant)
            )
            first_diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
            same += first_diff  # tokens that agree before the first divergence
            total += len(a)
        greedy = same / total
    gate = gate_for(precision)
    increase = max(ppl_q, served or ppl_q) / ppl_r - 1
    return AccuracyReport(
        precision,
        ppl_r,
        ppl_q,
        increase,
        kl / count,
        agree / count,
        greedy,
        count,
        gate,
        passed=gate is None or increase <= gate,
        perplexity_served=served,
    )


def served_perplexity(
    model, ids: np.ndarray, windows: list[tuple[int, int, int]], progress: bool = False, desc: str = "served"
) -> float:
    """Perplexity over the same targets as ``compare``'s, computed the way generation runs: each
    window's context goes in as a prompt (``prefill``: a prompt graph where the model has one), its
    scored tokens through the main graph over that KV cache, all in one pass as speculative
    decoding verifies drafts (``verify``; a cache that cannot verify decodes them one at a time)."""
    nll = 0.0
    count = 0
    with Progress(windows, enabled=progress, desc=desc, unit="window") as it:
        for begin, end, n_target in it:
            w = ids[begin:end]
            cache = model.new_cache(1, end - begin)
            rows = [cache.prefill([0], [w[: len(w) - n_target].tolist()])]
            rest = w[len(w) - n_target : -1].tolist()
            if rest and can_verify(cache):
                rows.append(cache.verify([0], [rest])[0])
            else:
                rows += [cache.decode([0], [t]) for t in rest]
            lq = log_softmax(np.asarray(np.concatenate(rows), np.float64))
            nll -= float(lq[np.arange(n_target), w[-n_target:]].sum())
            count += n_target
    return math.exp(nll / count)
