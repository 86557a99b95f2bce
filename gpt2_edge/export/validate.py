"""Parity of an ONNX model against the PyTorch reference, judged by the tolerance table.

Cases, for both KV-cache forms: prefills of several lengths, then slots of different lengths
decoding together through the runtime's own cache (``runtime/kv_cache.py``), a slot leaving and
a new one joining mid-run, idle slots, and a slot filled to its last position. The
concatenating form also runs a left-padded batch and 16+ greedy decode steps that feed
``present`` back as ``past`` on both sides. Names are checked first, then shapes, then values.

The PyTorch side never depends on the ONNX side (both are fed the reference's tokens), so it is
recorded first (``record_reference``) and replayed against the graph: an export of a large model
frees the torch model before ONNX Runtime loads the graph, and never holds the two at once.
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
from ..runtime.manifest import SCHEMA_VERSION, GenerationInfo, LoraSlots, Manifest, ModelDims
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


def _ort_run(sess, n_layer: int, ids, mask, pos, past) -> tuple[np.ndarray, list[np.ndarray]]:
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in sess.get_inputs():
        if i.name in ("logits_to_keep", "step_invariant"):
            feeds[i.name] = np.array(0, np.int64)
        elif i.name == "adapter_ids":  # LoRA slots: every row without an adapter (the base path)
            feeds[i.name] = np.zeros(len(ids), np.int64)
        elif i.name.startswith("lora_"):
            feeds[i.name] = np.zeros((1, *i.shape[1:]), np.float32)
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
    pairs = {k: (getattr(bundle.dims, k), getattr(config, k)) for k in keys}
    differ = [f"{k} {ours} vs {theirs}" for k, (ours, theirs) in pairs.items() if ours != theirs]
    if differ:
        raise Gpt2EdgeError(
            f"{bundle.path} was not exported from {source}: their dims differ (bundle vs checkpoint: "
            f"{', '.join(differ)}); validate a bundle against the checkpoint it was exported from"
        )


class Reference:
    """The PyTorch side of the parity cases: recorded once with the model, then replayed in the
    same order without it. Each call returns what the model returned for that call."""

    def __init__(self, config: GPTConfig, model: GPT | None, case: tuple) -> None:
        self.config = config
        self.model = model  # None once recorded
        self.case = case  # (kv_cache, decode_steps, seed, kv_dtype) of the recorded cases
        self._outputs: list = []
        self._at = 0
        self._last_run: int | None = None
        self._kv: dict[tuple[int, ...], list] = {}  # sequence -> its torch KV cache, while recording

    def _call(self, fn, *args):  # type: ignore[no-untyped-def]
        if self.model is not None:
            out = fn(self.model, *args)
            self._outputs.append(out)
            return out
        if self._at >= len(self._outputs):
            raise Gpt2EdgeError("the reference was recorded for other parity cases; record it again")
        out = self._outputs[self._at]
        self._at += 1
        return out

    def full(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        return self._call(_torch_full, ids)

    def next(self, ids: list[int]) -> np.ndarray:
        """Last-position logits of the sequence ``ids`` alone. Recording extends the KV cache of
        ``ids[:-1]`` when an earlier call computed it (decode steps: one token, not the whole
        sequence again; gpt2-xl's reference took minutes without it)."""
        ids = list(ids)
        if self.model is None:
            return self._call(_torch_next, ids)
        past = self._kv.pop(tuple(ids[:-1]), None)
        logits, present = _torch_step(self.model, ids, past)
        self._kv[tuple(ids)] = present
        self._outputs.append(logits)
        return logits

    def run(self, ids, mask, pos, past) -> tuple[np.ndarray, list[np.ndarray]]:  # type: ignore[no-untyped-def]
        """One pass with ``past``; a replay ignores its arguments. Only the last pass's presents
        are kept (the cases compare those; earlier ones only fed the next pass): gpt2-xl's would
        be ~1 GiB over 16 decode steps."""
        out = self._call(_torch_run, ids, mask, pos, past)
        if self.model is not None:
            if self._last_run is not None:
                self._outputs[self._last_run] = (self._outputs[self._last_run][0], [])
            self._last_run = len(self._outputs) - 1
        return out

    def replay(self) -> Reference:
        """The recorded outputs, from the start, without the model."""
        r = Reference(self.config, None, self.case)
        r._outputs = self._outputs
        return r


def record_reference(
    model: GPT, kv_cache: str = "concat", decode_steps: int = 16, seed: int = 0, kv_dtype: str = "float32"
) -> Reference:
    """Run the parity cases' PyTorch side with ``model`` and keep its outputs (a few MiB): the
    ONNX side can then be checked (``validate_onnx``) after ``model`` is freed."""
    model = model.float().eval()
    ref = Reference(model.config, model, (kv_cache, decode_steps, seed, kv_dtype))
    stub = _StubBackend(model.config, kv_cache, kv_dtype)
    _run_cases(stub, ref, _Tally(), ParityReport(tolerance="-"), kv_cache, decode_steps, seed, kv_dtype)
    return ref.replay()


def validate_onnx(
    onnx_path: str | Path,
    model: GPT | Reference,
    tolerance: str = "fp32",
    decode_steps: int = 16,
    seed: int = 0,
    kv_dtype: str = "float32",
    raise_on_failure: bool = True,
    kv_cache: str = "concat",
) -> ParityReport:
    """Compare ``onnx_path`` (ONNX Runtime, CPU) with ``model``; ``ParityError`` when out of tolerance.

    ``model``: the PyTorch model, or its outputs recorded by ``record_reference`` with the same
    ``kv_cache``, ``decode_steps``, ``seed`` and ``kv_dtype``.
    ``kv_cache``: the graph's KV form (``concat`` or ``inplace``); the graph's inputs and outputs
    are first checked against the contract of that form (names, dtypes, ranks, dims).
    """
    case = (kv_cache, decode_steps, seed, kv_dtype)
    if isinstance(model, Reference):
        if model.case != case:
            raise Gpt2EdgeError(f"the reference was recorded for cases {model.case}, not {case}")
        reference = model.replay()
    else:
        reference = record_reference(model, kv_cache, decode_steps, seed, kv_dtype)
    tol = TOLERANCES[tolerance]
    tally = _Tally()
    rep = ParityReport(tolerance=tolerance)
    backend = _backend(Path(onnx_path), reference.config, kv_dtype, kv_cache)
    greedy_same = _run_cases(backend, reference, tally, rep, kv_cache, decode_steps, seed, kv_dtype)
    return _verdict(rep, tally, tol, greedy_same, onnx_path, tolerance, raise_on_failure)


def _run_cases(backend, ref: Reference, tally, rep, kv_cache, decode_steps, seed, kv_dtype) -> bool:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    greedy_same = _slot_cases(backend, ref, rng, tally, rep)
    if kv_cache == "concat":
        greedy_same &= _concat_cases(backend.session, ref, rng, tally, rep, decode_steps, kv_dtype)
    return greedy_same


class _StubBackend:
    """Stands in for ONNX Runtime while the reference is recorded: zeros of the right shapes."""

    def __init__(self, config: GPTConfig, kv_cache: str, kv_dtype: str) -> None:
        self.c, self.kv_cache, self.kv_dtype = config, kv_cache, np.dtype(kv_dtype)
        self.session = self

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return np.zeros((*ids.shape, self.c.vocab_size), np.float32)

    def new_cache(self, n_slots: int, capacity: int) -> _StubCache:
        return _StubCache(self, n_slots, capacity)

    def get_inputs(self) -> list:
        return []

    def run(self, _names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        b, s = feeds["input_ids"].shape
        p = feeds["past_key_values.0.key"].shape[2]
        kv = np.zeros((b, self.c.n_head, p + s, self.c.head_size), self.kv_dtype)
        return [np.zeros((b, s, self.c.vocab_size), np.float32)] + [kv] * (2 * self.c.n_layer)


class _StubCache:
    def __init__(self, backend: _StubBackend, n_slots: int, capacity: int) -> None:
        self.backend, self._len = backend, [0] * n_slots
        if backend.kv_cache == "inplace":
            c = backend.c
            shape = (n_slots, c.n_head, capacity, c.head_size)
            self.buffers = [np.zeros(shape, backend.kv_dtype)] * (2 * c.n_layer)

    def length(self, slot: int) -> int:
        return self._len[slot]

    def prefill(self, slots, prompts) -> np.ndarray:  # type: ignore[no-untyped-def]
        for s, p in zip(slots, prompts, strict=True):
            self._len[s] = len(p)
        return np.zeros((len(slots), self.backend.c.vocab_size), np.float32)

    def decode(self, slots, tokens) -> np.ndarray:  # type: ignore[no-untyped-def]
        for s in slots:
            self._len[s] += 1
        return np.zeros((len(slots), self.backend.c.vocab_size), np.float32)

    def release(self, slot: int) -> None:
        self._len[slot] = 0


def _backend(path: Path, c: GPTConfig, kv_dtype: str, kv_cache: str) -> OrtBackend:
    """The runtime's own backend over a bare graph: a manifest in memory with the contract."""
    import onnx

    graph_inputs = {i.name: i for i in onnx.load(str(path), load_external_data=False).graph.input}
    names = set(graph_inputs)
    keep, invariant = "logits_to_keep" in names, "step_invariant" in names
    slots = None  # LoRA slots: checked with no adapter loaded (the base path)
    if "adapter_ids" in names:
        rank = graph_inputs["lora_a.0.attn.c_attn"].type.tensor_type.shape.dim[2].dim_value
        slots = LoraSlots(1, rank, tuple(contract.LORA_TARGETS))
    dims = (c.n_layer, c.n_head, c.head_size)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model_file=path.name,
        model=ModelDims(**c.bundle_dims()),
        inputs=tuple(contract.inputs(*dims, kv_dtype, kv_cache, keep, invariant, slots.rank if slots else 0)),
        outputs=tuple(contract.outputs(*dims, c.vocab_size, kv_dtype, kv_cache, keep)),
        files={},  # not a bundle on disk: nothing to verify
        generation=GenerationInfo(c.eos_token_id, c.n_positions),
        precision="fp32" if kv_dtype == "float32" else "fp16",
        target="ort",
        kv_cache=kv_cache,
        kv_dtype=kv_dtype,
        lora_slots=slots,
    )
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
def _torch_step(model: GPT, ids: list[int], past: list | None) -> tuple[np.ndarray, list]:
    """Last-position logits of ``ids`` and its KV cache; with ``past`` (the cache of
    ``ids[:-1]``) only the last token runs."""
    n = len(ids)
    new = ids[-1:] if past else ids
    p = n - len(new)
    logits, present = model(
        torch.tensor([new], dtype=torch.long),
        torch.ones(1, n, dtype=torch.long),
        torch.arange(p, n).unsqueeze(0),
        past,
    )
    return logits[0, -1].float().numpy(), present


@torch.no_grad()
def _torch_next(model: GPT, ids: list[int]) -> np.ndarray:
    t = torch.tensor([ids], dtype=torch.long)
    return model(t)[0][0, -1].float().numpy()


def _slot_cases(
    backend: OrtBackend, ref: Reference, rng: np.random.Generator, tally: _Tally, rep: ParityReport
) -> bool:
    """Whole-sequence logits, then slots through the runtime cache against each sequence alone."""
    c = ref.config
    for n in sorted({1, 2, 7, min(33, c.n_positions // 2)}):
        ids = rng.integers(0, c.vocab_size, (1, n), dtype=np.int64)
        o = backend.logits(ids)
        r, _ = ref.full(ids)
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
        ref_logits = np.stack([ref.next(seqs[s]) for s in slots])
        tally.logits(logits, ref_logits)
        greedy_same &= bool((logits.argmax(-1) == ref_logits.argmax(-1)).all())
        for s, tok in zip(slots, ref_logits.argmax(-1), strict=True):
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
            _, pres = ref.full(ids)
            for buf, want in zip(cache.buffers, pres, strict=True):
                d = np.abs(buf[s, :, :n].astype(np.float32) - want[0])
                tally.max_present = max(tally.max_present, float(d.max()))
    return greedy_same


def _concat_cases(
    sess,
    ref: Reference,
    rng: np.random.Generator,
    tally: _Tally,
    rep: ParityReport,
    decode_steps: int,
    kv_dtype: str,
) -> bool:
    """The raw graph: present tensors compared, a left-padded batch, present -> past decoding."""
    c = ref.config
    kvd = np.dtype(kv_dtype)
    # 2. left-padded batch, then greedy decode with present -> past on each side
    lengths = [5, 9, 2]
    prompts = [rng.integers(0, c.vocab_size, n).tolist() for n in lengths]
    pad = c.eos_token_id if c.eos_token_id < c.vocab_size else 0
    ids, mask, pos = left_pad(prompts, pad)
    empty_b = [np.zeros((len(lengths), c.n_head, 0, c.head_size), kvd) for _ in range(2 * c.n_layer)]
    o, o_past = _ort_run(sess, c.n_layer, ids, mask, pos, empty_b)
    r, r_past = ref.run(ids, mask, pos, [e.astype(np.float32) for e in empty_b])
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
        r, r_past = ref.run(feed, mask, pos, [p.astype(np.float32) for p in r_past])
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
