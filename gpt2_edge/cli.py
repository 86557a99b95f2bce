"""``gpt2-edge`` command line: a thin layer over the library functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING

from . import __version__
from .errors import Gpt2EdgeError
from .serve.cli import add_serve

if TYPE_CHECKING:
    from .runtime.sampling import GenerationConfig


class UserError(Gpt2EdgeError):
    """An error whose message is the whole story for the user (no traceback)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, a CI cancel, systemd), raised like Ctrl-C so every
    ``finally`` and staging-directory cleanup runs; the command then exits 143 (128 + 15)."""


# train ------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    from .model.config import TrainConfig  # torch-free: building the parser must not import torch

    p = sub.add_parser("train", help="train a GPT-2 on a text file (language-modelling objective)")
    p.add_argument("--text", required=True, help="UTF-8 text file; the last --val-fraction is held out")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    p.add_argument("--tokenizer", help="checkpoint dir whose tokenizer to reuse (default: train a new one)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(
            flag,
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"(default: {getattr(defaults, f.name)})",
        )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .model.config import TrainConfig
    from .model.train import train
    from .runtime.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    tok = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else None
    res = train(
        args.text,
        args.output,
        cfg,
        tokenizer=tok,
        progress=not args.quiet,
        overwrite=args.overwrite,
        tokenizer_dir=args.tokenizer,
    )
    print(
        f"best val loss {res.best_val_loss:.4f} (ppl {res.best_val_ppl:.2f}) at step {res.best_step} "
        f"of {res.steps}; {res.seconds:.0f} s; checkpoint: {res.out_dir}"
    )
    return 0


# shared options ---------------------------------------------------------------------------
def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--prompt-file", help="read one prompt from a file ('-' = stdin)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy")
    g.add_argument("--temperature", type=float, help="sampling temperature (implies --sample; 0 = greedy)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (implies --sample)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (implies --sample)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, help="seed of the sampler (reproducible output)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score / length**penalty")
    g.add_argument(
        "--early-stopping",
        choices=["true", "false", "never"],
        default="false",
        help="beam search stopping rule (as in transformers)",
    )
    g.add_argument("--truncate", action="store_true", help="left-truncate a prompt that does not fit")
    g.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    g.add_argument("--json", action="store_true", help="print results as JSON")


def _generation_config(args: argparse.Namespace) -> GenerationConfig:
    from .runtime.sampling import GenerationConfig

    # OpenAI's convention: a bare temperature of 0 means greedy; with --sample/top-k/top-p it is an error.
    sample = args.sample or args.top_k is not None or args.top_p is not None or bool(args.temperature)
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        do_sample=sample,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k or 0,
        top_p=1.0 if args.top_p is None else args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(_utf8(s, "--stop") for s in args.stop),
        truncate=args.truncate,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        early_stopping={"true": True, "false": False, "never": "never"}[args.early_stopping],
    )


def _utf8(text: str, source: str) -> str:
    """Refuse text that is not valid UTF-8. Python hands such command-line bytes over as lone
    surrogates (surrogateescape), which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        byte = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"character U+{bad:04X}"
        raise UserError(
            f"{source} is not valid UTF-8 ({byte} at position {e.start}); pass UTF-8 text"
        ) from None
    return text


