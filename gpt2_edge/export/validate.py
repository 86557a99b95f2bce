"""Parity of an ONNX model against the PyTorch reference, judged by the tolerance table.

Cases: prefills of several lengths, a left-padded batch, and 16+ greedy decode steps that feed
``present`` back as ``past`` on both sides. Names are checked first, then shapes, then values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..model.gpt import GPT
from ..runtime.generator import left_pad
from ..tolerances import TOLERANCES


class ParityError(ValueError):
    """The exported model is outside its tolerance."""


@dataclass
class ParityReport:
    tolerance: str
    max_abs_logits: float = 0.0
    max_abs_present: float = 0.0
    top1_agreement: float = 1.0
    greedy_identical: bool = True
    positions_compared: int = 0
    decode_steps: int = 0
    cases: list[str] = field(default_factory=list)
    passed: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


class _Tally:
    def __init__(self) -> None:
        self.max_logits = 0.0
        self.max_present = 0.0
        self.agree = 0
        self.total = 0

    def logits(self, ours: np.ndarray, ref: np.ndarray) -> None:
        """``ours``/``ref``: (N, V) rows at real positions."""
        self.max_logits = max(self.max_logits, float(np.abs(ours - ref).max()))
        self.agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        self.total += len(ref)


def _session(path: Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_run(sess, n_layer: int, ids, mask, pos, past) -> tuple[np.ndarray, list[np.ndarray]]:
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(n_layer):
        feeds[f"past_key_values.{i}.key"] = past[2 * i]
        feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
    out = sess.run(None, feeds)
    return out[0].astype(np.float32), out[1:]


@torch.no_grad()
def _torch_run(model: GPT, ids, mask, pos, past) -> tuple[np.ndarray, list[np.ndarray]]:
    pairs = [
        (torch.from_numpy(past[2 * i]).float(), torch.from_numpy(past[2 * i + 1]).float())
        for i in range(len(past) // 2)
    ]
    logits, presents = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), pairs)
    return logits.numpy(), [t.numpy() for kv in presents for t in kv]


def validate_onnx(
    onnx_path: str | Path,
    model: GPT,
    tolerance: str = "fp32",
    decode_steps: int = 16,
    seed: int = 0,
    kv_dtype: str = "float32",
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare ``onnx_path`` (ONNX Runtime, CPU) with ``model``; ``ParityError`` when out of tolerance."""
    c = model.config
    model = model.float().eval()
    tol = TOLERANCES[tolerance]
    sess = _session(Path(onnx_path))
    rng = np.random.default_rng(seed)
    kvd = np.dtype(kv_dtype)
    tally = _Tally()
    rep = ParityReport(tolerance=tolerance)
    empty = [np.zeros((1, c.n_head, 0, c.head_size), kvd) for _ in range(2 * c.n_layer)]

    # 1. prefill of several lengths, batch 1, empty past
    for n in sorted({1, 2, 7, min(33, c.n_positions // 2)}):
        ids = rng.integers(0, c.vocab_size, (1, n), dtype=np.int64)
        mask = np.ones((1, n), np.int64)
        pos = np.arange(n, dtype=np.int64)[None]
        o, o_present = _ort_run(sess, c.n_layer, ids, mask, pos, empty)
        r, r_present = _torch_run(model, ids, mask, pos, [e.astype(np.float32) for e in empty])
        if o.shape != r.shape:
            raise ParityError(f"prefill {n}: logits shape {o.shape}, reference {r.shape}")
        tally.logits(o[0], r[0])
        for a, b in zip(o_present, r_present, strict=True):
            if a.shape != b.shape:
                raise ParityError(f"prefill {n}: present shape {a.shape}, reference {b.shape}")
            tally.max_present = max(tally.max_present, float(np.abs(a.astype(np.float32) - b).max()))
        rep.cases.append(f"prefill len {n}")

    # 2. left-padded batch, then greedy decode with present -> past on each side
    lengths = [5, 9, 2]
    prompts = [rng.integers(0, c.vocab_size, n).tolist() for n in lengths]
    pad = c.eos_token_id if c.eos_token_id < c.vocab_size else 0
    ids, mask, pos = left_pad(prompts, pad)
    empty_b = [np.zeros((len(lengths), c.n_head, 0, c.head_size), kvd) for _ in range(2 * c.n_layer)]
    o, o_past = _ort_run(sess, c.n_layer, ids, mask, pos, empty_b)
    r, r_past = _torch_run(model, ids, mask, pos, [e.astype(np.float32) for e in empty_b])
    real = mask.astype(bool)
    tally.logits(o[real], r[real])
    rep.cases.append(f"left-padded batch {lengths}")
    steps = min(decode_steps, c.n_positions - ids.shape[1])
    o_tok, r_tok = o[:, -1].argmax(-1), r[:, -1].argmax(-1)
    greedy_same = bool((o_tok == r_tok).all())
    for _ in range(steps):
        # Both sides get the reference's token, so one early flip cannot cascade into noise.
        feed = r_tok[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(lengths), 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        o, o_past = _ort_run(sess, c.n_layer, feed, mask, pos, o_past)
        r, r_past = _torch_run(model, feed, mask, pos, [p.astype(np.float32) for p in r_past])
        tally.logits(o[:, 0], r[:, 0])
        o_tok, r_tok = o[:, 0].argmax(-1), r[:, 0].argmax(-1)
        greedy_same &= bool((o_tok == r_tok).all())
    # Keys/values at pad positions are never attended to (and fused kernels fill them
    # differently), so presents are compared at real positions only.
    real_kv = mask.astype(bool)
    for a, b in zip(o_past, r_past, strict=True):
        for row in range(len(lengths)):
            d = np.abs(a[row][:, real_kv[row]].astype(np.float32) - b[row][:, real_kv[row]])
            tally.max_present = max(tally.max_present, float(d.max()))
    rep.cases.append(f"{steps} decode steps with past")

    rep.max_abs_logits = tally.max_logits
    rep.max_abs_present = tally.max_present
    rep.top1_agreement = tally.agree / tally.total
    rep.greedy_identical = greedy_same
    rep.positions_compared = tally.total
    rep.decode_steps = steps
    failures = []
    if tol.max_abs_logits is not None and rep.max_abs_logits > tol.max_abs_logits:
        failures.append(f"max |Δlogits| {rep.max_abs_logits:.3g} > {tol.max_abs_logits}")
    if tol.min_top1_agreement is not None and rep.top1_agreement < tol.min_top1_agreement:
        failures.append(f"top-1 agreement {rep.top1_agreement:.4f} < {tol.min_top1_agreement}")
    if tol.greedy_identical and not rep.greedy_identical:
        failures.append("greedy tokens differ")
    rep.passed = not failures
    if failures and raise_on_failure:
        raise ParityError(f"{onnx_path} is out of the {tolerance!r} tolerance: " + "; ".join(failures))
    return rep
