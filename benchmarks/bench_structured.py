"""Structured output's cost: per-token decode time with a JSON-schema constraint vs unconstrained,
at batch 1 and 8, fp32 and int4; and the time to compile a typical schema.

Subjects, per (precision, batch), in strict turns (benchmarks/harness.py), one process:

- ``free``: unconstrained greedy decoding of ``--new-tokens`` tokens per row (ignore_eos).
- ``json``: the same prompts under a JSON schema whose output cannot end within ``--new-tokens``
  (an array of at least 50 records), so every row decodes as many steps as ``free``; masks
  computed in a worker thread while the model runs (``iter_decode``'s default).
- ``json-inline``: the same, masks computed after the model's step (``mask_ahead=False``): whether
  the overlap pays on this machine.

A turn decodes every prompt of the batch once; its figure is decode milliseconds per step (prefill
excluded). The table gives each side's median and the per-round ratio to ``free`` (median, range,
both orders combined). The compile table: a cold compile of the schema (a new tokenizer object, so
llguidance's tokenizer is built too, and without it) and a cached one.

    python -m benchmarks.bench_structured [--model 124m|shipped] [--precisions fp32,int4]
        [--batches 1,8] [--rounds 5] [--new-tokens 64] [--threads 2] [--json PATH]

``--model shipped`` (the shipped 4-layer model; a quick check that the benchmark runs) is the small
mode. The 124M shape (random weights, GPT-2's 50,257-token BPE: benchmarks/common.py) is the
measurement. llama-server's ``json_schema`` is not compared: llama.cpp is not installed here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import CACHE, bundle_of, random_checkpoint, variant_of
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import summary

# A typical extraction schema (a list of records), sized so no row can finish early.
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "active"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "items": RECORD, "minItems": 50}},
    "required": ["records"],
    "additionalProperties": False,
}


def shipped_bundle() -> Path:
    from gpt2_edge import DEFAULT_MODEL_DIR

    out = CACHE / "default-model-ort-inplace-bundle"
    if not (out / "bundle.json").is_file():
        from gpt2_edge.export.bundle import export_bundle

        export_bundle(DEFAULT_MODEL_DIR, out, target="ort", overwrite=True)
    return out


def bundle_for(model: str, precision: str) -> Path:
    base = shipped_bundle() if model == "shipped" else bundle_of(random_checkpoint("gpt2"))
    return base if precision == "fp32" else variant_of(base, precision)


def run(gen, prompts: list[list[int]], config, mask_ahead: bool = True) -> float:
    """Decode milliseconds per step of one batch."""
    from gpt2_edge.runtime.generator import decode

    results = decode(
        gen.backend,
        prompts,
        config,
        eos_token_id=gen.eos_token_id,
        n_ctx=gen.n_ctx,
        detokenize=gen.tokenizer.decode,
        constraint=gen.compile(config),
        mask_ahead=mask_ahead,
    )
    return results[0].timings["ms_per_token"]


def bench(model: str, precision: str, batch: int, args: argparse.Namespace) -> dict:
    from gpt2_edge import GenerationConfig, Generator
    from gpt2_edge.runtime.constraints import Constraint

    gen = Generator.from_bundle(str(bundle_for(model, precision)), threads=args.threads)
    words = gen.tokenizer.encode("Extract the people mentioned in this text as JSON records: ")
    prompts = [words + gen.tokenizer.encode(f"item {i}") for i in range(batch)]
    free = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    json_cfg = GenerationConfig(max_new_tokens=args.new_tokens, constraint=Constraint.json_schema(SCHEMA))
    run(gen, prompts, free)  # warm-up; compiles the schema once
    run(gen, prompts, json_cfg)
    runs = interleave(
        {
            "free": lambda _r: run(gen, prompts, free),
            "json": lambda _r: run(gen, prompts, json_cfg),
            "json-inline": lambda _r: run(gen, prompts, json_cfg, mask_ahead=False),
        },
        args.rounds,
        warmup=0,
    )
    row = dict(model=model, precision=precision, batch=batch, free=summary(runs.values("free"))[0])
    for side in ("json", "json-inline"):
        r = runs.ratio(side, "free")
        row[side] = summary(runs.values(side))[0]
        row[f"{side}-ratio"] = r["median"]
        row[f"{side}-range"] = f"{r['lo']:.3f}-{r['hi']:.3f}"
        row[f"{side}-combined"] = r["combined"]
    print(f"{model} {precision} batch {batch}: json / free {row['json-ratio']:.3f}", flush=True)
    return row


def compile_times(model: str, rounds: int) -> dict:
    """Cold (a fresh tokenizer: llguidance's tokenizer built too), schema-only and cached compiles."""
    from gpt2_edge.runtime.constraints import Constraint, compile_constraint
    from gpt2_edge.runtime.tokenizer import Tokenizer

    path = bundle_for(model, "fp32") / "tokenizer.json"
    cold, schema_only, cached = [], [], []
    for i in range(rounds):
        tok = Tokenizer.from_file(path)
        c = Constraint.json_schema({**SCHEMA, "description": f"round {i}"})
        t0 = time.perf_counter()
        compile_constraint(tok, c)
        cold.append(time.perf_counter() - t0)
        c2 = Constraint.json_schema({**SCHEMA, "description": f"round {i} again"})
        t0 = time.perf_counter()
        compile_constraint(tok, c2)
        schema_only.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        compile_constraint(tok, c2)
        cached.append(time.perf_counter() - t0)
    ms = lambda xs: 1000 * summary(xs)[0]  # noqa: E731
    return dict(model=model, cold=ms(cold), schema=ms(schema_only), cached=ms(cached))


COLUMNS = [
    Column("model", "model"),
    Column("precision", "precision"),
    Column("batch", "batch"),
    Column("free", "free ms/step", ".2f"),
    Column("json", "json ms/step", ".2f"),
    Column("json-ratio", "json / free (median)", ".3f"),
    Column("json-range", "range"),
    Column("json-combined", "both orders", ".3f"),
    Column("json-inline", "json, masks after the step, ms/step", ".2f"),
    Column("json-inline-ratio", "inline / free", ".3f"),
]
COMPILE_COLUMNS = [
    Column("model", "model"),
    Column("cold", "first compile, new tokenizer (ms)", ".1f"),
    Column("schema", "new schema, known tokenizer (ms)", ".2f"),
    Column("cached", "same schema again (ms)", ".3f"),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="124m", choices=["124m", "shipped"])
    ap.add_argument("--precisions", default="fp32,int4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    add_json_argument(ap)
    args = ap.parse_args(argv)
    report = Report("bench_structured", "JSON-schema constrained decoding vs unconstrained", argv, vars(args))
    rows = [
        bench(args.model, p.strip(), int(b), args)
        for p in args.precisions.split(",")
        for b in args.batches.split(",")
    ]
    report.table(
        f"per-step decode time, {args.new_tokens} tokens, {args.threads} threads, {args.rounds} rounds",
        COLUMNS,
        rows,
    )
    report.table(
        "compiling the schema (median of rounds)", COMPILE_COLUMNS, [compile_times(args.model, args.rounds)]
    )
    report.note("llama-server's json_schema: not compared (llama.cpp is not installed on this machine).")
    report.emit(args.json)


if __name__ == "__main__":
    main()
