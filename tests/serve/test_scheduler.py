"""serve/scheduler.py without a model: the plans it makes from a queue, fake slots and a fake KV
budget (admissions oldest first within the budget, chunked prefill oldest admission first, the
step's token budget with the decoding rows first, the decode batch, prompt scoring one job a step,
slots freed and taken again)."""

from __future__ import annotations

from collections import deque

import pytest

from gpt2_edge.errors import Gpt2EdgeError
from gpt2_edge.runtime.prefix_cache import PrefixMatch
from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.serve.scheduler import Scheduler
from gpt2_edge.serve.sequences import SequenceHandle


def seq(prompt_len: int, new: int = 4) -> SequenceHandle:
    return SequenceHandle(
        list(range(1, prompt_len + 1)),
        GenerationConfig(max_new_tokens=new),
        lambda _e: None,
        eos_token_id=None,
        detokenize=lambda ids: "",
    )


class FakeBudget:
    """At most ``tokens`` KV tokens (each sequence's prompt + new tokens) in use; a sequence whose
    prompt starts with ``prefix`` reuses ``len(prefix)`` positions of slot ``prefix_slot``."""

    def __init__(self, tokens: int, prefix: list[int] | None = None, prefix_slot: int = 0) -> None:
        self.tokens = tokens
        self.prefix = prefix
        self.prefix_slot = prefix_slot
        self.calls = 0

    def need_of(self, s: SequenceHandle) -> int:
        return len(s.state.prompt) + s.state.config.max_new_tokens

    def plan(self, waiting, running, free):
        self.calls += 1
        used = sum(s.need for s in running)
        out, free = [], sorted(free)
        while waiting and free:
            s = waiting[0]
            if used + self.need_of(s) > self.tokens:
                break
            waiting.popleft()
            match = None
            if self.prefix and s.state.prompt[: len(self.prefix)] == self.prefix:
                match = PrefixMatch(self.prefix_slot, len(self.prefix))
            out.append((s, free.pop(0), match))
            used += self.need_of(s)
        return out


def test_admits_oldest_first_into_the_lowest_slots_and_the_rest_wait_in_order():
    sched = Scheduler(FakeBudget(30), n_ctx=64, max_batch=4, prefill_chunk=0)
    a, b, c, d = seq(6), seq(6), seq(20), seq(2)  # needs 10, 10, 24, 6
    waiting = deque([a, b, c, d])
    plan = sched.schedule(waiting)
    assert [(s, slot) for s, slot, _ in plan.admit] == [(a, 0), (b, 1)]
    assert list(waiting) == [c, d]  # c does not fit, and d (which would) waits behind it
    assert sched.n_active == 2 and [s.index for s in sched.running()] == [0, 1]
    assert [s.need for s in sched.running()] == [10, 10]
    # whole prompts (prefill_chunk 0): both go in at once and both are decoded this same step
    assert [(ch.slot, len(ch.tokens), ch.last) for ch in plan.prefill] == [(0, 6, True), (1, 6, True)]
    assert plan.extend == [] and plan.decode == [0, 1]
    # a leaves: c still does not fit beside b (10 + 24 > 30); b leaves too: c and d (24 + 6) go in
    assert sched.leave(0) is a
    assert sched.schedule(waiting).admit == []
    sched.leave(1)
    plan = sched.schedule(waiting)
    assert [(s, slot) for s, slot, _ in plan.admit] == [(c, 0), (d, 1)]
    assert sched.n_active == 2 and not waiting


