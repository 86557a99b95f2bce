"""Export: a checkpoint -> ONNX -> the target's graph -> parity check -> a bundle directory
(written atomically by ``writer``). The torch side: it loads the PyTorch checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxscript.optimizer

from .. import contract
from ..errors import Gpt2EdgeError
from ..fsutil import check_output, staging_dir
from ..model.checkpoint import CheckpointError, load_checkpoint, load_tokenizer, resolve_model_dir
from ..model.config import GPTConfig
from ..model.lora import merge_adapter
from ..progress import Progress
from ..runtime.bundle import MANIFEST, sha256_file
from ..runtime.lora import Adapter, load_adapter, parse_spec
from ..runtime.manifest import TARGETS
from .fusions import optimize_for_ort
from .graph import KV_FORMS, checked_census, save_model
from .lora_slots import add_lora_slots
from .memory import release_memory
from .onnx import DEFAULT_OPSET, export_onnx, weight_bytes
from .validate import record_reference, validate_onnx
from .writer import EXTERNAL_DATA_THRESHOLD, finalize, producer_versions

__all__ = ["EXTERNAL_DATA_THRESHOLD", "TARGETS", "export_bundle", "weights_sha256"]


def export_bundle(
    model_spec: str | Path | None,
    out_dir: str | Path,
    target: str = "ort",
    opset: int | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    overwrite: bool = False,
    validate: bool = True,
    fuse_attention: bool = True,
    kv_cache: str | None = None,
    lora: str | Path | None = None,
    lora_slots: int = 0,
    lora_rank: int = 8,
    log: Callable[[str], object] = print,
    progress: bool = False,
) -> Path:
    """Checkpoint -> ONNX -> target graph -> parity check -> bundle directory (atomic).

    The output may not be the checkpoint, contain it or lie inside it; ``overwrite`` replaces
    an earlier bundle only. ``progress`` shows a bar of the stages on a terminal. ``lora``: a PEFT
    LoRA adapter directory (``NAME=DIR`` names it) merged into the weights before the export; it is
    checked against the checkpoint's dims before anything is written, and recorded in the manifest.
    ``lora_slots``: the graph takes up to this many adapters of rank up to ``lora_rank`` at run time
    (``export.lora_slots``; the ``ort`` target); 0 = today's graph, unchanged.
    """
    if target not in TARGETS:
        raise Gpt2EdgeError(f"target must be one of {TARGETS}, got {target!r}")
    kv_cache = kv_cache or ("inplace" if target == "ort" else "concat")
    if kv_cache not in KV_FORMS:
        raise Gpt2EdgeError(f"kv_cache must be one of {', '.join(KV_FORMS)}, got {kv_cache!r}")
    if target == "tensorrt" and kv_cache != "concat":
        raise Gpt2EdgeError("the tensorrt target has the concatenating KV cache only (--kv-cache concat)")
    if lora_slots < 0 or (lora_slots and lora_rank < 1):
        raise Gpt2EdgeError(
            f"--lora-slots must be >= 0 and --lora-rank >= 1, got {lora_slots} and {lora_rank}"
        )
    if lora_slots and target != "ort":
        raise Gpt2EdgeError("run-time LoRA slots (--lora-slots) are for the ort target only")
    src = resolve_model_dir(model_spec)
    adapter = _load_adapter(src, lora) if lora is not None else None
    target_dir = check_output(out_dir, [src], overwrite, marker=MANIFEST, what="bundle")
    with Progress(enabled=progress, desc="export", total=len(STAGES), unit="stage") as bar:
        return _export(
            src,
            target_dir,
            bar,
            target=target,
            opset=opset or DEFAULT_OPSET,
            external_data_threshold=external_data_threshold,
            overwrite=overwrite,
            validate=validate,
            fuse_attention=fuse_attention,
            kv_cache=kv_cache,
            adapter=adapter,
            lora_rank=lora_rank if lora_slots else 0,
            lora_slots=lora_slots,
            log=lambda m: bar.log(log, m),
        )


STAGES = ("load checkpoint", "export to ONNX", "graph passes", "parity check", "write bundle")


def _export(
    src: Path,
    target_dir: Path,
    bar: Progress,
    *,
    target: str,
    opset: int,
    external_data_threshold: int,
    overwrite: bool,
    validate: bool,
    fuse_attention: bool,
    kv_cache: str,
    adapter: Adapter | None,
    lora_rank: int,
    lora_slots: int,
    log: Callable[[str], object],
) -> Path:
    bar.stage(STAGES[0])
    model, tok = load_checkpoint(src), load_tokenizer(src)
    if adapter is not None:
        # Merged before anything is traced: the parity check then compares against the merged model.
        merge_adapter(model, adapter)
        log(
            f"merged LoRA adapter {adapter.name!r} (rank {adapter.rank}, alpha {adapter.alpha:g}, "
            f"{len(adapter.modules)} projections)"
        )
    c = model.config
    external = weight_bytes(model) > external_data_threshold
    timings: dict[str, float] = {}
    bar.update()
    with staging_dir(target_dir) as tmp:
        bar.stage(STAGES[1])
        t0 = time.perf_counter()
        raw = tmp / "raw" / "model.onnx"
        raw.parent.mkdir()
        # The intermediate file always keeps its weights apart, so graph passes load structure only
        # (peak memory); the final model.onnx is inline or external by the threshold.
        export_onnx(model, raw, opset=opset, external_data=True)
        timings["export_s"] = time.perf_counter() - t0
        # The PyTorch side of the parity check now, then the model is freed: the graph passes and
        # ONNX Runtime never share memory with it (peak memory of the large sizes).
        reference = record_reference(model, kv_cache=kv_cache) if validate else None
        del model
        release_memory()
        log(
            f"exported {c.n_layer} layers x {c.n_embd} to ONNX opset {opset} in {timings['export_s']:.1f} s"
            + (" (external data)" if external else "")
        )
        keep = target == "ort"  # the interchange (tensorrt) graph keeps the plain contract
        invariant = keep and kv_cache == "inplace"
        form = {"kv_cache": kv_cache, "logits_to_keep": keep, "step_invariant": invariant}
        plain_in = contract.inputs(c.n_layer, c.n_head, c.head_size, **form)  # what the exporter emits
        # LoRA slots: the adapter inputs follow the contract's (export.lora_slots adds them after the passes)
        specs_in = contract.inputs(c.n_layer, c.n_head, c.head_size, **form, lora_rank=lora_rank)
        specs_out = contract.outputs(
            c.n_layer, c.n_head, c.head_size, c.vocab_size, kv_cache=kv_cache, logits_to_keep=keep
        )
        final = tmp / "model.onnx"
        fused: dict[str, int] = {}
        bar.update()
        bar.stage(STAGES[2])
        t1 = time.perf_counter()
        if target == "ort":
            fused = optimize_for_ort(
                raw,
                final,
                c.n_head,
                c.n_embd,
                c.n_layer,
                external,
                kv_cache=kv_cache,
                fuse_mha=fuse_attention,
                specs=plain_in + specs_out,
            )
            log(f"ONNX Runtime optimizer (opt_level=2): fused {fused or 'nothing'}")
            if lora_rank:
                add_lora_slots(final, c.n_layer, specs_in)
                log(f"LoRA slots: up to {lora_slots} adapters of rank <= {lora_rank} at run time")
        else:
            _prepare_tensorrt(raw, final, external)
        timings["graph_s"] = time.perf_counter() - t1
        census = checked_census(final, specs_in, specs_out, tensorrt=target == "tensorrt")
        shutil.rmtree(raw.parent)
        release_memory()
        bar.update()
        bar.stage(STAGES[3])
        report = None
        if validate:
            t2 = time.perf_counter()
            report = validate_onnx(final, reference, "fp32", kv_cache=kv_cache)
            timings["validate_s"] = time.perf_counter() - t2
            log(
                f"parity vs PyTorch: max |Δlogits| {report.max_abs_logits:.2e}, top-1 "
                f"{100 * report.top1_agreement:.1f}%, greedy identical: {report.greedy_identical} "
                f"({report.positions_compared} positions, {report.decode_steps} decode steps)"
            )
        bar.update()
        bar.stage(STAGES[4])
        tok.save(tmp)
        (tmp / "tokenizer_config.json").unlink(missing_ok=True)
        copy_chat_template(src, tmp)
        manifest = {
            "model_file": "model.onnx",
            "model": c.bundle_dims(),
            "io": {"inputs": [s.as_dict() for s in specs_in], "outputs": [s.as_dict() for s in specs_out]},
            "kv_dtype": "float32",
            "kv_cache": kv_cache,
            "target": target,
            "precision": "fp32",
            "made_by": {
                "source": str(src),
                # Which weights, wherever they were copied to: recognises the shipped default model.
                "source_sha256": weights_sha256(src),
                "exporter": "torch.onnx.export(dynamo=True)",
                "opset": opset,
                "external_data": external,
                "graph": {
                    "inplace": "GroupQueryAttention (in-place KV) + ",
                    "concat": ("MultiHeadAttention fusion + " if fuse_attention else ""),
                }[kv_cache]
                + "onnxruntime.transformers optimizer, gpt2, opt_level=2, logits_to_keep"
                if target == "ort"
                else "standard ONNX ops, constants folded, shapes inferred",
                "timings": timings,
            },
            "producers": producer_versions(),
            "graph": {"op_census": census, "fused_ops": fused},
            "validation": report.as_dict() if report else None,
            "generation": {
                "eos_token_id": c.eos_token_id,
                "bos_token_id": c.bos_token_id,
                "context_length": c.n_positions,
            },
        }
        if adapter is not None:
            manifest["lora"] = adapter.manifest_entry()
        if lora_rank:
            manifest["lora_slots"] = {
                "slots": lora_slots,
                "rank": lora_rank,
                "targets": list(contract.LORA_TARGETS),
            }
        out = finalize(tmp, target_dir, manifest, overwrite=overwrite)
        bar.update()
        return out


def _load_adapter(src: Path, spec: str | Path) -> Adapter:
    """The adapter ``spec`` names (``DIR`` or ``NAME=DIR``), checked against the checkpoint's config."""
    try:
        config = GPTConfig.load(src)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    name, directory = parse_spec(str(spec))
    return load_adapter(directory, config.n_layer, config.n_embd, name=name)


