"""INT8: dynamic with per-row activation scales (CPU), weight-only, and static QDQ with SmoothQuant.

GPT-2's activations have outlier channels (tens to hundreds of times the median); a static
per-tensor int8 scale sized for them leaves every other channel with a few levels, which is
why naive static int8 wrecks the model. SmoothQuant (Xiao et al., 2023) moves that range into
the weights: for a LayerNorm feeding MatMuls, per input channel j,
``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``, LayerNorm gamma and beta are divided by
``s`` and the weight rows multiplied by it, an exact rewrite in fp32. The QDQ placement is
TensorRT's explicit-quantization form: symmetric (zero point 0) Q/DQ on the activation input of
each weight MatMul and DQ on its int8 per-channel weight; attention's activation-activation
MatMuls stay float.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .. import contract
from ..errors import Gpt2EdgeError
from ..export.fusions import untie_head, working_directory
from ..export.graph import producers_consumers, save_model

LN_OPS = {"LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}  # (gamma, beta) input index


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantizers log "Please consider to run pre-processing" on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def weight_matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(MatMuls with a constant weight, MatMuls of two activations)."""
    inits = {t.name for t in model.graph.initializer}
    w, a = [], []
    for n in model.graph.node:
        if n.op_type == "MatMul":
            (w if n.input[1] in inits else a).append(n.name)
    return w, a


# dynamic -------------------------------------------------------------------------------------------
# ONNX Runtime's own dynamic quantization (``DynamicQuantizeLinear``, fused to
# ``DynamicQuantizeMatMul``) takes ONE activation scale per tensor: every row of a batch and every
# position of a prompt shares it, so a row's logits change with what runs beside it and a position's
# with the tokens after it (measured, logits: 0.004 on a tiny model, 0.16-0.29 on the default model,
# 0.037 on the 124M shape; with the in-place cache a ragged prefill of the default model turned every
# row to NaN: GroupQueryAttention leaves the padding rows' outputs undefined, and one NaN there set
# the whole tensor's scale).
# Here each row (token) of a MatMul's input gets its own scale, computed in the graph each call:
#   m = max|x_row|;  q = QuantizeLinear(x / m, 1/127, 128)   (uint8, symmetric around 128)
#   y = MatMulIntegerToFloat(q, W_int8, m, w_scale / 127, 128)   (int32 accumulation, row by row)
# so rows and positions never meet: bitwise batch-invariant and causal. MatMulIntegerToFloat takes a
# per-row A scale but only a scalar A zero point, hence symmetric rows around the fixed 128 (u8 x s8
# is MLAS's fast integer GEMM; s8 x s8 measured 10x slower here). A row of zeros has m = 0: its q
# is whatever QuantizeLinear makes of 0/0, times the A scale 0, so its output is exactly 0 as well.
ACT_ZERO_POINT = 128


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def per_row_int8(model: onnx.ModelProto) -> int:
    """Replace every MatMul with a constant 2-D float weight by per-row dynamic int8 (in place).

    Weights: int8, symmetric, one scale per output column. Activations: uint8 per row, as above;
    MatMuls that read the same activation share its quantization. Returns how many were replaced.
    """
    from onnx import TensorProto, helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    c = "int8_dynamic/"  # shared constants
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array(ACT_ZERO_POINT, np.uint8), c + "zero_point"),
            numpy_helper.from_array(np.array(1 / 127, np.float32), c + "step"),
            numpy_helper.from_array(np.array([-1], np.int64), c + "last_axis"),
        ]
    )
    # ReduceMax takes its axes as an input from opset 18, as an attribute before
    axes: dict = {"inputs": [c + "last_axis"], "attrs": {}}
    if _opset(model) < 18:
        axes = {"inputs": [], "attrs": {"axes": [-1]}}
    quantized: dict[str, tuple[str, str]] = {}  # activation -> (uint8 rows, row max)
    nodes: list[onnx.NodeProto] = []
    replaced = 0
    for n in g.node:
        w = inits.get(n.input[1]) if n.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
            nodes.append(n)
            continue
        x, base = n.input[0], n.name or n.output[0]
        if x not in quantized:
            p = f"{base}/act_quant"

            def node(op: str, inputs: list[str], p: str = p, **attrs) -> str:
                out = f"{p}/{op}_output"
                nodes.append(helper.make_node(op, inputs, [out], name=f"{p}/{op}", **attrs))
                return out

            row_max = node("ReduceMax", [node("Abs", [x]), *axes["inputs"]], keepdims=1, **axes["attrs"])
            q = node("QuantizeLinear", [node("Div", [x, row_max]), c + "step", c + "zero_point"])
            quantized[x] = (q, row_max)
        q, row_max = quantized[x]
        w_int8, w_scale = f"{n.input[1]}_int8", f"{n.input[1]}_scale"
        if w_int8 not in inits:  # a weight two MatMuls share is quantized once
            weights = numpy_helper.to_array(w).astype(np.float32)
            scale = np.abs(weights).max(axis=0) / 127
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            inits[w_int8] = numpy_helper.from_array(
                np.clip(np.round(weights / scale), -127, 127).astype(np.int8), w_int8
            )
            # the row scale is m / 127: the 1/127 rides on the weight scale
            inits[w_scale] = numpy_helper.from_array((scale / 127).astype(np.float32), w_scale)
            g.initializer.extend([inits[w_int8], inits[w_scale]])
        nodes.append(
            helper.make_node(
                "MatMulIntegerToFloat",
                [q, w_int8, row_max, w_scale, c + "zero_point"],
                list(n.output),
                name=f"{base}_int8",
                domain="com.microsoft",
            )
        )
        replaced += 1
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return replaced