def _prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` (repeatable), ``--prompt-file`` (``-`` = stdin), or piped standard input."""
    prompts = [_utf8(p, "--prompt") for p in args.prompt or []]
    if args.prompt_file:
        if args.prompt_file == "-":
            prompts.append(_read_stdin())
        else:
            from pathlib import Path

            try:
                prompts.append(Path(args.prompt_file).read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"{args.prompt_file} is not UTF-8 text") from None
    if not prompts and not sys.stdin.isatty():
        prompts.append(_read_stdin())
    if not prompts or any(p == "" for p in prompts):
        raise UserError("no prompt: pass --prompt TEXT, --prompt-file FILE, or text on stdin")
    return prompts


def _read_stdin() -> str:
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text-only stand-in (tests, embedding)
        return sys.stdin.read()
    data = raw.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"standard input is not valid UTF-8 (byte 0x{data[e.start]:02x} at position {e.start}); "
            "pass UTF-8 text"
        ) from None


def _print_results(prompts: list[str], results: list, as_json: bool, load_s: float) -> None:
    import json

    if as_json:
        out = [
            {
                "prompt": p,
                "text": r.text,
                "token_ids": r.token_ids,
                "finish_reason": r.finish_reason,
                "prompt_tokens": r.prompt_tokens,
                "timings": {"load_s": load_s, **r.timings},
            }
            for p, r in zip(prompts, results, strict=True)
        ]
        print(json.dumps(out if len(out) > 1 else out[0], indent=2, ensure_ascii=False))
        return
    for p, r in zip(prompts, results, strict=True):
        if len(prompts) > 1:
            print(f"--- {p!r} [{r.finish_reason}]")
        print(r.text)
    _print_timings(results, load_s)


def _print_timings(results: list, load_s: float) -> None:
    """llama.cpp-style summary on stderr: load, prompt (time to first token), per-step decode."""
    t = results[0].timings
    n = sum(len(r.token_ids) for r in results)
    ms = t["ms_per_token"]
    rate = f" ({1000 / ms:.1f} steps/s)" if ms else ""
    print(
        f"\nload {1000 * load_s:.0f} ms | time to first token {1000 * t['prefill_s']:.1f} ms "
        f"({max(r.prompt_tokens for r in results)} prompt tokens x {len(results)}) | "
        f"{n} new tokens, {ms:.2f} ms per step{rate}",
        file=sys.stderr,
    )


# generate -----------------------------------------------------------------------------------
def _is_bundle(spec: str | None) -> bool:
    from pathlib import Path

    return spec is not None and (Path(spec) / "bundle.json").is_file()


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt (greedy by default)")
    p.add_argument(
        "model", nargs="?", help="bundle dir, checkpoint dir or hub id (default: the shipped model)"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="onnx = the torch-free runtime on a bundle; torch = the PyTorch reference "
        "(default: onnx for a bundle, torch for a checkpoint)",
    )
    p.add_argument(
        "--provider",
        default="cpu",
        choices=["cpu", "cuda", "tensorrt", "auto"],
        help="ONNX Runtime execution provider (onnx backend)",
    )
    p.add_argument("--threads", type=int, help="CPU threads")
    _add_generation_args(p)
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    cfg = _generation_config(args)
    prompts = _prompts(args)
    backend = args.backend
    if backend == "auto":
        backend = "onnx" if _is_bundle(args.model) else "torch"
    if backend == "onnx":
        from .runtime.generator import Generator

        if not _is_bundle(args.model):
            raise UserError(
                f"{args.model or 'the default model'} is not a bundle; make one with "
                "`gpt2-edge export MODEL -o DIR`, or use --backend torch"
            )
        gen = Generator.from_bundle(args.model, provider=args.provider, threads=args.threads)
        if args.provider == "auto":
            print(f"provider: {gen.provider}", file=sys.stderr)
        if args.stream:
            if len(prompts) != 1 or args.json:
                raise UserError("--stream takes exactly one prompt and no --json")
            for piece in gen.stream(prompts[0], cfg):
                print(piece, end="", flush=True)
            print()
            _print_timings([gen.last_result], gen.load_s)
            return 0
        results = gen.generate(prompts, cfg)
        load_s = gen.load_s
    else:
        import torch

        from .model.checkpoint import load_checkpoint, load_tokenizer
        from .model.generate import generate

        if args.threads:
            torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        model, tok = load_checkpoint(args.model), load_tokenizer(args.model)
        load_s = time.perf_counter() - t0
        results = generate(model, tok, prompts, cfg)
    _print_results(prompts, results, args.json, load_s)
    return 0


# eval ---------------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="sliding-window perplexity on a text file")
    p.add_argument(
        "model", nargs="?", help="bundle dir, checkpoint dir or hub id (default: the shipped model)"
    )
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument(
        "--tail",
        type=float,
        default=1.0,
        help="evaluate only the last fraction of the file (0.1 = the training split's held-out part)",
    )
    p.add_argument("--max-length", type=int, help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, help="window stride (default: max-length / 2)")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument(
        "--reference",
        help="fp32 bundle to compare a quantized bundle with (default: the one "
        "it was made from, when present): adds KL, top-1 and greedy agreement",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)


def evaluate_text(
    model_spec: str | None,
    text_path: str,
    tail: float = 1.0,
    max_length: int | None = None,
    stride: int | None = None,
    progress: bool = False,
    threads: int | None = None,
):
    """Perplexity of a bundle or checkpoint on (the last ``tail`` fraction of) a text file."""
    from .model.evaluate import perplexity, read_text  # torch-free: eval of a bundle needs no torch

    if not 0 < tail <= 1:
        raise UserError(f"--tail must be in (0, 1], got {tail}")
    text = read_text(text_path)
    text = text[int(len(text) * (1 - tail)) :]
    if _is_bundle(model_spec):
        from .runtime.bundle import Bundle
        from .runtime.session import OrtBackend

        bundle = Bundle.load(model_spec)
        fn, tok, n_ctx = OrtBackend(bundle, threads=threads).logits, bundle.tokenizer(), bundle.context_length
    else:
        from .model.checkpoint import load_checkpoint, load_tokenizer
        from .model.evaluate import torch_logits_fn

        model, tok = load_checkpoint(model_spec), load_tokenizer(model_spec)
        fn, n_ctx = torch_logits_fn(model), model.config.n_positions
    max_length = max_length or n_ctx
    if max_length > n_ctx:
        raise UserError(f"--max-length {max_length} exceeds the model's context {n_ctx}")
    return perplexity(fn, tok.encode(text), max_length, stride, progress=progress)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    if args.threads and not _is_bundle(args.model):
        import torch

        torch.set_num_threads(args.threads)
    reference = args.reference
    if reference is None and _is_bundle(args.model):
        from .runtime.bundle import Bundle

        made_from = (Bundle.load(args.model, verify=False).manifest.get("quantization") or {}).get("from")
        reference = made_from if made_from and _is_bundle(made_from) else None
    if reference is not None:
        return _eval_against(args, reference)
    rep = evaluate_text(
        args.model, args.text, args.tail, args.max_length, args.stride, not args.quiet, args.threads
    )
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        print(
            f"perplexity {rep.perplexity:.3f} over {rep.tokens} tokens "
            f"({rep.tokens_per_s:.0f} tokens/s, {rep.seconds:.1f} s)"
        )
    return 0


def _eval_against(args: argparse.Namespace, reference: str) -> int:
    """A bundle against its fp32 reference: the accuracy gate's numbers."""
    import json

    from .model.evaluate import read_text
    from .quantize.accuracy import compare, eval_prompts
    from .runtime.bundle import Bundle
    from .runtime.session import OrtBackend

    if not _is_bundle(args.model):
        raise UserError("--reference compares two bundles; MODEL must be a bundle")
    b, ref = Bundle.load(args.model), Bundle.load(reference)
    text = read_text(args.text)
    ids = b.tokenizer().encode(text[int(len(text) * (1 - args.tail)) :])  # the same split as plain eval
    if len(ids) < 64:
        raise UserError(f"{args.text} (last {args.tail:.0%}) has {len(ids)} tokens; at least 64 are needed")
    rep = compare(
        OrtBackend(ref, threads=args.threads),
        OrtBackend(b, threads=args.threads),
        ids,
        b.precision,
        args.max_length or min(256, b.context_length),
        args.stride,
        prompts=eval_prompts(ids),
        n_ctx=b.context_length,
        progress=not args.quiet,
    )
    print(json.dumps(rep.as_dict(), indent=2) if args.json else rep.summary())
    return 0


# export / inspect / validate ------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    from .export.bundle import EXTERNAL_DATA_THRESHOLD, TARGETS

    p = sub.add_parser("export", help="checkpoint -> ONNX bundle (validated against PyTorch)")
    p.add_argument("model", nargs="?", help="checkpoint dir or hub id (default: the shipped model)")
    p.add_argument("-o", "--output", required=True, help="bundle directory to write")
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="ort",
        help="ort = ONNX Runtime fusions; tensorrt = standard ONNX ops only",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default 18, at least 17)")
    p.add_argument(
        "--external-data-threshold",
        type=int,
        default=EXTERNAL_DATA_THRESHOLD,
        help="weights above this many bytes go to model.onnx.data (default: 1.8e9)",
    )
    p.add_argument(
        "--no-fuse-attention",
        action="store_true",
        help="ort target: keep attention as plain ops (no MultiHeadAttention)",
    )
    p.add_argument("--no-validate", action="store_true", help="skip the parity check (not recommended)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export.bundle import export_bundle

    out = export_bundle(
        args.model,
        args.output,
        target=args.target,
        opset=args.opset,
        external_data_threshold=args.external_data_threshold,
        overwrite=args.overwrite,
        validate=not args.no_validate,
        fuse_attention=not args.no_fuse_attention,
        progress=not args.quiet,
    )
    print(f"bundle written: {out}")
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a bundle")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="print bundle.json")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from .runtime.bundle import Bundle

    b = Bundle.load(args.bundle)
    m = b.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    d = b.dims
    print(f"bundle {b.path}  (schema {m['schema_version']}, target {b.target}, precision {b.precision})")
    print(
        f"model  {d['n_layer']} layers, {d['n_embd']} wide, {d['n_head']} heads x {d['head_size']}, "
        f"vocab {d['vocab_size']}, context {d['n_positions']}"
    )
    total = sum(f["bytes"] for f in m["files"].values())
    print(f"files  ({total / 2**20:.1f} MiB)")
    for name, f in m["files"].items():
        print(f"  {name:<22} {f['bytes'] / 2**20:>9.2f} MiB  sha256 {f['sha256'][:16]}")
    print("inputs")
    for s in b.inputs[:5]:
        print(f"  {s.name:<28} {s.dtype:<8} {list(s.shape)}")
    if len(b.inputs) > 5:
        print(f"  ... {len(b.inputs) - 5} more past_key_values.*")
    print("outputs")
    for s in b.outputs[:3]:
        print(f"  {s.name:<28} {s.dtype:<8} {list(s.shape)}")
    if len(b.outputs) > 3:
        print(f"  ... {len(b.outputs) - 3} more present.*")
    g = m.get("graph", {})
    if g:
        census = ", ".join(f"{k} {v}" for k, v in list(g["op_census"].items())[:12])
        print(f"ops    {census}{' ...' if len(g['op_census']) > 12 else ''}")
        print(f"fused  {g.get('fused_ops') or 'none'}")
    v = m.get("validation")
    if v:
        print(
            f"parity ({v['tolerance']}): max |dlogits| {v['max_abs_logits']:.2e}, max |dpresent| "
            f"{v['max_abs_present']:.2e}, top-1 {100 * v['top1_agreement']:.2f}%, greedy identical "
            f"{v['greedy_identical']}, {v['positions_compared']} positions, passed {v['passed']}"
        )
    if m.get("accuracy"):
        print(f"accuracy {m['accuracy']}")
    made = m.get("made_by", {})
    print(f"made   {made.get('exporter', '')} opset {made.get('opset', '')}; {made.get('graph', '')}")
    print("with   " + ", ".join(f"{k} {v}" for k, v in m.get("producers", {}).items()))
    print(f"gen    eos {m['generation']['eos_token_id']}, context {m['generation']['context_length']}")
    return 0


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="re-check a bundle's parity against its PyTorch checkpoint")
    p.add_argument("bundle")
    p.add_argument("model", nargs="?", help="checkpoint (default: the one the bundle was made from)")
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .export.validate import validate_onnx
    from .model.checkpoint import load_checkpoint
    from .runtime.bundle import Bundle

    b = Bundle.load(args.bundle)
    source = args.model or b.manifest.get("made_by", {}).get("source")
    if args.model is None and (source is None or not Path(source).is_dir()):
        raise UserError(f"the bundle's source checkpoint {source!r} is not here; pass MODEL")
    _same_dims(b, source)
    tol = {"fp32": "fp32"}.get(b.precision, b.precision.split("-")[0])
    rep = validate_onnx(
        b.model_file,
        load_checkpoint(source),
        tolerance=tol,
        raise_on_failure=False,
        kv_dtype=b.inputs[3].dtype,
        kv_cache=b.kv_form,
    )
    print(
        f"{b.path} vs {source} ({tol} tolerance): max |dlogits| {rep.max_abs_logits:.2e}, "
        f"top-1 {100 * rep.top1_agreement:.2f}%, greedy identical {rep.greedy_identical}: "
        f"{'PASS' if rep.passed else 'FAIL'}"
    )
    return 0 if rep.passed else 1


def _same_dims(b, source: str) -> None:
    """Refuse a checkpoint of other dims before any session runs (ONNX Runtime's message would be
    about a missing input name or a shape)."""
    from .model.checkpoint import CheckpointError, resolve_model_dir
    from .model.config import GPTConfig

    try:
        config = GPTConfig.load(resolve_model_dir(source))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    keys = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")
    differ = [f"{k} {b.dims[k]} vs {getattr(config, k)}" for k in keys if b.dims[k] != getattr(config, k)]
    if differ:
        raise UserError(
            f"{b.path} was not exported from {source}: their dims differ (bundle vs checkpoint: "
            f"{', '.join(differ)}); validate a bundle against the checkpoint it was exported from"
        )


# quantize -----------------------------------------------------------------------------------
def _add_quantize(sub: argparse._SubParsersAction) -> None:
    from .runtime.manifest import PRECISIONS as ALL  # not quantize.pipeline: it imports onnx

    PRECISIONS = tuple(p for p in ALL if p != "fp32")

    p = sub.add_parser("quantize", help="fp32 bundle -> fp16 / int8 / int4 bundle, behind an accuracy gate")
    p.add_argument("bundle", help="an fp32 bundle (from gpt2-edge export)")
    p.add_argument("--precision", required=True, choices=PRECISIONS)
    p.add_argument("-o", "--output", required=True, help="bundle directory to write")
    p.add_argument(
        "--calib",
        help="UTF-8 calibration text (needed by int8-qdq; default-model bundles: its shipped sample)",
    )
    p.add_argument(
        "--eval",
        help="held-out UTF-8 text for the accuracy gate (default-model bundles: its shipped sample)",
    )
    p.add_argument("--force", action="store_true", help="write the variant even if it misses its gate")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--smooth-alpha", type=float, default=0.5, help="int8-qdq: SmoothQuant migration strength")
    p.add_argument("--no-smooth", action="store_true", help="int8-qdq: no SmoothQuant (naive static int8)")
    p.add_argument("--per-tensor", action="store_true", help="int8-qdq: per-tensor weight scales")
    p.add_argument(
        "--calibration",
        choices=["percentile", "minmax"],
        default="percentile",
        help="int8-qdq: activation range estimator",
    )
    p.add_argument(
        "--quantize-head",
        action="store_true",
        help="int8-qdq: quantize the LM head too (its most sensitive MatMul)",
    )
    p.add_argument("--exclude", action="append", default=[], help="int8-qdq: MatMul node to keep in float")
    p.add_argument("--threads", type=int, help="CPU threads for calibration and the gate")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize.int8 import QdqOptions
    from .quantize.pipeline import quantize_bundle

    qdq = QdqOptions(
        smooth_alpha=None if args.no_smooth else args.smooth_alpha,
        per_channel=not args.per_tensor,
        exclude=tuple(args.exclude),
        quantize_head=args.quantize_head,
        calibrate_method=args.calibration,
    )
    out, _ = quantize_bundle(
        args.bundle,
        args.precision,
        args.output,
        calib_text=args.calib,
        eval_text=args.eval,
        force=args.force,
        overwrite=args.overwrite,
        qdq=qdq,
        threads=args.threads,
        progress=not args.quiet,
    )
    print(f"bundle written: {out}")
    return 0


# demo ---------------------------------------------------------------------------------------
DEMO_PRECISIONS = ("int8-dynamic", "int4")  # the variants that run well on ONNX Runtime's CPU provider


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole chain on the shipped default model: export, validate, quantize, generate, compare",
    )
    p.add_argument("--model", help="checkpoint dir (default: the shipped model; then --text is needed)")
    p.add_argument(
        "--text",
        help="held-out UTF-8 text for the accuracy gate (default: the shipped model's sample, "
        "gpt2_edge/default_model/heldout.txt)",
    )
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the runtime")
    p.add_argument(
        "-o",
        "--output",
        default="out/demo",
        help="where the demo writes its bundles (fp32/, int8-dynamic/, int4/)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from . import DEFAULT_MODEL_DIR
    from .export.bundle import export_bundle
    from .fsutil import check_output
    from .model.checkpoint import load_checkpoint, load_tokenizer, resolve_model_dir
    from .model.generate import generate
    from .quantize.pipeline import GateError, quantize_bundle
    from .runtime.bundle import MANIFEST, Bundle
    from .runtime.sampling import GenerationConfig

    t_start = time.perf_counter()
    src = resolve_model_dir(args.model)
    if args.text is None and args.model is not None:
        raise UserError("--model needs --text: held-out text for the accuracy gate")
    text = Path(args.text) if args.text else DEFAULT_MODEL_DIR / "heldout.txt"
    outs = {p: Path(args.output) / p for p in ("fp32", *DEMO_PRECISIONS)}
    for out in outs.values():  # before any work: the demo replaces only bundles, never its sources
        check_output(out, [src, text], overwrite=True, marker=MANIFEST, what="bundle")
    progress = not args.quiet

    t0 = time.perf_counter()
    model, tok = load_checkpoint(src), load_tokenizer(src)
    c = model.config
    name = f"default model ({DEFAULT_MODEL_DIR.name}/)" if args.model is None else f"model {src}"
    print(
        f"1. {name}: {model.num_parameters() / 1e6:.2f} M parameters, {c.n_layer} layers x {c.n_embd}, "
        f"{c.n_head} heads, vocab {c.vocab_size}, context {c.n_positions} "
        f"(loaded in {1000 * (time.perf_counter() - t0):.0f} ms)"
    )
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    ref = generate(model, tok, args.prompt, cfg)[0]
    print(f"   PyTorch reference, greedy:\n{_indent(args.prompt + ref.text)}")

    print(f"\n2. export to ONNX (ort target, in-place KV cache) -> {outs['fp32']}")
    logs: list[str] = []
    bundle = export_bundle(
        src, outs["fp32"], target="ort", overwrite=True, log=logs.append, progress=progress
    )
    for line in logs:
        if not line.startswith("parity"):
            print("   " + line)
    v = Bundle.load(bundle, verify=False).manifest["validation"]
    print(
        f"\n3. validate: ONNX Runtime vs PyTorch, max |Δlogits| {v['max_abs_logits']:.1e}, top-1 "
        f"{100 * v['top1_agreement']:.1f}%, greedy identical: {v['greedy_identical']} "
        f"({v['positions_compared']} positions, {v['decode_steps']} decode steps): "
        f"{'PASS' if v['passed'] else 'FAIL'}"
    )

    shown = f"{DEFAULT_MODEL_DIR.name}/{text.name}, shipped with the model" if args.text is None else text
    print(f"\n4. quantize behind the accuracy gate (held-out text: {shown})")
    reports, written = {}, {"fp32": bundle}
    for precision in DEMO_PRECISIONS:
        try:
            out, rep = quantize_bundle(
                bundle,
                precision,
                outs[precision],
                eval_text=text,
                overwrite=True,
                threads=args.threads,
                progress=progress,
                log=lambda _: None,
            )
            written[precision] = out
        except GateError as e:
            rep = e.report
        reports[precision] = rep
        print(
            f"   {precision:<13} perplexity {rep.perplexity:.2f} vs fp32 {rep.perplexity_fp32:.2f} "
            f"({100 * rep.ppl_increase:+.2f}%, gate +{100 * rep.gate:.0f}%): "
            + (f"written to {written[precision]}" if precision in written else "misses its gate, not written")
        )

    print(
        f"\n5. generate with the torch-free runtime (onnxruntime, CPU, {args.threads} threads), greedy, "
        f"{args.max_new_tokens} new tokens"
    )
    speed, texts = {}, {}
    for precision, path in written.items():
        speed[precision], texts[precision] = _demo_generate(path, args.prompt, cfg, args.threads)
    fp32 = texts["fp32"]
    same = "identical to" if fp32.token_ids == ref.token_ids else "DIFFERENT from"
    print(f"   fp32: tokens {same} the PyTorch reference")
    for precision in (p for p in DEMO_PRECISIONS if p in written):
        ids = texts[precision].token_ids
        first = next((i for i, (a, b) in enumerate(zip(ids, fp32.token_ids, strict=False)) if a != b), None)
        if first is None:
            print(f"   {precision}: the same tokens as fp32")
        else:
            tail = tok.decode(ids[first:])
            tail = repr(tail if len(tail) <= 48 else tail[:45] + "...")
            print(f"   {precision}: the fp32 tokens for {first} of {len(ids)}, then {tail}")

    print(
        f"\n6. summary (CPU, {args.threads} threads; perplexity on the held-out text, "
        "top-1 agreement with fp32)"
    )
    _demo_table(reports, written, speed)
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s; bundles in {args.output}/")
    return 0


def _demo_table(reports: dict, written: dict, speed: dict) -> None:
    """One row per precision: bundle size, perplexity and its change, top-1, speed."""
    from .runtime.bundle import Bundle

    columns = [("precision", 14), ("size MiB", 9), ("perplexity", 12), ("Δ ppl", 9), ("top-1", 9)]
    columns += [("first token", 13), ("tokens/s", 10)]
    print("   " + "".join(f"{t:<{w}}" if i == 0 else f"{t:>{w}}" for i, (t, w) in enumerate(columns)))
    fp32_ppl = next(iter(reports.values())).perplexity_fp32 if reports else float("nan")
    for precision in ("fp32", *DEMO_PRECISIONS):
        rep, path = reports.get(precision), written.get(precision)
        files = Bundle.load(path, verify=False).manifest["files"].values() if path else []
        ttft, rate = speed.get(precision, (None, None))
        cells = [
            precision,
            f"{sum(f['bytes'] for f in files) / 2**20:.2f}" if path else "-",
            f"{rep.perplexity if rep else fp32_ppl:.2f}",
            f"{100 * rep.ppl_increase:+.2f}%" if rep else "-",
            f"{100 * rep.top1_agreement:.2f}%" if rep else "100%",
            f"{1000 * ttft:.2f} ms" if ttft is not None else "not written",
            f"{rate:.0f}" if rate is not None else "-",
        ]
        print(
            "   "
            + "".join(
                f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                for i, (c, (_, w)) in enumerate(zip(cells, columns, strict=True))
            )
        )


def _indent(text: str, prefix: str = "   | ") -> str:
    return "\n".join(prefix + line for line in text.splitlines() or [""])


def _demo_generate(path, prompt: str, cfg: GenerationConfig, threads: int):
    """Median time to first token and decode rate of three greedy runs (the first run of a session
    allocates; the median is steadier than one run), and the result."""
    import statistics

    from .runtime.generator import Generator

    gen = Generator.from_bundle(str(path), threads=threads)
    runs = [gen.generate(prompt, cfg)[0] for _ in range(3)]
    ttft = statistics.median(r.timings["prefill_s"] for r in runs)
    ms = statistics.median(r.timings["ms_per_token"] for r in runs)
    return (ttft, 1000 / ms if ms else float("nan")), runs[-1]


# entry point ------------------------------------------------------------------------------
def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench import add_bench

    add_bench(sub)


def _add_engine(sub: argparse._SubParsersAction) -> None:
    from .engine.cli import add_build_engine, add_doctor

    add_build_engine(sub)
    add_doctor(sub)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train,
    _add_export,
    _add_inspect,
    _add_validate,
    _add_quantize,
    _add_generate,
    _add_eval,
    _add_demo,
    _add_bench,
    _add_engine,
    add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2-edge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gpt2-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"gpt2-edge: warning: {message}\n"


def _on_sigterm(signum: int, frame: object) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading
    import warnings

    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal needs it
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return args.func(args)
    except (Gpt2EdgeError, OSError) as e:
        print(f"gpt2-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"gpt2-edge {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"gpt2-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
