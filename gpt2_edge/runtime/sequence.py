"""One sequence's decode state, step by step: its own token chooser, eos / stop strings / length,
and its text as pieces that never split a UTF-8 character. Torch-free.

``generator.iter_decode`` runs a whole batch to the end; the server's scheduler instead moves many
independent sequences one token at a time, each joining and leaving the running batch on its own.
A ``SequenceState`` is what one such sequence carries between steps. Its rules are the batch
loop's: the chooser sees the prompt plus the generated ids (repetition penalty), eos and stop
strings end the sequence, and the text excludes the eos token and everything from a stop string
on. Its pieces are ``stream_text``'s: a piece is held back while the text ends in an incomplete
byte sequence (U+FFFD) or in what could still become a stop string, so they join to the final text.

Each step costs O(1) in the length of the text (byte-level BPE, GPT-2's): only the ids since the
last complete UTF-8 boundary are detokenized (with one earlier window of context, as vLLM and TGI
do), stop strings are searched only where the text changed, and the text is joined once, at the
end. The result is exactly that of detokenizing every generated id at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import Gpt2EdgeError
from .constraints import CompiledConstraint, ConstraintState
from .sampling import GenerationConfig, TokenChooser

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 byte sequence decodes to


def safe_text_length(text: str, stop: Sequence[str]) -> int:
    """How much of ``text`` can be shown now: not a trailing incomplete UTF-8 sequence (decoded as
    U+FFFD), nor a suffix that could still grow into one of the ``stop`` strings. Looks at the
    end of ``text`` only (no copy of it)."""
    safe = len(text)
    while safe and text[safe - 1] == REPLACEMENT:
        safe -= 1
    for s in stop:  # hold back a suffix that is a prefix of a stop string
        for k in range(min(len(s), safe), 0, -1):
            if text.endswith(s[:k], 0, safe):
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
        constraint: CompiledConstraint | None = None,
    ) -> None:
        if config.num_beams != 1:
            raise Gpt2EdgeError("a SequenceState is one greedy or sampled sequence (num_beams=1)")
        if (config.constraint is None) != (constraint is None) or (
            constraint is not None and constraint.constraint != config.constraint
        ):
            raise Gpt2EdgeError(
                "a SequenceState with config.constraint needs it compiled (runtime.constraints."
                "compile_constraint), and only then"
            )
        self.config = config
        self.eos_token_id = None if config.ignore_eos else eos_token_id
        self.detokenize = detokenize
        # The chooser holds this sequence's own numpy Generator: a seed gives the same tokens
        # whatever else runs beside it.
        self.chooser = TokenChooser(config, self.eos_token_id)
        self.prompt = list(prompt)
        self.seen = list(prompt)
        self.generated: list[int] = []
        # "eos", "stop" (a stop string, or the constraint complete), "length" or "error" (the
        # constraint's matcher failed: ``constraint.error``) once finished
        self.finish_reason: str | None = None
        self.text = ""  # the final text, once finished
        self.piece = ""  # what the last ``append`` (or ``extend``) made showable
        self._emitted = 0  # characters of the text shown so far
        # Speculative decoding's record of this sequence (its prompt-lookup index, how its drafts
        # fared, its tokens in the draft model's cache): ``runtime.speculative`` sets and reads it.
        self.speculation: Any = None
        # Structured output: this sequence's matcher (its mask for the next position), or None.
        self.constraint: ConstraintState | None = constraint.start() if constraint is not None else None
        # The text so far is ``"".join(_parts)`` (``_done`` characters, ending on a complete
        # character) + ``_tail`` (the ids from ``_read`` on, decoded in the context of the window
        # ``_prefix:_read``, whose text is ``_prefix_text``). ``_win`` holds the last characters of
        # the joined parts from ``_win_at`` on: enough for the pieces and the stop strings.
        self._parts: list[str] = []
        self._done = 0
        self._tail = ""
        self._prefix = self._read = 0
        self._prefix_text = ""
        self._win = ""
        self._win_at = 0
        self._longest_stop = max((len(s) for s in config.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def allowed(self) -> np.ndarray | None:
        """The constraint's mask for the next token ``(V,)`` bool (a buffer reused by the next
        call), or None without a constraint."""
        return None if self.constraint is None else self.constraint.allowed()

    def choose(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> int:
        """The next token from this sequence's last-position logits ``(V,)``; ``allowed``: the
        constraint's mask for it if computed already (``allowed()``), else it is computed here."""
        if self.constraint is not None and allowed is None:
            allowed = self.constraint.allowed()
        masks = None if allowed is None else [allowed]
        return int(self.chooser(logits[None, :], [self.seen], len(self.generated), masks)[0])

    def append(self, token: int) -> str:
        """Take the chosen token; the text that can be shown now (often ``""``). Once the sequence
        has finished, the pieces returned so far join to ``self.text``."""
        if self.finished:
            raise Gpt2EdgeError(f"the sequence already finished ({self.finish_reason})")
        self.generated.append(token)
        self.seen.append(token)
        if token == self.eos_token_id:
            # "error": the constraint's matcher failed (its ``error`` says why) and ended the text
            failed = self.constraint is not None and self.constraint.error is not None
            self._finish("error" if failed else "eos", len(self._win) + len(self._tail))
            return self._take_rest()
        done_before = self._done
        window = self.detokenize(self.generated[self._prefix :])
        self._tail = window[len(self._prefix_text) :]
        text = self._win + self._tail  # the text from ``_win_at`` on
        # A stop string not found before lies (partly) in what changed: the old tail and the new ids.
        search_from = max(0, done_before - self._longest_stop + 1 - self._win_at)
        hits = [i for i in (text.find(s, search_from) for s in self.config.stop) if i >= 0]
        if hits:
            self._finish("stop", min(hits))
            return self._take_rest()
        if self.constraint is not None:
            self.constraint.advance(token)
            if self.constraint.complete:  # nothing but eos may follow: the output is done
                self._finish("stop", len(text))
                return self._take_rest()
        if len(self.generated) >= self.config.max_new_tokens:
            self._finish("length", len(text))
            return self._take_rest()
        safe = self._win_at + safe_text_length(text, self.config.stop)
        self.piece = text[self._emitted - self._win_at : safe - self._win_at] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        if not window.endswith(REPLACEMENT):  # a complete character ends the ids so far: commit them
            self._parts.append(self._tail)
            self._done += len(self._tail)
            self._win = text
            self._prefix, self._read = self._read, len(self.generated)
            self._prefix_text, self._tail = self._tail, ""
            keep_from = min(self._emitted, max(0, self._done - self._longest_stop))
            if keep_from > self._win_at:
                self._win = self._win[keep_from - self._win_at :]
                self._win_at = keep_from
        return self.piece

    def extend(self, tokens: Sequence[int]) -> str:
        """``append`` each of ``tokens`` until the sequence finishes (the rest are dropped); the text
        they made showable, which is also ``self.piece`` (``len(self.generated)`` says how many
        were taken)."""
        pieces = []
        for t in tokens:
            pieces.append(self.append(int(t)))
            if self.finished:
                break
        self.piece = "".join(pieces)
        return self.piece

    def _finish(self, reason: str, end: int) -> None:
        """Finish with the text up to ``end`` (an index into ``_win + _tail``)."""
        self.finish_reason = reason
        committed = "".join(self._parts)
        self.text = (committed + self._tail)[: self._win_at + end]

    def _take_rest(self) -> str:
        self.piece = self.text[self._emitted :]
        self._emitted = len(self.text)
        return self.piece
