"""Beam search with Hugging Face ``generate`` semantics (num_beams, length_penalty, early_stopping).

As in transformers: scores are summed log-probabilities (after the logits processors), the best
``2 * num_beams`` continuations are kept each step, a continuation that ends (eos, or the length
limit) joins the finished set only if it ranks among the top ``num_beams``, with score
``sum_logprobs / generated_length ** length_penalty``, and ``early_stopping`` picks when to stop
(True: once ``num_beams`` hypotheses are finished; False: a heuristic on the current length;
"never": the canonical bound). One prompt at a time; the batch axis holds its beams.

Stop strings (``GenerationConfig.stop``) end a continuation the way eos does: a candidate whose
generated text now contains one is finished (transformers' beam search, too, applies its stopping
criteria, stop strings included, to each candidate). The result's text is cut before the stop
string with finish_reason "stop", as greedy decoding does (``sequence.SequenceState``);
transformers keeps the string in its output.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import Gpt2EdgeError
from .sampling import GenerationConfig, TokenChooser, apply_logit_bias, log_softmax
from .types import Backend, GenerationResult, fit_context, step_timings

DROPPED = -1.0e9  # the score HF gives a candidate that must not be chosen


def beam_search(
    backend: Backend,
    prompt: Sequence[int],
    config: GenerationConfig,
    *,
    eos_token_id: int | None,
    n_ctx: int,
    detokenize: Callable[[Sequence[int]], str],
) -> GenerationResult:
    """The best beam's continuation of ``prompt``."""
    if config.do_sample:
        raise Gpt2EdgeError("beam sampling is not supported: use num_beams=1 to sample, or greedy beams")
    (prompt,) = fit_context([prompt], config, n_ctx)
    nb = config.num_beams
    P = len(prompt)
    max_len = P + config.max_new_tokens
    length_penalty = config.length_penalty
    early = config.early_stopping
    # logit_bias applies to the logits, before the log-softmax (as vLLM's logprobs see it)
    processors = TokenChooser(dataclasses.replace(config, logit_bias=()), eos_token_id)

    running = np.array([list(prompt)] * nb, dtype=np.int64)  # (nb, cur_len)
    running_scores = np.full(nb, DROPPED)
    running_scores[0] = 0.0  # all beams start identical: only the first may expand at step 1
    finished: list[list[int]] = [[] for _ in range(nb)]
    finished_scores = np.full(nb, DROPPED)
    finished_flags = np.zeros(nb, dtype=bool)
    can_improve = True
    top_nb = np.arange(2 * nb) < nb

    t0 = time.perf_counter()
    cache = backend.new_cache(nb, min(n_ctx, max_len))
    logits = np.repeat(cache.prefill([0], [prompt]), nb, axis=0)  # the prompt runs once
    cache.reorder([0] * nb)
    t_first = time.perf_counter()
    cur_len, steps = P, 0
    while True:
        V = logits.shape[-1]
        # HF applies the processors to log-probabilities in beam search.
        biased = apply_logit_bias(np.asarray(logits, np.float64), config.logit_bias)
        logp = processors.process(log_softmax(biased), running.tolist(), cur_len - P)
        acc = (logp + running_scores[:, None]).reshape(-1)
        k = 2 * nb
        top = np.argpartition(-acc, k - 1)[:k]
        top = top[np.argsort(-acc[top], kind="stable")]
        top_scores = acc[top]
        src, tok = top // V, top % V
        cand = np.concatenate([running[src], tok[:, None]], axis=1)
        hits = (tok == eos_token_id) | (cur_len + 1 >= max_len)
        if config.stop:  # a continuation whose text now holds a stop string ends like eos
            hits |= np.array(
                [
                    not hit and _stop_at(detokenize(c[P:].tolist()), config.stop) is not None
                    for c, hit in zip(cand, hits, strict=True)
                ]
            )

        # the best num_beams unfinished continuations run on
        run_scores = top_scores + hits * DROPPED
        keep = np.argsort(-run_scores, kind="stable")[:nb]
        running, running_scores, parents = cand[keep], run_scores[keep], src[keep]

        # finished hypotheses: merge the newly ended top-num_beams candidates, keep the best nb
        fin = top_scores / ((cur_len + 1 - P) ** length_penalty)
        if finished_flags.all() and early is True:
            fin = fin + DROPPED
        if not can_improve:
            fin = fin + DROPPED
        just = hits & top_nb
        fin = fin + (~just) * DROPPED
        merged_scores = np.concatenate([finished_scores, fin])
        merged_seqs = finished + [c[P:].tolist() for c in cand]
        merged_flags = np.concatenate([finished_flags, just])
        best = np.argsort(-merged_scores, kind="stable")[:nb]
        finished = [merged_seqs[i] for i in best]
        finished_scores, finished_flags = merged_scores[best], merged_flags[best]

        cur_len += 1
        steps += 1
        best_len = (max_len - P) if (early == "never" and length_penalty > 0) else (cur_len - P)
        best_running = running_scores[0] / (best_len**length_penalty)
        worst_finished = finished_scores.min() if finished_flags.all() else DROPPED
        can_improve = can_improve and bool(best_running > worst_finished)
        open_beams = not (finished_flags.all() and early is True)
        if not (can_improve and open_beams and not hits.all()):
            break
        cache.reorder(parents.tolist())
        logits = cache.decode(list(range(nb)), running[:, -1].tolist())
    t_end = time.perf_counter()

    tokens = finished[0]
    reason = "eos" if tokens and tokens[-1] == eos_token_id else "length"
    text = detokenize(tokens[:-1] if reason == "eos" else tokens)
    cut = _stop_at(text, config.stop) if reason != "eos" else None
    if cut is not None:
        reason, text = "stop", text[:cut]
    timings = step_timings(t_first - t0, t_end - t_first, steps)
    timings["beam_score"] = float(finished_scores[0])
    return GenerationResult(text, tokens, reason, P, timings)


def _stop_at(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string in ``text`` starts (None: none is there)."""
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None