def to_int8_dynamic(src: Path, dst: Path, external_data: bool, quantize_embeddings: bool = True) -> dict:
    """int8 per-channel weights, activations quantized per row (token) on every call.

    The fp32 weights are read from ``src``'s external data one at a time (the graph is loaded
    without them), so the peak is about the int8 model plus one fp32 weight.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    model = onnx.load(str(src), load_external_data=False)
    with working_directory(src.parent):
        untied = untie_head(model)
        replaced = per_row_int8(model)
    # what is left in fp32 (embeddings, LayerNorms, biases): into memory for ORT's quantizer
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    if quantize_embeddings:
        # the embedding tables: int8 weights dequantized after the Gather (weight-only: rows stay apart)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet_root_logger():
            quantize_dynamic(
                model,
                str(dst),
                op_types_to_quantize=["Gather"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                use_external_data_format=external_data,
            )
    else:
        save_model(model, dst, external_data)
    return {
        "method": "gpt2-edge per-row dynamic int8 (MatMulIntegerToFloat)",
        "weights": "int8 symmetric per output channel",
        "activations": "uint8 symmetric per row (token), scale max|x_row|/127 computed each call",
        "quantized_matmuls": replaced,
        "embeddings": "int8 (onnxruntime quantize_dynamic, Gather)" if quantize_embeddings else "fp32",
        "batch_invariant": True,
        "head_untied": untied,
    }


# static QDQ ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QdqOptions:
    smooth_alpha: float | None = 0.5  # None: no SmoothQuant (the naive baseline)
    per_channel: bool = True
    exclude: tuple[str, ...] = ()  # node names kept in float (sensitive MatMuls)
    # Measured on the default model (one MatMul left in float at a time): the LM head is by far
    # the most sensitive (top-1 94.7% -> 98.4%, KL 0.0017 -> 0.0004), so it stays float (and tied).
    quantize_head: bool = False
    # percentile (99.999%) beat minmax: +0.10% vs +0.58% perplexity on the default model.
    calibrate_method: str = "percentile"

    def as_dict(self) -> dict:
        return asdict(self)


def _inputs_for(model: onnx.ModelProto, window: np.ndarray) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {
        "input_ids": window,
        "attention_mask": np.ones_like(window),
        "position_ids": np.arange(window.shape[1], dtype=np.int64)[None],
    }
    for vi in model.graph.input:
        if vi.name.startswith("past_key_values."):
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            # in place, the past is a buffer with room for the window; concatenating, it is empty
            inplace = vi.type.tensor_type.shape.dim[2].dim_param == contract.CACHE
            feeds[vi.name] = np.zeros((1, dims[1], window.shape[1] if inplace else 0, dims[3]), np.float32)
        elif vi.name in ("logits_to_keep", "step_invariant"):
            feeds[vi.name] = np.array(0, np.int64)
    return feeds


def smooth(model: onnx.ModelProto, calib: list[np.ndarray], alpha: float) -> int:
    """SmoothQuant in place on every LayerNorm whose outputs feed only constant-weight MatMuls.

    Returns how many LayerNorms were smoothed.
    """
    import onnxruntime as ort

    inits = {t.name: t for t in model.graph.initializer}
    _, consumers = producers_consumers(model)
    targets = []
    for n in model.graph.node:
        if n.op_type not in LN_OPS:
            continue
        users = consumers.get(n.output[0], [])
        if users and all(
            u.op_type == "MatMul" and u.input[0] == n.output[0] and u.input[1] in inits for u in users
        ):
            targets.append((n, users))
    if not targets:
        return 0
    # per-channel max |x| of every target LayerNorm output over the calibration windows
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for n, _ in targets:
        if n.output[0] not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.output[0]))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [n.output[0] for n, _ in targets]
    amax = {name: None for name in names}
    for w in calib:
        outs = sess.run(names, _inputs_for(model, w))
        for name, x in zip(names, outs, strict=True):
            m = np.abs(x.reshape(-1, x.shape[-1])).max(0)
            amax[name] = m if amax[name] is None else np.maximum(amax[name], m)
    for n, users in targets:
        x_max = np.maximum(amax[n.output[0]], 1e-5)
        weights = [numpy_helper.to_array(inits[u.input[1]]) for u in users]  # [K, N] each
        w_max = np.maximum(np.max([np.abs(w).max(1) for w in weights], axis=0), 1e-5)
        s = (x_max**alpha / w_max ** (1 - alpha)).astype(np.float32)
        g_idx, b_idx = LN_OPS[n.op_type]
        for idx in (g_idx, b_idx):
            if idx < len(n.input) and n.input[idx] in inits:
                t = inits[n.input[idx]]
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) / s, t.name))
        for u, w in zip(users, weights, strict=True):
            t = inits[u.input[1]]
            t.CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), t.name))
    return len(targets)


class _Reader:
    """ONNX Runtime CalibrationDataReader over prefill windows."""

    def __init__(self, model: onnx.ModelProto, calib: list[np.ndarray]) -> None:
        self._it: Iterator[dict] = iter([_inputs_for(model, w) for w in calib])

    def get_next(self) -> dict | None:
        return next(self._it, None)


def to_int8_qdq(
    src: Path, dst: Path, external_data: bool, calib: list[np.ndarray], options: QdqOptions = QdqOptions()
) -> dict:
    """Static symmetric int8 QDQ (TensorRT explicit quantization) calibrated on ``calib`` windows."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if options.calibrate_method not in ("minmax", "percentile"):
        raise Gpt2EdgeError(
            f"calibrate_method must be minmax or percentile, got {options.calibrate_method!r}"
        )
    model = onnx.load(str(src))
    # A tied head is MatMul(x, Transpose(wte)): without a constant weight it stays float.
    untied = untie_head(model) if options.quantize_head else False
    smoothed = smooth(model, calib, options.smooth_alpha) if options.smooth_alpha is not None else 0
    weight_mm, act_mm = weight_matmuls(model)
    tmp = dst.with_name(dst.name + ".smoothed.onnx")
    save_model(model, tmp, external_data)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[
        options.calibrate_method
    ]
    try:
        # The percentile calibrator print()s its progress; keep stdout for our own output.
        with _quiet_root_logger(), contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(tmp),
                str(dst),
                _Reader(model, calib),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                per_channel=options.per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=act_mm + list(options.exclude),
                use_external_data_format=external_data,
                calibrate_method=method,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
            )
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".data").unlink(missing_ok=True)
    return {
        "method": "onnxruntime quantize_static (QDQ)",
        "smoothquant_layers": smoothed,
        "quantized_matmuls": len(weight_mm) - len(options.exclude),
        "float_matmuls": act_mm + list(options.exclude),
        "calibration_windows": len(calib),
        "head_untied": untied,
        **options.as_dict(),
    }
