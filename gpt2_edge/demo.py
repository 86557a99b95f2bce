"""The demo: the whole chain on one checkpoint (the shipped default model unless told otherwise).

1. load the checkpoint and continue a prompt with the PyTorch reference; 2. export an fp32
bundle, 3. which the export validates against PyTorch; 4. quantize it to ``DEMO_PRECISIONS``
behind the accuracy gate; 5. generate from every bundle written with the torch-free runtime,
timed; 6. the numbers side by side. ``run_demo`` does the work and hands each long stage's
result to ``on_step`` as it finishes; the printing is ``gpt2-edge demo``'s (``cli/demo.py``).

Imports torch and onnx.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import DEFAULT_MODEL_DIR
from .errors import Gpt2EdgeError
from .export.bundle import export_bundle
from .fsutil import check_output
from .model.checkpoint import load_checkpoint, load_tokenizer, resolve_model_dir
from .model.config import GPTConfig
from .model.generate import generate
from .quantize.accuracy import AccuracyReport
from .quantize.pipeline import GateError, quantize_bundle
from .runtime.bundle import MANIFEST, Bundle
from .runtime.generator import Generator
from .runtime.sampling import GenerationConfig
from .runtime.types import GenerationResult

DEMO_PRECISIONS = ("int8-dynamic", "int4")  # the variants that run well on ONNX Runtime's CPU provider
# The first run of a session allocates; the median of three is steadier than one run.
TIMED_RUNS = 3


@dataclass(frozen=True)
class DemoPlan:
    """What the demo reads and writes, checked before any work."""

    source: Path  # the checkpoint directory
    text: Path  # held-out text of the accuracy gate
    outputs: dict[str, Path]  # precision -> bundle directory, fp32 first
    shipped_model: bool
    shipped_text: bool


@dataclass
class Reference:
    """Stage 1: the checkpoint and its greedy continuation of the prompt with PyTorch."""

    config: GPTConfig
    parameters: int
    load_s: float
    result: GenerationResult


@dataclass
class Exported:
    """Stages 2 and 3: the fp32 bundle, the export's log, and its parity check against PyTorch."""

    bundle: Path
    log: list[str]
    validation: dict[str, Any]  # the manifest's "validation" (export/validate.py's ParityReport)


@dataclass
class Variant:
    """Stage 4: one precision through the accuracy gate."""

    precision: str
    report: AccuracyReport
    bundle: Path | None  # None: it missed its gate and was not written


@dataclass
class Run:
    """Stage 5: greedy generation from one bundle with the torch-free runtime."""

    result: GenerationResult
    ttft_s: float  # median time to first token
    tokens_per_s: float  # median decode rate
    mib: float  # size of the bundle's files
    # Against the baseline: PyTorch's tokens for fp32, fp32's for a variant.
    first_difference: int | None  # the first token that differs (over the common length), or None
    rest: str  # the text from that token on ("" when none differs)


@dataclass
class DemoReport:
    plan: DemoPlan
    reference: Reference
    exported: Exported
    variants: dict[str, Variant]  # precision -> its gate, every precision tried
    runs: dict[str, Run]  # precision -> its generation, every bundle written ("fp32" first)
    seconds: float

    @property
    def perplexity_fp32(self) -> float:
        return next(iter(self.variants.values())).report.perplexity_fp32 if self.variants else math.nan


Step = Reference | Exported | Variant


def plan_demo(
    model: str | None = None, text: str | Path | None = None, output: str | Path = "out/demo"
) -> DemoPlan:
    """Resolve the checkpoint (None: the shipped model) and the held-out text (None: the shipped
    model's sample; another model needs its own), and refuse any output that would overwrite a
    source: the demo replaces only bundles it wrote."""
    source = resolve_model_dir(model)
    if text is None and model is not None:
        raise Gpt2EdgeError("--model needs --text: held-out text for the accuracy gate")
    text_path = Path(text) if text is not None else DEFAULT_MODEL_DIR / "heldout.txt"
    outputs = {p: Path(output) / p for p in ("fp32", *DEMO_PRECISIONS)}
    for out in outputs.values():
        check_output(out, [source, text_path], overwrite=True, marker=MANIFEST, what="bundle")
    return DemoPlan(source, text_path, outputs, shipped_model=model is None, shipped_text=text is None)


def run_demo(
    plan: DemoPlan,
    prompt: str = "ROMEO:",
    max_new_tokens: int = 40,
    threads: int = 2,
    progress: bool = False,
    on_step: Callable[[Step], object] = lambda _: None,
) -> DemoReport:
    """Run the chain of ``plan`` (stages 1-5 above); ``on_step`` gets stages 1, 2-3 and each
    precision of 4 as they finish. Greedy throughout, so the texts can be compared token by token."""
    t_start = time.perf_counter()
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)

    t0 = time.perf_counter()
    model, tok = load_checkpoint(plan.source), load_tokenizer(plan.source)
    load_s = time.perf_counter() - t0
    reference = Reference(model.config, model.num_parameters(), load_s, generate(model, tok, prompt, cfg)[0])
    on_step(reference)

    log: list[str] = []
    bundle = export_bundle(
        plan.source, plan.outputs["fp32"], target="ort", overwrite=True, log=log.append, progress=progress
    )
    exported = Exported(bundle, log, Bundle.load(bundle, verify=False).manifest.validation)
    on_step(exported)

    variants: dict[str, Variant] = {}
    written = {"fp32": bundle}
    for precision in DEMO_PRECISIONS:
        try:
            out, rep = quantize_bundle(
                bundle,
                precision,
                plan.outputs[precision],
                eval_text=plan.text,
                overwrite=True,
                threads=threads,
                progress=progress,
                log=lambda _: None,
            )
            written[precision] = out
        except GateError as e:
            out, rep = None, e.report
        variants[precision] = Variant(precision, rep, out)
        on_step(variants[precision])

    runs: dict[str, Run] = {}
    for precision, path in written.items():
        ttft, rate, result = time_generation(path, prompt, cfg, threads)
        base = reference.result if precision == "fp32" else runs["fp32"].result
        first = _first_difference(result.token_ids, base.token_ids)
        rest = tok.decode(result.token_ids[first:]) if first is not None else ""
        runs[precision] = Run(result, ttft, rate, _mib(path), first, rest)
    return DemoReport(plan, reference, exported, variants, runs, time.perf_counter() - t_start)


def time_generation(
    path: str | Path, prompt: str, cfg: GenerationConfig, threads: int
) -> tuple[float, float, GenerationResult]:
    """Median time to first token (s) and decode rate (tokens/s) of ``TIMED_RUNS`` runs of a
    bundle, and the last run's result."""
    gen = Generator.from_bundle(str(path), threads=threads)
    runs = [gen.generate(prompt, cfg)[0] for _ in range(TIMED_RUNS)]
    ttft = statistics.median(r.timings["prefill_s"] for r in runs)
    ms = statistics.median(r.timings["ms_per_token"] for r in runs)
    return ttft, 1000 / ms if ms else math.nan, runs[-1]


def _first_difference(ids: Sequence[int], base: Sequence[int]) -> int | None:
    """The first position where ``ids`` and ``base`` differ, over their common length."""
    return next((i for i, (a, b) in enumerate(zip(ids, base, strict=False)) if a != b), None)


def _mib(bundle: Path) -> float:
    files = Bundle.load(bundle, verify=False).manifest.files.values()
    return sum(f.bytes for f in files) / 2**20
