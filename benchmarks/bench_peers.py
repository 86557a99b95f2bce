"""gpt2-edge against its peers on the same machine, same token ids, interleaved rounds.

Peers (optional, ``pip install -r benchmarks/requirements-peers.txt``; each one missing is
skipped with the reason): llama.cpp through llama-cpp-python (built from its sdist; the model is
converted with llama.cpp's own ``convert_hf_to_gguf.py`` and quantized with its own quantizer),
CTranslate2 (its Transformers converter), ONNX Runtime's GPT-2 tool
(``onnxruntime.transformers.models.gpt2.convert_to_onnx``, the stacked-past graph, its own
optimizer and quantizer) and Hugging Face Optimum (``ORTModelForCausalLM``).

The model: random GPT-2 124M-shaped weights (speed does not depend on the values) with the real
GPT-2 tokenizer. Workloads, greedy, eos never ends a run:
  b1    batch 1, 32-token prompt, 64 new tokens: decode tokens/s, time to first token
  b8    batch 8 x 32-token prompts, 64 new tokens: decode tokens/s summed over the batch
  long  batch 1, 896-token prompt, 64 new tokens: decode tokens/s, time to first token
  rss   peak RSS of the process after the b1 run
Each engine runs in its own subprocess per turn; the engines take strict turns round by round
(benchmarks/harness.py); the table shows medians of each engine's runs and the median over rounds
of the per-round ratio ours / peer. An engine whose worker fails is skipped from then on, with the
reason.

    python -m benchmarks.bench_peers [--rounds 3] [--threads 2] [--only llama,ct2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, bundle_of, random_checkpoint, variant_of
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import peak_rss_mib, ratio_summary, summary

HERE = Path(__file__).resolve().parent

NEW = 64
SHORT, LONG, BATCH = 32, 896, 8

# engine -> (family, class). Classes compare like with like: fp32, int8, int4.
ENGINES: dict[str, tuple[str, str]] = {
    "gpt2-edge fp32": ("ours", "fp32"),
    "gpt2-edge int8": ("ours", "int8"),
    "gpt2-edge int4": ("ours", "int4"),
    "llama.cpp f32": ("llama", "fp32"),
    "llama.cpp q8_0": ("llama", "int8"),
    "llama.cpp q4_0": ("llama", "int4"),
    "ctranslate2 float32": ("ct2", "fp32"),
    "ctranslate2 int8": ("ct2", "int8"),
    "ort-gpt2-tool fp32": ("ortgpt2", "fp32"),
    "ort-gpt2-tool int8": ("ortgpt2", "int8"),
    "optimum fp32": ("optimum", "fp32"),
}


# -------------------------------------------------------------------------------------------
# A runner: prefill + greedy decode of a batch of equal-length prompts, timed.
# Returns (time to first token s, decode seconds for the remaining NEW-1 tokens).
# -------------------------------------------------------------------------------------------
Runner = Callable[[list[list[int]], int], tuple[float, float]]


def ours(engine: str, threads: int) -> Runner:
    """The kit as an app calls it: ``Generator.generate`` with token ids (``ignore_eos``)."""
    from gpt2_edge import GenerationConfig, Generator

    base = bundle_of(random_checkpoint("gpt2"))
    path = {"fp32": base, "int8": variant_of(base, "int8-dynamic"), "int4": variant_of(base, "int4")}[
        ENGINES[engine][1]
    ]
    gen = Generator.from_bundle(str(path), threads=threads, verify=False)

    def run(prompts: list[list[int]], new: int) -> tuple[float, float]:
        t = gen.generate(prompts, GenerationConfig(max_new_tokens=new, ignore_eos=True))
        return t[0].timings["prefill_s"], t[0].timings["decode_s"]

    return run


def _gguf(kind: str) -> Path:
    """The checkpoint in GGUF: f32 by llama.cpp's converter, q8_0 / q4_0 by its quantizer."""
    import llama_cpp

    ckpt = random_checkpoint("gpt2")
    f32 = CACHE / "llama" / "model-f32.gguf"
    if not f32.is_file():
        script = _llama_source() / "convert_hf_to_gguf.py"
        f32.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(_llama_source() / "gguf-py")}
        subprocess.run(
            [sys.executable, str(script), str(ckpt), "--outtype", "f32", "--outfile", str(f32)],
            check=True,
            env=env,
            capture_output=True,
        )
    if kind == "f32":
        return f32
    out = f32.with_name(f"model-{kind}.gguf")
    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[
            kind
        ]
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize returned {rc}")
    return out


