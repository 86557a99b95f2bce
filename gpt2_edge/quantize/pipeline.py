"""``gpt2-edge quantize``: an fp32 bundle -> a precision variant, judged by the accuracy gate."""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import DEFAULT_MODEL_DIR, contract
from ..errors import Gpt2EdgeError
from ..export.graph import checked_census, unsupported_by_tensorrt
from ..export.writer import EXTERNAL_DATA_THRESHOLD, finalize, producer_versions, write_manifest
from ..fsutil import check_output, staging_dir
from ..runtime import manifest as schema
from ..runtime.backends import load_backend
from ..runtime.bundle import MANIFEST, Bundle, sha256_file
from ..runtime.openvino.system import IR_FILE
from ..runtime.session import OrtBackend
from .accuracy import AccuracyReport, compare, eval_prompts
from .bf16 import to_bf16, write_openvino_ir
from .calibrate import read_tokens, windows
from .fp16 import to_fp16
from .int4 import PROMPT_FILE, to_nbits
from .int8 import QdqOptions, to_int8_dynamic, to_int8_qdq

PRECISIONS = tuple(p for p in schema.PRECISIONS if p != "fp32")
CALIB_WINDOWS = 32
CALIB_LENGTH = 128


class GateError(Gpt2EdgeError):
    """The variant misses its accuracy gate (and --force was not given); ``report`` has the numbers."""

    def __init__(self, message: str, report: AccuracyReport) -> None:
        super().__init__(message)
        self.report = report


# A variant's weights over its fp32 bundle's (measured at gpt2-xl, rounded up): whether they will
# pass the external-data threshold, decided before converting.
SIZE_RATIO = {"fp16": 0.5, "bf16": 0.5, "int8-dynamic": 0.3, "int8-weight": 0.3, "int8-qdq": 0.3, "int4": 0.2}


