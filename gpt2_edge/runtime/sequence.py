"""One sequence's decode state, step by step: its own token chooser, eos / stop strings / length,
and its text as pieces that never split a UTF-8 character. Torch-free.

``generator.iter_decode`` runs a whole batch to the end; the server's scheduler instead moves many
independent sequences one token at a time, each joining and leaving the running batch on its own.
A ``SequenceState`` is what one such sequence carries between steps. Its rules are the batch
loop's: the chooser sees the prompt plus the generated ids (repetition penalty), eos and stop
strings end the sequence, and the text excludes the eos token and everything from a stop string
on. Its pieces are ``stream_text``'s: a piece is held back while the text ends in an incomplete
byte sequence (U+FFFD) or in what could still become a stop string, so they join to the final text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import Gpt2EdgeError
from .sampling import GenerationConfig, TokenChooser


def safe_text_length(text: str, stop: Sequence[str]) -> int:
    """How much of ``text`` can be shown now: not a trailing incomplete UTF-8 sequence (decoded as
    U+FFFD), nor a suffix that could still grow into one of the ``stop`` strings."""
    safe = len(text)
    if text.endswith("\ufffd"):
        safe = len(text.rstrip("\ufffd"))
    for s in stop:  # hold back a suffix that is a prefix of a stop string
        for k in range(min(len(s), safe), 0, -1):
            if text[:safe].endswith(s[:k]):
                safe -= k
                break
    return safe


class SequenceState:
    """The generated ids, finish reason and text of one sequence being decoded.

    >>> state = SequenceState(prompt_ids, config, eos_token_id, tokenizer.decode)
    >>> piece = state.append(state.choose(last_position_logits))  # until state.finished
    """

    def __init__(
        self,
        prompt: Sequence[int],
        config: GenerationConfig,
        eos_token_id: int | None,
        detokenize: Callable[[Sequence[int]], str],
    ) -> None:
        if config.num_beams != 1:
            raise Gpt2EdgeError("a SequenceState is one greedy or sampled sequence (num_beams=1)")
        self.config = config
        self.eos_token_id = None if config.ignore_eos else eos_token_id
        self.detokenize = detokenize
        # The chooser holds this sequence's own numpy Generator: a seed gives the same tokens
        # whatever else runs beside it.
        self.chooser = TokenChooser(config, self.eos_token_id)
        self.prompt = list(prompt)
        self.seen = list(prompt)
        self.generated: list[int] = []
        self.finish_reason: str | None = None  # "eos", "stop" or "length" once finished
        self.text = ""  # the final text, once finished
        self.piece = ""  # what the last ``append`` made showable
        self._emitted = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def choose(self, logits: np.ndarray) -> int:
        """The next token from this sequence's last-position logits ``(V,)``."""
        return int(self.chooser(logits[None, :], [self.seen], len(self.generated))[0])

    def append(self, token: int) -> str:
        """Take the chosen token; the text that can be shown now (often ``""``). Once the sequence
        has finished, the pieces returned so far join to ``self.text``."""
        if self.finished:
            raise Gpt2EdgeError(f"the sequence already finished ({self.finish_reason})")
        self.generated.append(token)
        self.seen.append(token)
        stop = self.config.stop
        if token == self.eos_token_id:
            self._finish("eos", self.detokenize(self.generated[:-1]))
        else:
            text = self.detokenize(self.generated)
            hits = [text.find(s) for s in stop if s in text]
            if hits:
                self._finish("stop", text[: min(hits)])
            elif len(self.generated) >= self.config.max_new_tokens:
                self._finish("length", text)
            else:
                safe = safe_text_length(text, stop)
                self.piece = text[self._emitted : safe] if safe > self._emitted else ""
                self._emitted = max(self._emitted, safe)
                return self.piece
        self.piece = self.text[self._emitted :]
        self._emitted = len(self.text)
        return self.piece

    def _finish(self, reason: str, text: str) -> None:
        self.finish_reason = reason
        self.text = text