def _llama_source() -> Path:
    """llama.cpp's sources (converter, gguf-py) from the llama-cpp-python sdist, unpacked in the cache."""
    src = CACHE / "llama-src"
    found = list(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[0]
    src.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(src),
            "llama-cpp-python",
        ],
        check=True,
        capture_output=True,
    )
    (tarball,) = src.glob("llama_cpp_python-*.tar.gz")
    shutil.unpack_archive(tarball, src)
    return next(src.glob("llama_cpp_python-*/vendor/llama.cpp"))


def llama(engine: str, threads: int) -> Runner:
    """llama.cpp through its C API (llama-cpp-python's ctypes bindings): a one-sequence context,
    and for batches a context with a slot per sequence in one KV cache; f16 KV (llama.cpp's
    default); logits read in place."""
    import ctypes

    import llama_cpp as L

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(_gguf(engine.split()[-1])).encode(), mparams)
    contexts: dict[int, object] = {}

    def context(n_seq: int) -> object:
        """One sequence: llama.cpp's usual single-user set-up; several: one unified KV cache."""
        if n_seq not in contexts:
            cparams = L.llama_context_default_params()
            cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 1024, 1024, 512
            cparams.n_seq_max, cparams.kv_unified = n_seq, n_seq > 1
            cparams.n_threads = cparams.n_threads_batch = threads
            # flash attention off: on this CPU it decodes at 896 tokens 1.3x faster off (63.5 vs
            # 46.5 tok/s, q8_0) than llama.cpp's default "auto"; each peer gets its best settings
            cparams.flash_attn_type = 0
            contexts[n_seq] = L.llama_init_from_model(model, cparams)
        return contexts[n_seq]

    ctx = None
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(1024, 0, BATCH)

    def submit(items: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        ptr = L.llama_get_logits_ith(ctx, i)
        return int(
            np.argmax(
                np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
            )
        )

    def run(prompts: list[list[int]], new: int) -> tuple[float, float]:
        nonlocal ctx
        ctx = context(len(prompts))
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        items = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        outs = [k for k, it in enumerate(items) if it[3]]
        submit(items)
        toks = [argmax(k) for k in outs]
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        n = len(prompts[0])
        for step in range(new - 1):
            submit([(t, n + step, s, True) for s, t in enumerate(toks)])
            toks = [argmax(k) for k in range(len(prompts))]
        return first, time.perf_counter() - t1

    return run


def ct2(engine: str, threads: int) -> Runner:
    import ctranslate2

    from gpt2_edge.runtime.tokenizer import Tokenizer

    ckpt = random_checkpoint("gpt2")
    out = CACHE / "ct2" / "model"
    if not (out / "model.bin").is_file():
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(ckpt)).convert(str(out), force=True)
    compute = engine.split()[-1]
    gen = ctranslate2.Generator(str(out), device="cpu", compute_type=compute, intra_threads=threads)
    tok = Tokenizer.from_dir(ckpt)._tok

    def run(prompts: list[list[int]], new: int) -> tuple[float, float]:
        batch = [[tok.id_to_token(i) for i in p] for p in prompts]
        kw = dict(sampling_topk=1, include_prompt_in_result=False, end_token=[])
        t0 = time.perf_counter()
        gen.generate_batch(batch, max_length=1, min_length=1, **kw)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen.generate_batch(batch, max_length=new, min_length=new, **kw)
        return first, time.perf_counter() - t0 - first

    return run


# The deprecated tool traces transformers' GPT-2 with TorchScript: it needs transformers < 4.45
# (newer ones build the causal mask with vmap, which its tracer cannot follow) and eager attention.
_ORT_TOOL = """
import functools, runpy, sys, transformers
for cls in (transformers.GPT2LMHeadModel, transformers.GPT2Model):
    f = cls.from_pretrained.__func__
    cls.from_pretrained = classmethod(functools.partial(
        lambda f, c, *a, **k: f(c, *a, **{**k, "attn_implementation": "eager"}), f))
sys.argv = ["convert_to_onnx"] + sys.argv[1:]
runpy.run_module("onnxruntime.transformers.models.gpt2.convert_to_onnx", run_name="__main__")
"""


