"""``gpt2-edge demo``: the whole chain on the shipped model, printed stage by stage. The work is
``gpt2_edge/demo.py``; this module prints what it reports."""

from __future__ import annotations

import argparse
from functools import partial
from typing import TYPE_CHECKING

from .. import DEFAULT_MODEL_DIR

if TYPE_CHECKING:
    from ..demo import DemoPlan, DemoReport, Step

COLUMNS = [("precision", 14), ("size MiB", 9), ("perplexity", 12), ("Δ ppl", 9), ("top-1", 9)]
COLUMNS += [("first token", 13), ("tokens/s", 10)]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo``."""
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import plan_demo, run_demo  # imports torch and onnx

    plan = plan_demo(args.model, args.text, args.output)  # refuses before any work
    report = run_demo(
        plan,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        progress=not args.quiet,
        on_step=partial(_print_step, plan, args.prompt),
    )
    print(
        f"\n5. generate with the torch-free runtime (onnxruntime, CPU, {args.threads} threads), greedy, "
        f"{args.max_new_tokens} new tokens"
    )
    _print_agreement(report)
    print(
        f"\n6. summary (CPU, {args.threads} threads; perplexity on the held-out text, "
        "top-1 agreement with fp32)"
    )
    _print_table(report)
    print(f"\ndone in {report.seconds:.0f} s; bundles in {args.output}/")
    return 0


def _print_step(plan: DemoPlan, prompt: str, step: Step) -> None:
    """Stages 1 to 4, each as it finishes (with the heading of the stage that follows)."""
    from ..demo import Exported, Reference  # imports torch and onnx (already loaded by run_demo)

    if isinstance(step, Reference):
        c = step.config
        name = f"default model ({DEFAULT_MODEL_DIR.name}/)" if plan.shipped_model else f"model {plan.source}"
        print(
            f"1. {name}: {step.parameters / 1e6:.2f} M parameters, {c.n_layer} layers x {c.n_embd}, "
            f"{c.n_head} heads, vocab {c.vocab_size}, context {c.n_positions} "
            f"(loaded in {1000 * step.load_s:.0f} ms)"
        )
        print(f"   PyTorch reference, greedy:\n{_indent(prompt + step.result.text)}")
        print(f"\n2. export to ONNX (ort target, in-place KV cache) -> {plan.outputs['fp32']}")
    elif isinstance(step, Exported):
        for line in step.log:
            if not line.startswith("parity"):
                print("   " + line)
        v = step.validation
        print(
            f"\n3. validate: ONNX Runtime vs PyTorch, max |Δlogits| {v['max_abs_logits']:.1e}, top-1 "
            f"{100 * v['top1_agreement']:.1f}%, greedy identical: {v['greedy_identical']} "
            f"({v['positions_compared']} positions, {v['decode_steps']} decode steps): "
            f"{'PASS' if v['passed'] else 'FAIL'}"
        )
        shown = (
            f"{DEFAULT_MODEL_DIR.name}/{plan.text.name}, shipped with the model"
            if plan.shipped_text
            else plan.text
        )
        print(f"\n4. quantize behind the accuracy gate (held-out text: {shown})")
    else:
        rep = step.report
        print(
            f"   {step.precision:<13} perplexity {rep.perplexity:.2f} vs fp32 {rep.perplexity_fp32:.2f} "
            f"({100 * rep.ppl_increase:+.2f}%, gate +{100 * rep.gate:.0f}%): "
            + (f"written to {step.bundle}" if step.bundle else "misses its gate, not written")
        )


def _print_agreement(report: DemoReport) -> None:
    """Stage 5: where each bundle's greedy tokens leave fp32's (fp32's: PyTorch's)."""
    fp32 = report.runs["fp32"].result.token_ids
    same = "identical to" if fp32 == report.reference.result.token_ids else "DIFFERENT from"
    print(f"   fp32: tokens {same} the PyTorch reference")
    for precision, r in report.runs.items():
        if precision == "fp32":
            continue
        if r.first_difference is None:
            print(f"   {precision}: the same tokens as fp32")
        else:
            rest = repr(r.rest if len(r.rest) <= 48 else r.rest[:45] + "...")
            n = len(r.result.token_ids)
            print(f"   {precision}: the fp32 tokens for {r.first_difference} of {n}, then {rest}")


def _print_table(report: DemoReport) -> None:
    """Stage 6: one row per precision: bundle size, perplexity and its change, top-1, speed."""
    _print_row([title for title, _ in COLUMNS])
    for precision in report.plan.outputs:
        variant, r = report.variants.get(precision), report.runs.get(precision)
        rep = variant.report if variant else None
        _print_row(
            [
                precision,
                f"{r.mib:.2f}" if r else "-",
                f"{rep.perplexity if rep else report.perplexity_fp32:.2f}",
                f"{100 * rep.ppl_increase:+.2f}%" if rep else "-",
                f"{100 * rep.top1_agreement:.2f}%" if rep else "100%",
                f"{1000 * r.ttft_s:.2f} ms" if r else "not written",
                f"{r.tokens_per_s:.0f}" if r else "-",
            ]
        )


def _print_row(cells: list[str]) -> None:
    """The first column left-aligned, the numbers right-aligned."""
    row = (
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
        for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True))
    )
    print("   " + "".join(row))


def _indent(text: str, prefix: str = "   | ") -> str:
    return "\n".join(prefix + line for line in text.splitlines() or [""])
