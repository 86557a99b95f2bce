"""The server's engine without HTTP, on a model: chunked prefill on both KV-cache forms, and every
precision served batched equals ``Generator`` alone. (The scheduler's decisions without a model:
test_scheduler.py; the settings: test_settings.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from gpt2_edge.runtime.generator import Generator
from gpt2_edge.runtime.sampling import GenerationConfig, openai_generation_config
from gpt2_edge.serve.sequences import TokenEvent
from tests.serve.helpers import Run

pytestmark = pytest.mark.filterwarnings("ignore")

LONG = 48  # prompt tokens of the long request (the tiny model's context is 64)


@pytest.fixture(scope="module")
def bundles(inplace_bundle, concat_bundle) -> dict[str, Path]:
    return {"inplace": inplace_bundle, "concat": concat_bundle}


@pytest.fixture(scope="module")
def gens(bundles) -> dict[str, Generator]:
    return {kv: Generator.from_bundle(str(b), threads=1) for kv, b in bundles.items()}


@pytest.mark.parametrize("kv", ["inplace", "concat"])
@pytest.mark.parametrize("chunk", [8, 0])
def test_a_running_stream_keeps_its_pace_while_a_long_prompt_goes_in(gens, kv, chunk):
    """A 48-token prompt arrives while a stream decodes: in chunks of 8 it goes in over 6 steps and
    the stream gets a token in each of the 5 steps before the long prompt's first token; whole
    (chunk 0) it stalls the stream for the whole prefill. Both outputs equal Generator alone."""
    gen = gens[kv]
    run = Run(gen, max_batch=4, max_queue=4, prefill_chunk=chunk)
    stream_cfg = GenerationConfig(max_new_tokens=30, min_new_tokens=30)  # eos cannot end it early
    long_cfg = GenerationConfig(max_new_tokens=8)
    long_prompt = (gen.tokenizer.encode("First Citizen:\nBefore we proceed any further, hear me speak.") * 4)[
        :LONG
    ]
    assert len(long_prompt) == LONG
    long = run.sequence("long", long_prompt, long_cfg)

    def submit_long(event: TokenEvent) -> None:  # in the scheduler thread, at the stream's 2nd token
        if len(run.tokens["stream"]) == 2:
            run.log.append(("submitted", None))
            run.engine.submit([long])

    stream = run.sequence("stream", gen.tokenizer.encode("O"), stream_cfg, on_event=submit_long)
    run.engine.start()
    run.engine.submit([stream])
    run.wait(close=True)
    names = [name for name, _ in run.log]
    after = names[names.index("submitted") :]
    between = after[: after.index("long")].count("stream")
    assert between == (math.ceil(LONG / chunk) - 1 if chunk else 0)
    assert run.tokens["stream"] == run.alone(gen.tokenizer.encode("O"), stream_cfg)
    assert run.tokens["long"] == run.alone(long_prompt, long_cfg)


@pytest.mark.parametrize("kv", ["inplace", "concat"])
def test_chunked_prefill_of_many_prompts_equals_generator(gens, kv):
    """Eight prompts of 1..40 tokens, some sampled, into 4 slots with 5 prompt tokens per step: the
    budget splits prompts across steps and steps across prompts; every output equals Generator."""
    eight_prompts_equal_generator(gens[kv], prefill_chunk=5)


def eight_prompts_equal_generator(gen: Generator, prefill_chunk: int) -> None:
    """Eight prompts of 1..40 tokens, every third sampled, through 4 slots: each output = Generator."""
    run = Run(gen, max_batch=4, max_queue=8, prefill_chunk=prefill_chunk)
    text = gen.tokenizer.encode("We are accounted poor citizens, the patricians good. " * 4)
    jobs = []
    for i, n in enumerate((1, 40, 3, 17, 9, 26, 5, 33)):
        cfg = openai_generation_config(max_tokens=4 + i, temperature=0.8 if i % 3 == 1 else 0, seed=i)
        jobs.append((f"job{i}", text[i : i + n], cfg))
    run.engine.start()
    run.engine.submit([run.sequence(name, prompt, cfg) for name, prompt, cfg in jobs])
    run.wait(close=True)
    for name, prompt, cfg in jobs:
        assert run.tokens[name] == run.alone(prompt, cfg), name


@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic", "int8-weight", "int8-qdq", "int4"])
@pytest.mark.parametrize("chunk", [0, 5])
def test_every_precision_served_batched_equals_generator_alone(make_bundle, precision, chunk):
    """The server's continuous batch for every precision the in-place cache takes: greedy and
    sampled outputs of 8 prompts of other lengths and contents sharing 4 slots equal `Generator`
    alone (the precisions are batch-invariant and causal, tests/runtime/test_batch_invariance.py)."""
    bundle = make_bundle(
        kv_cache="inplace", precision=precision, calib="sample-x2" if precision == "int8-qdq" else None
    )
    eight_prompts_equal_generator(Generator.from_bundle(str(bundle), threads=1), prefill_chunk=chunk)