def copy_chat_template(checkpoint: Path, bundle_dir: Path) -> bool:
    """Carry the checkpoint's Hugging Face chat template into the bundle as ``chat_template.jinja``
    (the server's /v1/chat/completions renders it): the checkpoint's own ``chat_template.jinja``,
    else ``tokenizer_config.json``'s ``chat_template`` (a string, or the entry named ``default``)."""
    jinja = checkpoint / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    config = checkpoint / "tokenizer_config.json"
    if template is None and config.is_file():
        try:
            t = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise Gpt2EdgeError(f"{config} is not a JSON object ({e}); fix or remove it") from None
        if isinstance(t, list):
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
            t = named.get("default")
        template = t if isinstance(t, str) else None
    if not template:
        return False
    (bundle_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    return True


def weights_sha256(checkpoint: Path) -> str | None:
    """sha256 of a single-file checkpoint's weights (None for sharded ones)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (checkpoint / name).is_file():
            return sha256_file(checkpoint / name)
    return None


def _prepare_tensorrt(src: Path, dst: Path, external: bool) -> None:
    """Constant-fold and infer shapes, keeping standard ONNX ops only (no contrib fusions)."""
    proto = onnx.load(str(src))
    proto = onnxscript.optimizer.optimize(proto)  # constant folding + dead code removal
    if external:  # shape inference on a file: an in-memory proto cannot pass 2 GB
        save_model(proto, dst, external_data=True)
        onnx.shape_inference.infer_shapes_path(str(dst), str(dst), data_prop=True)
    else:
        save_model(onnx.shape_inference.infer_shapes(proto, data_prop=True), dst, external_data=False)