def quantize_bundle(
    src: str | Path,
    precision: str,
    out: str | Path,
    calib_text: str | Path | None = None,
    eval_text: str | Path | None = None,
    force: bool = False,
    overwrite: bool = False,
    qdq: QdqOptions = QdqOptions(),
    eval_max_length: int | None = None,
    threads: int | None = None,
    progress: bool = False,
    log: Callable[[str], object] = print,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    prompt_graph: bool = True,
) -> tuple[Path, AccuracyReport | None]:
    """Write the ``precision`` variant of fp32 bundle ``src`` to ``out`` if it passes its gate.

    The gate needs held-out text (``eval_text``), int8-qdq calibration text (``calib_text``); a
    bundle of the shipped default model uses the samples shipped with it when none is given.
    The variant's weights are ONNX external data when ``src``'s are and the variant's are
    expected past ``external_data_threshold`` bytes (else inline: int8 GEMMs read inline weights
    faster, docs/measured.md).
    ``out`` may not be ``src``, contain it or lie inside it; ``overwrite`` replaces an earlier
    bundle only. ``progress`` shows the gate's progress on a terminal. ``prompt_graph`` (int4, in-place
    KV cache): also write the int8 graph prompt chunks run through (quantize/int4.py; more memory,
    about half the time to first token), and gate the mix as it runs.
    """
    if precision not in PRECISIONS:
        raise Gpt2EdgeError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    base = Bundle.load(src)
    if base.precision != "fp32":
        raise Gpt2EdgeError(
            f"{src} is a {base.precision} bundle; quantize from the fp32 bundle of the checkpoint"
        )
    if precision == "fp16" and base.kv_form == "inplace":
        raise Gpt2EdgeError(
            f"{src} has the in-place KV cache, which runs on the CPU provider, where fp16 is slower than "
            "fp32; fp16 bundles are for CUDA / TensorRT: export with `--kv-cache concat` or "
            "`--target tensorrt` first"
        )
    if precision == "bf16":
        check_bf16_source(base)
    target_dir = check_output(out, [base.path], overwrite, marker=MANIFEST, what="bundle")
    samples = default_model_samples(base)
    if samples is not None and eval_text is None:
        eval_text = samples.heldout
        log(f"accuracy gate on the default model's held-out sample {samples.heldout}")
    if samples is not None and calib_text is None and precision == "int8-qdq":
        calib_text = samples.calib
        log(f"calibration on the default model's sample {samples.calib}")
    if eval_text is None and not force:
        raise Gpt2EdgeError(
            "the accuracy gate needs held-out text: pass --eval FILE (only bundles of the shipped default "
            "model have a sample built in), or --force to skip the gate"
        )
    tok = base.tokenizer()
    d = base.dims
    calib = None
    if precision == "int8-qdq":
        if calib_text is None:
            raise Gpt2EdgeError("int8-qdq needs calibration text: pass --calib FILE")
        length = min(CALIB_LENGTH, base.context_length)
        ids = read_tokens(calib_text, tok, min_tokens=2 * length)
        calib = windows(ids, length, CALIB_WINDOWS)
    eval_ids = None
    if eval_text is not None:
        eval_ids = read_tokens(eval_text, tok, min_tokens=64, what="evaluation")
    if precision == "fp16":
        log(
            "note: fp16 bundles are for CUDA / TensorRT; ONNX Runtime's CPU provider runs fp16 slower than "
            "fp32 (it casts around most kernels). The gate below runs on the CPU all the same."
        )

    data = base.path / (base.manifest.model_file + ".data")
    external = data.is_file() and data.stat().st_size * SIZE_RATIO[precision] > external_data_threshold
    with staging_dir(target_dir) as tmp:
        t0 = time.perf_counter()
        dst = tmp / "model.onnx"
        keep = any(s.name == "logits_to_keep" for s in base.inputs)
        prompt = prompt_graph and precision == "int4" and base.kv_form == "inplace"
        if precision == "bf16":
            info = to_bf16(base.model_file, dst, external, logits_to_keep=not keep)
            keep = True
            info["openvino_ir"] = IR_FILE if write_openvino_ir(dst, tmp / IR_FILE) else None
            if info["openvino_ir"] is None:
                log("bf16: OpenVINO is not installed: no OpenVINO IR written (the provider reads model.onnx)")
        else:
            info = _convert(base.model_file, dst, precision, external, calib, qdq, prompt)
        seconds = time.perf_counter() - t0
        log(f"{precision}: converted in {seconds:.1f} s")
        kv = "float16" if precision == "fp16" else "float32"
        form = {"kv_cache": base.kv_form, "logits_to_keep": keep}
        invariant = any(s.name == "step_invariant" for s in base.inputs)
        slots = base.manifest.lora_slots  # run-time LoRA inputs stay float32 (the adapters' dtype)
        specs_in = contract.inputs(
            d.n_layer, d.n_head, d.head_size, kv, **form, step_invariant=invariant,
            lora_rank=slots.rank if slots else 0,
        )  # fmt: skip
        specs_out = contract.outputs(d.n_layer, d.n_head, d.head_size, d.vocab_size, kv, **form)
        census = checked_census(dst, specs_in, specs_out)
        if prompt:
            checked_census(tmp / PROMPT_FILE, specs_in, specs_out)  # the same contract, or refused
        target = base.target
        if target == "tensorrt" and unsupported_by_tensorrt(census):
            target = "ort"  # contrib ops (MatMulNBits, DynamicQuantizeLinear...): ONNX Runtime only
        shutil.copy2(base.path / "tokenizer.json", tmp / "tokenizer.json")
        manifest = {k: v for k, v in base.manifest.to_dict().items() if k not in ("files", "schema_version")}
        manifest.update(
            {
                "io": {
                    "inputs": [s.as_dict() for s in specs_in],
                    "outputs": [s.as_dict() for s in specs_out],
                },
                "kv_dtype": kv,
                "target": target,
                "precision": precision,
                "quantization": {
                    "from": str(base.path),
                    "from_sha256": base.manifest.files[base.manifest.model_file].sha256,
                    "seconds": seconds,
                    **info,
                },
                "producers": producer_versions(),
                "graph": {
                    "op_census": census,
                    "fused_ops": base.manifest.graph.get("fused_ops", {}),
                },
            }
        )
        if prompt:
            manifest["prompt_model_file"] = PROMPT_FILE
        report = None
        if eval_ids is not None:
            write_manifest(tmp, manifest)
            variant = Bundle.load(tmp, verify=False)
            with warnings.catch_warnings():  # the fp16-on-CPU warning: said above already
                warnings.simplefilter("ignore")
                ref_b = OrtBackend(base, threads=threads)
                # bf16: judged on the backend that will run it (auto: OpenVINO where it computes bf16)
                var_b = load_backend(variant, "auto" if precision == "bf16" else "cpu", threads=threads)
            if precision == "bf16":
                log(f"bf16 gate on the {var_b.capabilities.provider} provider")
            report = compare(
                ref_b,
                var_b,
                eval_ids,
                precision,
                eval_max_length or min(256, base.context_length),
                prompts=eval_prompts(eval_ids),
                n_ctx=base.context_length,
                progress=progress,
            )
            del ref_b, var_b
            (tmp / MANIFEST).unlink()
            log(report.summary())
            manifest["accuracy"] = {**report.as_dict(), "text": str(eval_text), "forced": not report.passed}
            if not report.passed and not force:
                raise GateError(
                    f"{precision} misses its gate: perplexity {report.perplexity:.3f} vs fp32 "
                    f"{report.perplexity_fp32:.3f} is {100 * report.ppl_increase:+.2f}% (gate "
                    f"+{100 * report.gate:.1f}%); mean KL {report.mean_kl:.4f}, top-1 "
                    f"{100 * report.top1_agreement:.2f}%. Not written (pass --force to write it anyway)",
                    report,
                )
        else:
            manifest["accuracy"] = None
        return finalize(tmp, target_dir, manifest, overwrite=overwrite), report


