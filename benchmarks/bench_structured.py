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
measurement.

llama-server's ``json_schema`` on the same weights (``--llama-server PATH`` or ``$LLAMA_SERVER``; the
checkpoint converted by llama.cpp's own converter, f32 for fp32 and q4_0 for int4:
``peer_llama.gguf``), the same prompt token ids, greedy (``top_k`` 1), the same schema and token
count, batch 1 (one slot) and 8 (8 slots, 8 concurrent requests), 2 threads, no prompt cache: its
own ``timings.predicted_per_token_ms`` per request (median over the batch), free and with
``json_schema`` in strict turns, and its compile cost as the extra wall time of a one-token request
with a new schema over one without. Skipped, with the reason, where llama-server is not found.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
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


class LlamaServer:
    """llama-server on loopback for one (model, slots) pair; stopped by ``close``."""

    def __init__(self, binary: str, gguf: Path, slots: int, threads: int, n_ctx: int) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
            "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(n_ctx * slots),
            "--no-webui", "-fa", "off",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.proc.stderr.read().decode()[-400:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.close()
        raise RuntimeError("llama-server did not become healthy in 120 s")

    def complete(self, body: dict) -> dict:
        req = urllib.request.Request(
            self.url + "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def llama_server_binary(args: argparse.Namespace) -> str | None:
    found = args.llama_server or os.environ.get("LLAMA_SERVER")
    return found if found and Path(found).is_file() else None


def bench_llama(binary: str, precision: str, batch: int, args: argparse.Namespace) -> dict:
    """llama-server's per-token time with and without ``json_schema``, as ``bench`` for the kit."""
    from benchmarks.peer_llama import gguf
    from gpt2_edge.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_file(bundle_for("124m", "fp32") / "tokenizer.json")
    words = tok.encode("Extract the people mentioned in this text as JSON records: ")
    prompts = [words + tok.encode(f"item {i}") for i in range(batch)]
    model = gguf({"fp32": "f32", "int4": "q4_0"}[precision])
    server = LlamaServer(binary, model, batch, args.threads, 256)
    pool = ThreadPoolExecutor(batch)
    base = dict(n_predict=args.new_tokens, top_k=1, temperature=0, cache_prompt=False, samplers=["top_k"])

    def turn(schema: dict | None) -> float:
        bodies = [{**base, "prompt": p, "ignore_eos": schema is None} for p in prompts]
        if schema is not None:
            bodies = [{**b, "json_schema": schema} for b in bodies]
        outs = list(pool.map(server.complete, bodies))
        for o in outs:
            if o["timings"]["predicted_n"] != args.new_tokens:
                n = o["timings"]["predicted_n"]
                raise RuntimeError(f"llama-server decoded {n} tokens, not {args.new_tokens}")
        return summary([o["timings"]["predicted_per_token_ms"] for o in outs])[0]

    def first_token(schema: dict | None) -> float:
        body = {**base, "prompt": prompts[0], "n_predict": 1}
        t0 = time.perf_counter()
        server.complete(body if schema is None else {**body, "json_schema": schema})
        return time.perf_counter() - t0

    try:
        turn(None)
        turn(SCHEMA)
        sides = {"free": lambda _r: turn(None), "json": lambda _r: turn(SCHEMA)}
        runs = interleave(sides, args.rounds, warmup=0)
        compile_ms = []
        for i in range(args.rounds):
            plain = first_token(None)
            fresh = first_token({**SCHEMA, "description": f"round {i}"})
            compile_ms.append(1000 * (fresh - plain))
    finally:
        pool.shutdown()
        server.close()
    r = runs.ratio("json", "free")
    row = dict(
        model="124m", precision=precision, batch=batch, engine=f"llama-server {model.stem.split('-')[-1]}",
        free=summary(runs.values("free"))[0], json=summary(runs.values("json"))[0],
        **{"json-ratio": r["median"], "json-range": f"{r['lo']:.3f}-{r['hi']:.3f}"},
        compile=summary(compile_ms)[0],
    )  # fmt: skip
    print(f"llama-server {precision} batch {batch}: json / free {row['json-ratio']:.3f}", flush=True)
    return row


LLAMA_COLUMNS = [
    Column("engine", "engine"),
    Column("precision", "class"),
    Column("batch", "batch"),
    Column("free", "free ms/token", ".2f"),
    Column("json", "json_schema ms/token", ".2f"),
    Column("json-ratio", "json / free (median)", ".3f"),
    Column("json-range", "range"),
    Column("compile", "one-token request, new schema - none (ms)", ".1f"),
]

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
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: $LLAMA_SERVER)")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama-server comparison")
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
    binary = None if args.no_llama or args.model != "124m" else llama_server_binary(args)
    if binary is None:
        why = "--no-llama" if args.no_llama else "the shipped model" if args.model != "124m" else (
            "no llama-server binary (--llama-server PATH or $LLAMA_SERVER)"
        )
        report.note(f"llama-server's json_schema: not compared ({why}).")
    else:
        llama_rows = [
            bench_llama(binary, p.strip(), int(b), args)
            for p in args.precisions.split(",")
            for b in args.batches.split(",")
        ]
        report.table(
            f"llama-server's json_schema on the same weights, {args.new_tokens} tokens, "
            f"{args.threads} threads, {args.rounds} rounds "
            "(its timings.predicted_per_token_ms, median over the batch)",
            LLAMA_COLUMNS,
            llama_rows,
        )
    report.emit(args.json)


if __name__ == "__main__":
    main()
