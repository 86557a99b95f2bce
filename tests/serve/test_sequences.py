"""serve/sequences.py: a ``Slot`` holds one sequence's whole state where it runs and gives it all
back when it leaves; a ``SequenceHandle``'s cancel wakes the engine once."""

from __future__ import annotations

from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.serve.sequences import Reservation, SequenceHandle, Slot


def seq(prompt: list[int]) -> SequenceHandle:
    return SequenceHandle(prompt, GenerationConfig(max_new_tokens=3), lambda _e: None, eos_token_id=None,
                          detokenize=lambda ids: "")  # fmt: skip


def test_a_slot_holds_its_sequence_until_it_leaves():
    slot = Slot(2)
    assert slot.seq is None and not slot.prefilling
    s = seq([1, 2, 3, 4])
    slot.take(s, prefilled=2, need=7, order=5)
    assert (slot.index, slot.seq, slot.prefilled, slot.need, slot.order) == (2, s, 2, 7, 5)
    assert slot.prefilling
    slot.prefilled = 4
    assert not slot.prefilling  # its prompt is in: it decodes
    assert slot.clear() is s
    assert (slot.seq, slot.prefilled, slot.need, slot.prefilling) == (None, 0, 0, False)


def test_cancel_is_idempotent_and_wakes_the_engine_once():
    woken = []
    s = seq([1])
    s._wake = lambda: woken.append(1)
    assert not s.cancelled
    s.cancel()
    s.cancel()
    assert s.cancelled and woken == [1]


def test_a_reservation_starts_open():
    r = Reservation(3)
    assert (r.n, r.done) == (3, False)