def check_bf16_source(base: Bundle) -> None:
    """Refuse, by name, an fp32 bundle whose graph OpenVINO cannot read (what runs bf16 in bf16)."""
    contrib = sorted(op for op in base.manifest.graph.get("op_census", {}) if ":" in op)
    if base.kv_form != "concat" or contrib:
        why = (
            "has the in-place KV cache (ONNX Runtime's GroupQueryAttention)"
            if base.kv_form != "concat"
            else f"has ONNX Runtime contrib ops ({', '.join(contrib)})"
        )
        raise Gpt2EdgeError(
            f"{base.path} {why}, which OpenVINO (what computes bf16 on CPUs) cannot read: make the bf16 "
            "bundle from a standard-op export, `gpt2-edge export CHECKPOINT --target tensorrt -o DIR`"
        )


@dataclass(frozen=True)
class Samples:
    heldout: Path  # from the default model's validation split: the gate's text
    calib: Path  # from its training split: int8-qdq calibration


def default_model_samples(base: Bundle) -> Samples | None:
    """The text samples shipped with the default model, if ``base`` was exported from it.

    Recognised by the sha256 of the checkpoint's weights recorded at export (wherever either was
    copied to since), or, for bundles written before that was recorded, by the source path.
    """
    samples = Samples(DEFAULT_MODEL_DIR / "heldout.txt", DEFAULT_MODEL_DIR / "calib.txt")
    weights = DEFAULT_MODEL_DIR / "model.safetensors"
    if not (samples.heldout.is_file() and samples.calib.is_file() and weights.is_file()):
        return None
    made = base.manifest.made_by
    if made.source_sha256 is not None:
        same = made.source_sha256 == sha256_file(weights)
    else:
        source = made.source
        same = source is not None and Path(source).resolve() == DEFAULT_MODEL_DIR.resolve()
    return samples if same else None


def _convert(
    src: Path, dst: Path, precision: str, external: bool, calib, qdq: QdqOptions, prompt: bool = False
) -> dict:
    if precision == "fp16":
        return to_fp16(src, dst, external)
    if precision == "int8-dynamic":
        return to_int8_dynamic(src, dst, external)
    if precision == "int8-weight":
        return to_nbits(src, dst, bits=8, external_data=external)
    if precision == "int8-qdq":
        return to_int8_qdq(src, dst, external, calib, qdq)
    return to_nbits(src, dst, bits=4, external_data=external, prompt_graph=prompt)
