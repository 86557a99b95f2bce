"""Parity of an ONNX model against the PyTorch reference, judged by the tolerance table.

Cases, for both KV-cache forms: prefills of several lengths, then slots of different lengths
decoding together through the runtime's own cache (``runtime/kv_cache.py``), a slot leaving and
a new one joining mid-run, idle slots, and a slot filled to its last position. The
concatenating form also runs a left-padded batch and 16+ greedy decode steps that feed
``present`` back as ``past`` on both sides. Names are checked first, then shapes, then values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import contract
from ..errors import Gpt2EdgeError
from ..model.checkpoint import resolve_model_dir
from ..model.config import GPTConfig
from ..model.gpt import GPT
from ..runtime.bundle import Bundle
from ..runtime.session import OrtBackend
from ..runtime.types import left_pad
from ..tolerances import TOLERANCES


class ParityError(Gpt2EdgeError):
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
    if any(i.name == "logits_to_keep" for i in sess.get_inputs()):
        feeds["logits_to_keep"] = np.array(0, np.int64)
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


def check_same_dims(bundle: Bundle, source: str | Path) -> None:
    """Refuse a checkpoint of other dims than ``bundle`` before any session runs (ONNX Runtime's
    message would be about a missing input name or a shape)."""
    config = GPTConfig.load(resolve_model_dir(source))
    keys = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")
    dims = bundle.dims
    differ = [f"{k} {dims[k]} vs {getattr(config, k)}" for k in keys if dims[k] != getattr(config, k)]
    if differ:
        raise Gpt2EdgeError(
            f"{bundle.path} was not exported from {source}: their dims differ (bundle vs checkpoint: "
            f"{', '.join(differ)}); validate a bundle against the checkpoint it was exported from"
        )


def validate_onnx(
    onnx_path: str | Path,
    model: GPT,
    tolerance: str = "fp32",
    decode_steps: int = 16,
    seed: int = 0,
    kv_dtype: str = "float32",
    raise_on_failure: bool = True,
    kv_cache: str = "concat",
) -> ParityReport:
    """Compare ``onnx_path`` (ONNX Runtime, CPU) with ``model``; ``ParityError`` when out of tolerance.

    ``kv_cache``: the graph's KV form (``concat`` or ``inplace``); the graph's inputs and outputs
    are first checked against the contract of that form (names, dtypes, ranks, dims).
    """
    model = model.float().eval()
    tol = TOLERANCES[tolerance]
    rng = np.random.default_rng(seed)
    tally = _Tally()
    rep = ParityReport(tolerance=tolerance)
    backend = _backend(Path(onnx_path), model, kv_dtype, kv_cache)
    greedy_same = _slot_cases(backend, model, rng, tally, rep)
    if kv_cache == "concat":
        greedy_same &= _concat_cases(backend.session, model, rng, tally, rep, decode_steps, kv_dtype)
    return _verdict(rep, tally, tol, greedy_same, onnx_path, tolerance, raise_on_failure)


def _backend(path: Path, model: GPT, kv_dtype: str, kv_cache: str) -> OrtBackend:
    """The runtime's own backend over a bare graph: a manifest in memory with the contract."""
    import onnx

    c = model.config
    keep = any(i.name == "logits_to_keep" for i in onnx.load(str(path), load_external_data=False).graph.input)
    dims = c.bundle_dims()
    io = {
        "inputs": [
            s.as_dict() for s in contract.inputs(c.n_layer, c.n_head, c.head_size, kv_dtype, kv_cache, keep)
        ],
        "outputs": [
            s.as_dict()
            for s in contract.outputs(
                c.n_layer, c.n_head, c.head_size, c.vocab_size, kv_dtype, kv_cache, keep
            )
        ],
    }
    manifest = {
        "model_file": path.name,
        "model": dims,
        "io": io,
        "kv_cache": kv_cache,
        "kv_dtype": kv_dtype,
        "precision": "fp32" if kv_dtype == "float32" else "fp16",
        "target": "ort",
        "generation": {"eos_token_id": c.eos_token_id, "context_length": c.n_positions},
    }
    import warnings

    with warnings.catch_warnings():  # the fp16-on-CPU speed warning
        warnings.simplefilter("ignore")
        return OrtBackend(Bundle(path.parent, manifest), threads=None)


