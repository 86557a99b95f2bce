"""What the server's tests share: ``Run``, sequences submitted to an engine without HTTP."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import pytest

from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig, openai_generation_config
from gpt2_edge.serve.engine import Engine
from gpt2_edge.serve.metrics import Metrics
from gpt2_edge.serve.sequences import SequenceHandle, TokenEvent

# The scheduler shapes served-equals-Generator tests run through: whole prompts, chunked prefill,
# and a cache that starts small and grows within a budget of two contexts, with the prefix cache.
SCHEDULER_SHAPES = pytest.mark.parametrize(
    "scheduler",
    [
        {"prefill_chunk": 0},
        {"prefill_chunk": 5},
        {"prefill_chunk": 5, "initial_capacity": 8, "kv_budget": 128, "prefix_block": 4},
    ],
    ids=["whole", "chunked", "budget"],
)


class Run:
    """Sequences submitted to a scheduler (made with ``**scheduler``, and metrics): their tokens and
    events, every event in one log (in the order the scheduler thread sent them), the largest KV
    allocation and active count seen at any token, and a way to wait for all of them."""

    def __init__(self, gen: Generator, **scheduler) -> None:
        self.gen = gen
        self.engine = Engine(gen.backend, n_ctx=gen.backend.n_ctx, **scheduler)
        self.metrics = Metrics(self.engine.max_batch, lambda: 0, lambda: 0)
        self.engine.metrics = self.metrics
        self.log: list[tuple[str, TokenEvent | None]] = []
        self.tokens: dict[str, list[int]] = {}
        self.events: dict[str, list[TokenEvent]] = {}
        self.pending = 0
        self.done = threading.Condition()
        self.peak_kv = 0
        self.peak_active = 0

    def sequence(
        self,
        name: str,
        prompt: list[int],
        config: GenerationConfig,
        on_event: Callable[[TokenEvent], None] | None = None,
        logprobs: int | None = None,
    ) -> SequenceHandle:
        self.tokens[name] = []
        self.events[name] = []

        def sink(event: TokenEvent) -> None:
            self.log.append((name, event))
            assert event.error is None, event.error
            self.tokens[name].append(event.token)
            self.events[name].append(event)
            self.peak_kv = max(self.peak_kv, self.engine.kv_tokens_allocated)
            self.peak_active = max(self.peak_active, self.engine.active)
            if on_event is not None:
                on_event(event)
            if event.finish_reason is not None:
                with self.done:
                    self.pending -= 1
                    self.done.notify_all()

        self.pending += 1
        return SequenceHandle(
            prompt,
            config,
            sink,
            eos_token_id=self.gen.eos_token_id,
            detokenize=self.gen.tokenizer.decode,
            logprobs=logprobs,
            constraint=self.gen.compile(config),
        )

    def wait(self, timeout: float = 60, close: bool = False) -> None:
        """Until every sequence submitted finished (``close``: then close the scheduler)."""
        with self.done:
            assert self.done.wait_for(lambda: self.pending == 0, timeout), "the sequences did not finish"
        if close:
            self.engine.close()

    def alone(self, prompt: list[int], config: GenerationConfig) -> list[int]:
        """The tokens ``Generator`` alone gives."""
        return self.gen.generate(prompt, config)[0].token_ids

    def text(self, name: str) -> str:
        """What the sequence's pieces join to."""
        return "".join(e.text for e in self.events[name])

    def hits(self) -> float:
        return self.metrics.prefix_cache_lookups.labels(result="hit")._value.get()


def first_multi_token_event(
    gen: Generator, prompt: list[int], config: GenerationConfig, **scheduler
) -> tuple[Run, int]:
    """A dry run of one sequence through a one-slot scheduler (``**scheduler``: e.g. a draft), and
    the index of its first event from a step that gave it several tokens."""
    dry = Run(gen, max_batch=1, **scheduler)
    steps: list[float] = []  # decode steps so far, at each event

    def count(_event: TokenEvent) -> None:
        steps.append(dry.metrics.batch_occupancy._sum.get())

    dry.engine.start()
    dry.engine.submit([dry.sequence("a", prompt, config, on_event=count)])
    dry.wait(close=True)
    return dry, next(i for i in range(1, len(steps)) if steps[i] == steps[i - 1]) - 1


def cancel_at(run: Run, handle: SequenceHandle, name: str, events: int) -> None:
    """Make ``handle`` (sequence ``name`` of ``run``) cancel itself at its ``events``-th event, as a
    client that goes away then; ``run.wait`` no longer waits for it."""
    deliver = handle.sink

    def sink(event: TokenEvent) -> None:
        deliver(event)
        if len(run.events[name]) == events:
            handle.cancel()
            with run.done:
                run.pending -= 1
                run.done.notify_all()

    handle.sink = sink


def alone_and_beside(
    gen: Generator, prompt: list[int], config: GenerationConfig, others: list[list[int]], **scheduler
) -> tuple[Run, Run]:
    """Sequence "s" through its own scheduler (``**scheduler``) alone, then beside ``others``:
    greedy and sampled requests of other lengths, some drafting by prompt lookup."""
    runs = []
    for beside in ([], others):
        run = Run(gen, max_batch=len(others) + 1, **scheduler)
        run.engine.start()
        seqs = [run.sequence("s", prompt, config)]
        for i, q in enumerate(beside):
            c = openai_generation_config(
                max_tokens=20 + i, temperature=0.9 * (i % 2), seed=i, ignore_eos=True
            )
            seqs.append(run.sequence(f"o{i}", q, dataclasses.replace(c, prompt_lookup=3 * (i % 3))))
        run.engine.submit(seqs)
        run.wait(close=True)
        runs.append(run)
    return runs[0], runs[1]
