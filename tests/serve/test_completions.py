"""serve/completions.py with a fake engine and a fake model (no thread, no backend): a request's
room is held and given back, each choice becomes one sequence with its own seed, events are
collected into one typed answer or streamed as chunks, a client that leaves or a deadline cancels
the sequences, and chat's shape and stop strings come from its render and template."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("starlette")

from gpt2_edge.serve.completions import Completion
from gpt2_edge.serve.metrics import Metrics
from gpt2_edge.serve.output import OutputProcessor
from gpt2_edge.serve.protocol import ApiError, CompletionRequest
from gpt2_edge.serve.render import ChatRender
from gpt2_edge.serve.sequences import QueueFullError, Reservation

V = 26  # token t is the letter chr(97 + t)


class Tokenizer:
    def encode_batch(self, texts):
        return [[ord(ch) - 97 for ch in t] for t in texts]

    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids)


class Model:
    tokenizer = Tokenizer()
    n_ctx = 32
    vocab_size = V
    max_prompt_chars = 32
    eos_token_id = None
    name = "fake"


class Engine:
    """Answers each submitted sequence at once with ``tokens`` (on the caller's thread)."""

    capacity = 4
    prompt_lookup = 0

    def __init__(self, tokens=(7, 4, 11), full: bool = False, answer: bool = True) -> None:
        self.tokens, self.full, self.answer = list(tokens), full, answer
        self.reserved = 0
        self.submitted = []

    def reserve(self, n):
        if self.full:
            raise QueueFullError("full")
        self.reserved += n
        return Reservation(n)

    def release(self, r):
        if not r.done:
            r.done = True
            self.reserved -= r.n

    def submit(self, seqs, reservation=None):
        if reservation is not None:
            reservation.done = True
            self.reserved -= reservation.n
        self.submitted += seqs
        if self.answer:
            out = OutputProcessor()
            logits = np.zeros((len(self.tokens), V), np.float32)
            for s in seqs:
                out.emit(s, self.tokens, logits)


class Request:
    """A client connection: ``leave()`` sends ``http.disconnect``."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self):
        await self.gone.wait()
        return {"type": "http.disconnect"}


def job(engine, timeout_s: float = 30, **body) -> Completion:
    req = CompletionRequest.model_validate({"prompt": "hi", **body})
    req.check_supported()
    metrics = Metrics(4, lambda: 0, lambda: 0)
    return Completion(Model(), engine, metrics, req, asyncio.get_running_loop(), timeout_s)


def test_choices_are_collected_into_one_typed_answer():
    async def main():
        engine = Engine()
        c = job(engine, n=2, seed=5, max_tokens=3, logprobs=1)
        c.reserve()
        assert engine.reserved == 2
        c.submit()
        assert engine.reserved == 0 and [s.state.config.seed for s in engine.submitted] == [5, 6]
        return await c.collect(Request())

    answer = asyncio.run(main())
    assert [ch.text for ch in answer.choices] == ["hel", "hel"]
    assert [ch.finish_reason for ch in answer.choices] == ["length", "length"]
    assert answer.choices[0].logprobs.tokens == ["h", "e", "l"]
    assert answer.choices[0].logprobs.text_offset == [0, 1, 2]
    assert answer.usage.model_dump() == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")


def test_a_full_engine_is_429_and_echo_alone_gives_its_room_back():
    async def main():
        with pytest.raises(ApiError) as e:
            job(Engine(full=True)).reserve()
        assert e.value.status == 429 and e.value.code == "queue_full"
        engine = Engine()
        c = job(engine, max_tokens=0, echo=True)
        c.reserve()
        c.submit()
        assert engine.reserved == 0 and engine.submitted == []
        return await c.collect(Request())

    answer = asyncio.run(main())
    assert answer.choices[0].text == "hi" and answer.choices[0].finish_reason == "length"


def test_a_stream_is_chunks_then_usage_then_done():
    async def main():
        c = job(Engine(), stream=True, max_tokens=3, stream_options={"include_usage": True})
        c.reserve()
        c.submit()
        return [e async for e in c.sse()]

    events = asyncio.run(main())
    assert events[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert "".join(b["choices"][0]["text"] for b in bodies[:-1]) == "hel"
    assert all(b["usage"] is None for b in bodies[:-1])  # include_usage: only the last chunk has it
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["completion_tokens"] == 3


def test_a_client_that_leaves_or_a_deadline_cancels_the_sequences():
    async def leaves():
        engine = Engine(answer=False)
        c = job(engine, max_tokens=3)
        c.reserve()
        c.submit()
        client = Request()
        collecting = asyncio.ensure_future(c.collect(client))
        await asyncio.sleep(0)
        client.gone.set()
        with pytest.raises(ApiError) as e:
            await collecting
        return e.value, engine

    err, engine = asyncio.run(leaves())
    assert err.status == 499 and all(s.cancelled for s in engine.submitted)

    async def late():
        engine = Engine(answer=False)
        c = job(engine, timeout_s=0.05, max_tokens=3)
        c.reserve()
        c.submit()
        with pytest.raises(ApiError) as e:
            await c.collect(Request())
        return e.value, engine

    err, engine = asyncio.run(late())
    assert err.status == 408 and all(s.cancelled for s in engine.submitted)


def test_chat_answers_in_its_shape_with_the_templates_stop():
    async def main(ignore_eos: bool):
        req = CompletionRequest.model_validate(
            {"prompt": [7, 8], "max_tokens": 3, "stream": True, "ignore_eos": ignore_eos}
        )
        engine = Engine()
        metrics = Metrics(4, lambda: 0, lambda: 0)
        loop = asyncio.get_running_loop()
        c = Completion(Model(), engine, metrics, req, loop, 30, render=ChatRender, extra_stop=("\nUser:",))
        c.reserve()
        c.submit()
        return [e async for e in c.sse()], engine.submitted[0].state.config.stop

    events, stop = asyncio.run(main(False))
    assert stop == ("\nUser:",)
    first, second = (json.loads(e[len("data: ") :]) for e in events[:2])
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert second["choices"][0]["delta"] == {"content": "h"}
    assert asyncio.run(main(True))[1] == ()  # ignore_eos: exactly max_tokens, no template stop