def ortgpt2(engine: str, threads: int) -> Runner:
    import onnxruntime as ort

    ckpt = random_checkpoint("gpt2")
    precision = engine.split()[-1]
    out = CACHE / "ort-gpt2-tool" / precision
    model = out / "model.onnx"
    if not model.is_file():
        python = os.environ.get("ORT_GPT2_TOOL_PYTHON")
        if not python:
            raise RuntimeError(
                "set ORT_GPT2_TOOL_PYTHON to a Python with torch, onnxruntime and transformers<4.45 "
                "(see requirements-peers.txt)"
            )
        out.mkdir(parents=True, exist_ok=True)
        cmd = [
            python,
            "-c",
            _ORT_TOOL,
            "-m",
            str(ckpt),
            "--output",
            str(model),
            "-o",
            "-p",
            precision,
            "--overwrite",
            "--use_int64_inputs",
            "-t",
            "1",
            "-r",
            "1",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    past_names = [n for n in ins if n.startswith("past")]
    itype = np.int64 if ins["input_ids"].type == "tensor(int64)" else np.int32
    ftype = np.float16 if ins[past_names[0]].type == "tensor(float16)" else np.float32
    n_head, head = 12, 64

    def run(prompts: list[list[int]], new: int) -> tuple[float, float]:
        B, P = len(prompts), len(prompts[0])
        ids = np.array(prompts, itype)
        past = [np.zeros((2, B, n_head, 0, head), ftype) for _ in past_names]
        t0 = time.perf_counter()
        feeds = {
            "input_ids": ids,
            "position_ids": np.tile(np.arange(P, dtype=itype), (B, 1)),
            "attention_mask": np.ones(
                (B, P), ftype if ins["attention_mask"].type.endswith("float)") else itype
            ),
        }
        outs = sess.run(None, {**feeds, **dict(zip(past_names, past, strict=True))})
        nxt = outs[0][:, -1].argmax(-1)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        total = P
        for _ in range(new - 1):
            total += 1
            feeds = {
                "input_ids": nxt[:, None].astype(itype),
                "position_ids": np.full((B, 1), total - 1, itype),
                "attention_mask": np.ones((B, total), feeds["attention_mask"].dtype),
            }
            outs = sess.run(None, {**feeds, **dict(zip(past_names, outs[1:], strict=True))})
            nxt = outs[0][:, -1].argmax(-1)
        return first, time.perf_counter() - t1

    return run


def optimum(engine: str, threads: int) -> Runner:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    ckpt = random_checkpoint("gpt2")
    out = CACHE / "optimum" / "model"
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not (out / "model.onnx").is_file():
        ORTModelForCausalLM.from_pretrained(ckpt, export=True, use_cache=True).save_pretrained(out)
    model = ORTModelForCausalLM.from_pretrained(
        out, use_cache=True, session_options=so, provider="CPUExecutionProvider"
    )
    torch.set_num_threads(threads)

    def run(prompts: list[list[int]], new: int) -> tuple[float, float]:
        ids = torch.tensor(prompts)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        return first, time.perf_counter() - t0 - first

    return run


FAMILIES = {"ours": ours, "llama": llama, "ct2": ct2, "ortgpt2": ortgpt2, "optimum": optimum}


def worker(engine: str, threads: int, prompts: dict[str, list[list[int]]]) -> dict[str, float | None]:
    run = FAMILIES[ENGINES[engine][0]](engine, threads)
    run(prompts["short"], 4)  # warm-up
    res: dict[str, float | None] = {}
    first, dec = run(prompts["short"], NEW)
    res["ttft_short_ms"], res["b1"] = 1000 * first, (NEW - 1) / dec
    res["rss_b1_mib"] = peak_rss_mib()
    first, dec = run(prompts["long"], NEW)
    res["ttft_long_ms"], res["long"] = 1000 * first, (NEW - 1) / dec
    try:
        first, dec = run(prompts["batch"], NEW)
        res["b8"] = BATCH * (NEW - 1) / dec
    except NotImplementedError:
        res["b8"] = None
    return res


KEYS = ("b1", "b8", "long", "ttft_short_ms", "ttft_long_ms", "rss_b1_mib")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated families: ours,llama,ct2,ortgpt2,optimum")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    add_json_argument(ap)
    args = ap.parse_args(argv)
    if args.worker:
        prompts = json.loads(Path(args.prompts).read_text())
        print(json.dumps(worker(args.worker, args.threads, prompts)))
        return
    report = Report("bench_peers", "gpt2-edge against its peers", argv, vars(args))

    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(0, 50256, n).tolist()  # noqa: E731 - never eos
    prompts = {"short": [ids(SHORT)], "long": [ids(LONG)], "batch": [ids(SHORT) for _ in range(BATCH)]}
    CACHE.mkdir(parents=True, exist_ok=True)
    pfile = CACHE / "peer-prompts.json"
    pfile.write_text(json.dumps(prompts))
    families = set(args.only.split(",")) | {"ours"} if args.only else set(FAMILIES)
    engines = [e for e, (fam, _) in ENGINES.items() if fam in families]
    skipped: dict[str, str] = {}

    def subject(e: str):
        def turn(r: int) -> dict | None:
            if e in skipped:
                return None
            cmd = [sys.executable, "-m", "benchmarks.bench_peers", "--worker", e]
            cmd += ["--threads", str(args.threads), "--prompts", str(pfile)]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
            if p.returncode != 0:
                skipped[e] = (p.stderr.strip().splitlines() or ["failed"])[-1][:160]
                print(f"round {r + 1}: {e}: skipped ({skipped[e]})", file=sys.stderr)
                return None
            return json.loads(p.stdout.strip().splitlines()[-1])

        return turn

    runs = interleave(
        {e: subject(e) for e in engines},
        args.rounds,
        warmup=0,  # each worker warms up itself
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    report.raw["runs"] = runs.results
    report.raw["orders"] = runs.orders

    def figure(e: str, k: str) -> list:
        return [None if x is None else x[k] for x in runs.values(e)]

    rows = []
    for e in engines:
        if not any(runs.values(e)):
            continue
        row = {"engine": e, "class": ENGINES[e][1]}
        for k in KEYS:
            got = [v for v in figure(e, k) if v is not None]
            row[k] = summary(got) if got else None
        rows.append(row)
    spread = "median (min-max over rounds)"
    report.table(
        f"GPT-2 124M shape, random weights, {args.threads} threads, {args.rounds} rounds: {spread}",
        [
            Column("engine", "engine"),
            Column("class", "class"),
            Column("b1", "b1 tok/s", ".1f"),
            Column("b8", "b8 tok/s", ".1f"),
            Column("long", "@896 tok/s", ".1f"),
            Column("ttft_short_ms", "TTFT 32 ms", ".0f"),
            Column("ttft_long_ms", "TTFT 896 ms", ".0f"),
            Column("rss_b1_mib", "RSS b1 MiB", ".0f"),
        ],
        rows,
    )
    best_rows = []
    for cls in ("fp32", "int8", "int4"):
        mine = f"gpt2-edge {cls}"
        if mine not in engines or not any(runs.values(mine)):
            continue
        peers = [
            e for e in engines if ENGINES[e][1] == cls and ENGINES[e][0] != "ours" and any(runs.values(e))
        ]
        for k in KEYS:
            best = None
            for e in peers:
                pairs = [(a, b) for a, b in zip(figure(mine, k), figure(e, k), strict=True) if a and b]
                if not pairs:
                    continue
                r = ratio_summary([a for a, _ in pairs], [b for _, b in pairs])
                # the fastest peer: for decode rates the smallest ours/peer, for TTFT and RSS the largest
                lower_is_better = k.startswith(("ttft", "rss"))
                if best is None or (r[0] > best[1][0] if lower_is_better else r[0] < best[1][0]):
                    best = (e, r)
            if best is not None:
                best_rows.append({"class": cls, "figure": k, "peer": best[0], "ratio": best[1]})
    report.table(
        "ours / the fastest peer of the same class: median over rounds of the per-round ratio (decode: >1 = "
        "ours faster; TTFT and RSS: <1 = ours lower)",
        [
            Column("class", "class"),
            Column("figure", "figure"),
            Column("peer", "fastest peer"),
            Column("ratio", "ours / peer, median (range)", ".2f"),
        ],
        best_rows,
    )
    for e, why in skipped.items():
        report.note(f"skipped {e}: {why}")
    report.emit(args.json)


if __name__ == "__main__":
    main()