def _torch_full(model: GPT, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and presents of whole unpadded sequences ``ids`` (B, T) from an empty past."""
    c = model.config
    empty = [np.zeros((ids.shape[0], c.n_head, 0, c.head_size), np.float32)] * (2 * c.n_layer)
    pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
    return _torch_run(model, ids, np.ones_like(ids), pos, empty)


@torch.no_grad()
def _torch_next(model: GPT, ids: list[int]) -> np.ndarray:
    t = torch.tensor([ids], dtype=torch.long)
    return model(t)[0][0, -1].float().numpy()


def _slot_cases(
    backend: OrtBackend, model: GPT, rng: np.random.Generator, tally: _Tally, rep: ParityReport
) -> bool:
    """Whole-sequence logits, then slots through the runtime cache against each sequence alone."""
    c = model.config
    for n in sorted({1, 2, 7, min(33, c.n_positions // 2)}):
        ids = rng.integers(0, c.vocab_size, (1, n), dtype=np.int64)
        o = backend.logits(ids)
        r, _ = _torch_full(model, ids)
        if o.shape != r.shape:
            raise ParityError(f"prefill {n}: logits shape {o.shape}, reference {r.shape}")
        tally.logits(o[0], r[0])
        rep.cases.append(f"prefill len {n}")

    capacity = min(c.n_positions, 40)
    cache = backend.new_cache(4, capacity)
    seqs = {s: rng.integers(0, c.vocab_size, n).tolist() for s, n in zip((0, 1, 2), (5, 9, 2), strict=True)}
    greedy_same = True

    def check(slots: list[int], logits: np.ndarray) -> None:
        nonlocal greedy_same
        ref = np.stack([_torch_next(model, seqs[s]) for s in slots])
        tally.logits(logits, ref)
        greedy_same &= bool((logits.argmax(-1) == ref.argmax(-1)).all())
        for s, tok in zip(slots, ref.argmax(-1), strict=True):
            seqs[s].append(int(tok))

    check([0, 1, 2], cache.prefill([0, 1, 2], [seqs[0], seqs[1], seqs[2]]))
    steps = 0
    for step in range(6):
        steps += 1
        slots = [0, 2] if step % 2 else [0, 1, 2]  # slot 1 idles every other step
        check(slots, cache.decode(slots, [seqs[s][-1] for s in slots]))
    cache.release(1)  # leaves; a new sequence joins in its place, then one in slot 3
    seqs[1] = rng.integers(0, c.vocab_size, 4).tolist()
    check([1], cache.prefill([1], [seqs[1]]))
    seqs[3] = rng.integers(0, c.vocab_size, 3).tolist()
    check([3], cache.prefill([3], [seqs[3]]))
    for _ in range(4):
        steps += 1
        check([0, 1, 2, 3], cache.decode([0, 1, 2, 3], [seqs[s][-1] for s in range(4)]))
    # fill slot 2 to its last position
    while cache.length(2) < capacity:
        steps += 1
        check([2], cache.decode([2], [seqs[2][-1]]))
    rep.cases.append(f"4 slots of capacity {capacity}: join, leave, idle rows, one filled to capacity")
    rep.decode_steps = steps
    if hasattr(cache, "buffers"):  # in place: the cache holds exactly the reference's keys/values
        for s in range(4):
            n = cache.length(s)
            ids = np.array([seqs[s][:n]], np.int64)
            _, pres = _torch_full(model, ids)
            for buf, ref in zip(cache.buffers, pres, strict=True):
                d = np.abs(buf[s, :, :n].astype(np.float32) - ref[0])
                tally.max_present = max(tally.max_present, float(d.max()))
    return greedy_same


def _concat_cases(
    sess,
    model: GPT,
    rng: np.random.Generator,
    tally: _Tally,
    rep: ParityReport,
    decode_steps: int,
    kv_dtype: str,
) -> bool:
    """The raw graph: present tensors compared, a left-padded batch, present -> past decoding."""
    c = model.config
    kvd = np.dtype(kv_dtype)
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
    rep.decode_steps += steps
    return greedy_same


def _verdict(
    rep: ParityReport,
    tally: _Tally,
    tol,
    greedy_same: bool,
    onnx_path,
    tolerance: str,
    raise_on_failure: bool,
) -> ParityReport:
    rep.max_abs_logits = tally.max_logits
    rep.max_abs_present = tally.max_present
    rep.top1_agreement = tally.agree / tally.total
    rep.greedy_identical = greedy_same
    rep.positions_compared = tally.total
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