def test_chunked_prefill_goes_oldest_admission_first_and_decodes_what_is_in():
    sched = Scheduler(FakeBudget(1000), n_ctx=64, max_batch=4, prefill_chunk=8, step_tokens=8)
    long, short = seq(20), seq(3)
    waiting = deque([long, short])
    plans = []
    for _ in range(4):
        plans.append(sched.schedule(waiting))
    # step 1: 8 tokens of the older prompt (its first chunk: a prefill); the younger waits its turn
    p = plans[0]
    assert [(c.slot, len(c.tokens), c.last) for c in p.prefill] == [(0, 8, False)]
    assert p.extend == [] and p.decode == []
    # step 2: 8 more of it (an extend); step 3: its last 4, then the younger's whole 3 (a prefill)
    assert [(c.slot, c.tokens) for c in plans[1].extend] == [(0, list(range(9, 17)))]
    assert plans[1].prefill == [] and plans[1].decode == []
    assert [(c.slot, len(c.tokens), c.last) for c in plans[2].extend] == [(0, 4, True)]
    assert [(c.slot, len(c.tokens), c.last) for c in plans[2].prefill] == [(1, 3, True)]
    assert plans[2].decode == [0, 1]  # both prompts are in after step 3's chunks: decoded with it
    assert plans[3].prefill == plans[3].extend == [] and plans[3].decode == [0, 1]
    assert [s.prefilled for s in sched.slots[:2]] == [20, 3]


def test_a_prompt_that_reuses_a_cached_prefix_prefills_only_the_rest():
    sched = Scheduler(FakeBudget(1000, prefix=[1, 2, 3, 4], prefix_slot=3), n_ctx=64, max_batch=4)
    plan = sched.schedule(deque([seq(6)]))
    ((_, slot, match),) = plan.admit
    assert (slot, match) == (0, PrefixMatch(3, 4))
    assert sched.slots[0].prefilled == 6
    # its own tokens start at position 4 and extend the copied prefix
    assert plan.prefill == [] and [(c.slot, c.tokens, c.last) for c in plan.extend] == [(0, [5, 6], True)]


def test_the_decode_batch_leaves_out_prompts_still_going_in_and_sequences_that_left():
    sched = Scheduler(FakeBudget(1000), n_ctx=64, max_batch=3, prefill_chunk=4, step_tokens=4)
    waiting = deque([seq(2), seq(10), seq(2)])
    plan = sched.schedule(waiting)  # slot 0's 2 tokens + 2 of slot 1's prompt
    assert [(c.slot, len(c.tokens)) for c in plan.prefill] == [(0, 2), (1, 2)]
    assert plan.decode == [0]
    sched.leave(0)  # its first token finished it: the engine decodes only what still runs
    assert sched.still_running(plan.decode) == []
    plan = sched.schedule(waiting)
    # slot 1 goes on (admitted before slot 2's sequence), slot 0 is free for the next admission
    assert [(s.index, s.prefilling) for s in sched.running()] == [(1, True), (2, True)]
    assert [(c.slot, len(c.tokens)) for c in plan.extend] == [(1, 4)]
    assert plan.decode == [] and plan.prefill == []


def test_cancelled_sequences_are_listed_oldest_first_and_their_slots_come_back():
    sched = Scheduler(FakeBudget(1000), n_ctx=64, max_batch=2, prefill_chunk=0)
    a, b, c = seq(2), seq(2), seq(2)
    waiting = deque([a, b, c])
    sched.schedule(waiting)
    assert list(waiting) == [c]  # no free slot: not even asked
    b.cancel()
    assert [s.index for s in sched.cancelled()] == [1]
    sched.leave(1)
    plan = sched.schedule(waiting)
    assert [(s, slot) for s, slot, _ in plan.admit] == [(c, 1)]
    assert sched.slots[1].seq is c and sched.slots[1].order == 3


def test_the_budget_is_not_asked_without_waiting_sequences_or_free_slots():
    budget = FakeBudget(1000)
    sched = Scheduler(budget, n_ctx=64, max_batch=1)
    sched.schedule(deque())
    sched.schedule(deque([seq(2)]))
    sched.schedule(deque([seq(2)]))  # the one slot is taken
    assert budget.calls == 1


