"""``gpt2-edge generate``: continue prompts with a bundle (the torch-free runtime) or a checkpoint
(the PyTorch reference); text or JSON on stdout, a llama.cpp-style timing line on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import Gpt2EdgeError
from ..runtime.backends import PROVIDERS
from ..runtime.constraints import Constraint, ConstraintError, validate_constraint
from ..runtime.generator import Generator
from ..runtime.lora import parse_spec
from ..runtime.sampling import GenerationConfig
from ..runtime.types import GenerationResult
from ._common import is_bundle, read_prompts, utf8


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``generate``."""
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
        choices=PROVIDERS,
        help="cpu | cuda | tensorrt | auto (ONNX Runtime), or trt-engine (the bundle's TensorRT engine "
        "for this GPU, `gpt2-edge build-engine`); onnx backend only (default: cpu)",
    )
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument(
        "--draft",
        metavar="BUNDLE",
        help="speculative decoding with this smaller bundle (same tokenizer, in-place KV cache) as the "
        "draft model: the same greedy text, faster where it guesses right (onnx backend)",
    )
    p.add_argument(
        "--draft-tokens",
        type=int,
        default=4,
        help="most tokens the draft model proposes per step (default 4)",
    )
    p.add_argument(
        "--step-invariant",
        action="store_true",
        help="compute attention as for a chunk in every step, so speculative decoding gives bitwise "
        "plain decoding's tokens for every precision (in-place bundles, cpu; slower at long contexts)",
    )
    p.add_argument(
        "--lora",
        metavar="[NAME=]DIR",
        help="run every prompt with this PEFT LoRA adapter (a bundle exported with --lora-slots)",
    )
    _add_generation_args(p)
    p.set_defaults(func=run)


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
    g.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="N",
        help="speculative decoding by prompt lookup: draft up to N tokens per step from earlier text "
        "that matches the last tokens, verified in one pass (the same greedy text; fastest when the "
        "continuation quotes the prompt; in-place bundles; 0 = off)",
    )
    g.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID:BIAS",
        help="add BIAS (-100..100) to token ID's logit before anything else, as OpenAI's logit_bias: "
        "-100 bans the token, +100 forces it (the +100 tokens are then the only candidates); "
        "repeatable, or one JSON object '{\"50256\": -100}'",
    )
    s = p.add_argument_group(
        "structured output (one of these; needs the structured extra: pip install 'gpt2-edge[structured]')"
    )
    s.add_argument(
        "--json-schema",
        metavar="FILE_OR_JSON",
        help="the output is JSON matching this JSON schema (a file, or the schema itself)",
    )
    s.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    s.add_argument("--regex", help="the output matches this regular expression (Rust regex syntax)")
    s.add_argument(
        "--choice",
        action="append",
        metavar="TEXT",
        help="the output is one of these strings (repeat, or a comma-separated list)",
    )
    s.add_argument(
        "--grammar",
        metavar="FILE",
        help="the output follows this grammar file (Lark, or llama.cpp's GBNF); the text ends with "
        "finish reason 'stop' once the constraint is complete",
    )
    g.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    g.add_argument("--json", action="store_true", help="print results as JSON")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The ``GenerationConfig`` the generation flags ask for (it validates itself)."""
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
        stop=tuple(utf8(s, "--stop") for s in args.stop),
        truncate=args.truncate,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        early_stopping={"true": True, "false": False, "never": "never"}[args.early_stopping],
        prompt_lookup=args.prompt_lookup,
        logit_bias=_logit_bias(args.logit_bias),
        constraint=constraint_of(args),
    )


def _logit_bias(values: Sequence[str]) -> tuple[tuple[object, object], ...]:
    """``--logit-bias ID:BIAS`` flags (or one JSON object) as pairs; GenerationConfig checks them."""
    pairs: list[tuple[object, object]] = []
    for v in values:
        if v.lstrip().startswith("{"):
            try:
                obj = json.loads(v)
            except json.JSONDecodeError as e:
                raise Gpt2EdgeError(f"--logit-bias {v!r} is not a JSON object ({e})") from None
            if not isinstance(obj, dict):
                raise Gpt2EdgeError(f"--logit-bias {v!r} is not a JSON object")
            pairs += list(obj.items())
            continue
        token, sep, bias = v.partition(":")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(token), float(bias)))
        except ValueError:
            raise Gpt2EdgeError(f"--logit-bias takes ID:BIAS (e.g. 50256:-100), got {v!r}") from None
    return tuple(pairs)


def constraint_of(args: argparse.Namespace) -> Constraint | None:
    """The structured-output flag given (at most one), as a ``Constraint``, checked to compile
    (without loading a model: llguidance alone)."""
    given = [
        name
        for name, value in (
            ("--json-schema", args.json_schema),
            ("--json-object", args.json_object),
            ("--regex", args.regex),
            ("--choice", args.choice),
            ("--grammar", args.grammar),
        )
        if value
    ]
    if len(given) > 1:
        raise Gpt2EdgeError(f"{given[0]} and {given[1]} both constrain the output: give one")
    if not given:
        return None
    if args.json_schema:
        text = args.json_schema
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text(encoding="utf-8")  # OSError: one line, exit 2
        try:
            c = Constraint.json_schema(text)
        except ConstraintError as e:
            raise ConstraintError(f"--json-schema: {e}") from None
    elif args.json_object:
        c = Constraint.json_object()
    elif args.regex:
        c = Constraint.regex(args.regex)
    elif args.choice:
        c = Constraint.choice([o.strip() for v in args.choice for o in v.split(",") if o.strip()])
    else:
        c = Constraint.grammar(Path(args.grammar).read_text(encoding="utf-8"))
    try:
        validate_constraint(c)
    except ConstraintError as e:
        raise ConstraintError(f"{given[0]}: {e}") from None
    return c


def run(args: argparse.Namespace) -> int:
    cfg = generation_config(args)
    prompts = read_prompts(args)
    backend = args.backend
    if backend == "auto":
        backend = "onnx" if is_bundle(args.model) else "torch"
    if backend == "onnx":
        if not is_bundle(args.model):
            raise Gpt2EdgeError(
                f"{args.model or 'the default model'} is not a bundle; make one with "
                "`gpt2-edge export MODEL -o DIR`, or use --backend torch"
            )
        adapter, lora = None, None
        if args.lora:
            name, directory = parse_spec(args.lora)
            adapter = name or Path(directory).resolve().name
            lora = {adapter: directory}
        gen = Generator.from_bundle(
            args.model,
            provider=args.provider,
            threads=args.threads,
            draft=args.draft,
            draft_tokens=args.draft_tokens,
            step_invariant=args.step_invariant,
            lora=lora,
        )
        if args.provider == "auto":
            print(f"provider: {gen.provider}", file=sys.stderr)
        if args.stream:
            if len(prompts) != 1 or args.json:
                raise Gpt2EdgeError("--stream takes exactly one prompt and no --json")
            for piece in gen.stream(prompts[0], cfg, adapter=adapter):
                print(piece, end="", flush=True)
            print()
            _print_timings([gen.last_result], gen.load_s, _speculative(cfg, gen))
            return 0
        results = gen.generate(prompts, cfg, adapter=adapter)
        load_s = gen.load_s
        speculative = _speculative(cfg, gen)
    else:
        if args.draft or args.lora:
            raise Gpt2EdgeError(f"{'--draft' if args.draft else '--lora'} needs the onnx backend (a bundle)")
        results, load_s = _generate_with_torch(args.model, prompts, cfg, args.threads)
        speculative = bool(cfg.prompt_lookup)
    _print_results(prompts, results, args.json, load_s, speculative)
    return 0


def _speculative(cfg: GenerationConfig, gen: Generator) -> bool:
    """Whether speculative decoding was asked for (it runs where the KV cache can roll back)."""
    return cfg.num_beams == 1 and bool(cfg.prompt_lookup or gen.draft is not None)


def _generate_with_torch(
    model_spec: str | None, prompts: list[str], cfg: GenerationConfig, threads: int | None
) -> tuple[list[GenerationResult], float]:
    """The PyTorch reference on a checkpoint: its results and load time."""
    import torch

    from ..model.checkpoint import load_checkpoint, load_tokenizer  # imports torch
    from ..model.generate import generate  # imports torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = load_checkpoint(model_spec), load_tokenizer(model_spec)
    load_s = time.perf_counter() - t0
    return generate(model, tok, prompts, cfg), load_s


def _print_results(
    prompts: list[str], results: list[GenerationResult], as_json: bool, load_s: float, speculative: bool
) -> None:
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
    _print_timings(results, load_s, speculative)


def _print_timings(results: Sequence[GenerationResult], load_s: float, speculative: bool = False) -> None:
    """llama.cpp-style summary on stderr: load, prompt (time to first token), per-step decode; with
    speculative decoding, per token, and the passes and drafted/accepted tokens."""
    t = results[0].timings
    n = sum(len(r.token_ids) for r in results)
    ms = t["ms_per_token"]
    spec = ""
    if "spec_passes" in t:
        rate = f" ({1000 / ms:.1f} tokens/s)" if ms else ""
        unit = "token"
        spec = (
            f" | speculative: {t['spec_passes']:.0f} passes, {t['spec_accepted']:.0f} of "
            f"{t['spec_drafted']:.0f} drafted tokens accepted ({100 * t['spec_acceptance']:.0f}%)"
        )
    else:
        rate = f" ({1000 / ms:.1f} steps/s)" if ms else ""
        unit = "step"
        if speculative:
            spec = " | speculative: off (this KV cache cannot roll back: plain steps)"
    print(
        f"\nload {1000 * load_s:.0f} ms | time to first token {1000 * t['prefill_s']:.1f} ms "
        f"({max(r.prompt_tokens for r in results)} prompt tokens x {len(results)}) | "
        f"{n} new tokens, {ms:.2f} ms per {unit}{rate}{spec}",
        file=sys.stderr,
    )