def test_one_prompt_scoring_job_per_step():
    sched = Scheduler(FakeBudget(1000), n_ctx=64, max_batch=1)
    scoring = deque(["job1", "job2"])
    assert sched.schedule(deque(), scoring).score == "job1"
    plan = sched.schedule(deque(), scoring)
    assert plan.score == "job2" and not plan.empty
    assert sched.schedule(deque(), scoring).empty


def test_a_burst_of_prompts_goes_in_within_one_step_and_decodes_together():
    """The step budget (not one chunk per step) decides how many prompts go in: a burst of 4
    prompts of 6 starts together (their first tokens in one step), where a budget of 8 tokens per
    step (the decoding rows' included) starts them one step apart; 0 is no budget."""
    for step_tokens, starts in ((32, [1, 1, 1, 1]), (0, [1, 1, 1, 1]), (8, [1, 2, 3, 4])):
        sched = Scheduler(FakeBudget(1000), n_ctx=64, max_batch=4, prefill_chunk=8, step_tokens=step_tokens)
        waiting = deque(seq(6) for _ in range(4))
        first: dict[int, int] = {}
        for step in range(1, 5):
            plan = sched.schedule(waiting)
            for c in (*plan.prefill, *plan.extend):
                if c.last:
                    first[c.slot] = step
        assert [first[i] for i in range(4)] == starts, step_tokens


def test_the_decoding_rows_take_their_share_of_the_step_budget_first():
    sched = Scheduler(FakeBudget(1000), n_ctx=64, max_batch=8, prefill_chunk=16, step_tokens=20)
    waiting = deque(seq(2) for _ in range(5))
    plan = sched.schedule(waiting)
    assert [len(c.tokens) for c in plan.prefill] == [2] * 5 and plan.decode == [0, 1, 2, 3, 4]
    # 5 decoding rows leave 15 of the 20 tokens: the first prompt's 10, then 5 of the second's 10
    waiting.extend([seq(10), seq(10), seq(10)])
    plan = sched.schedule(waiting)
    assert [(c.slot, len(c.tokens), c.last) for c in plan.prefill] == [(5, 10, True), (6, 5, False)]
    assert plan.decode == [0, 1, 2, 3, 4, 5]
    # the rest of the second (5; 6 rows decode: 14 left), then the third's 9 of 10
    plan = sched.schedule(waiting)
    assert [(c.slot, len(c.tokens)) for c in plan.extend] == [(6, 5)]
    assert [(c.slot, len(c.tokens), c.last) for c in plan.prefill] == [(7, 9, False)]


def test_a_long_prompt_goes_in_one_chunk_per_step_whatever_the_budget():
    sched = Scheduler(FakeBudget(1000), n_ctx=64, max_batch=2, prefill_chunk=8, step_tokens=1000)
    waiting = deque([seq(20)])
    sizes = [
        [len(c.tokens) for c in (*p.prefill, *p.extend)] for p in (sched.schedule(waiting) for _ in range(3))
    ]
    assert sizes == [[8], [8], [4]]


def test_the_oldest_prompt_progresses_when_the_decoding_rows_fill_the_budget():
    sched = Scheduler(FakeBudget(1000), n_ctx=64, max_batch=4, prefill_chunk=8, step_tokens=2)
    waiting = deque([seq(1), seq(1), seq(1)])
    sched.schedule(waiting)  # the first prompt's token; the second's (1 left after 1 decoding row)
    plan = sched.schedule(waiting)  # 2 rows decode: the budget is spent, the oldest prompt still goes in
    assert [(c.slot, len(c.tokens)) for c in plan.prefill] == [(2, 1)]
    assert plan.decode == [0, 1, 2]


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"prefill_chunk": -1}, {"step_tokens": -1}])
def test_refuses_a_shape_it_cannot_plan(kwargs):
    with pytest.raises(Gpt2EdgeError):
        Scheduler(FakeBudget(10), n_ctx=64, **kwargs)
