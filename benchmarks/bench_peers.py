"""gpt2-edge against its peers on the same machine, same token ids, interleaved rounds.

Peers (optional, ``pip install -r benchmarks/requirements-peers.txt``; each one missing is
skipped with the reason):
  openvino   OpenVINO GenAI (``LLMPipeline``; the model exported with optimum-intel) in two modes:
             "fair" (f32 compute and KV cache, as the kit) and "default" (its CPU defaults: bf16
             compute and u8 KV where the CPU has bf16). Runs in its own Python, named by
             ``OPENVINO_GENAI_PYTHON`` (optimum-intel needs newer transformers and torch than the
             kit); skipped with the reason where that is unset. benchmarks/peer_openvino.py.
  llama      llama.cpp through llama-cpp-python's ctypes bindings (GGUF by llama.cpp's own converter
             and quantizer); ``LLAMA_CPP_PYTHON_PATH`` (an unpacked llama-cpp-python sdist) and
             ``LLAMA_CPP_LIB_PATH`` (a llama.cpp build's bin folder) pick a local build, else the
             installed package. benchmarks/peer_llama.py.
  ct2        CTranslate2 (its Transformers converter).
  ortgpt2    ONNX Runtime's GPT-2 tool (``onnxruntime.transformers.models.gpt2.convert_to_onnx``, the
             stacked-past graph, its own optimizer and quantizer), built once by the Python named by
             ``ORT_GPT2_TOOL_PYTHON``.
  optimum    Hugging Face Optimum (``ORTModelForCausalLM``).
Each engine's settings are stated in the report's settings table.

One file past 400 lines: the engine table, the worker protocol and the report shaping read together;
the two peers with their own set-up (another Python, a local build) live in peer_openvino.py and
peer_llama.py.

The model: random GPT-2 124M-shaped weights (speed does not depend on the values) with the real
GPT-2 tokenizer; every engine gets the same token ids. Workloads (``--workloads``), greedy, eos
never ends a run, each warmed up once on its own shape before it is timed:
  b1    batch 1, 32-token prompt, 64 new tokens: decode tokens/s and time to first token (TTFT 32);
        the process's peak RSS right after it
  long  batch 1, 896-token prompt, 64 new tokens: decode tokens/s after 896, TTFT 896
  b8    batch 8 x 32-token prompts, 64 new tokens: decode tokens/s summed over the batch
Each engine runs in its own subprocess per turn; the engines take strict turns round by round
(benchmarks/harness.py). Per class (fp32, bf16, int8, int4) one table: every engine's median and
spread (min-max over rounds), and under each peer the ratio kit / peer, the median (and range) of
the per-round ratios. An engine whose worker fails is skipped from then on, with the reason.

    python -m benchmarks.bench_peers [--rounds 3] [--threads 2] [--only openvino,llama]
        [--workloads b1,long,b8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import CACHE, bundle_of, random_checkpoint, variant_of
from benchmarks.harness import Column, Report, add_json_argument, interleave
from gpt2_edge.measure import peak_rss_mib, ratio_summary, summary

HERE = Path(__file__).resolve().parent

NEW = 64
SHORT, LONG, BATCH = 32, 896, 8
WORKLOADS = ("b1", "long", "b8")  # the order a worker runs them: peak RSS is read right after b1
PROMPTS = {"b1": "short", "long": "long", "b8": "batch"}
CLASSES = ("fp32", "bf16", "int8", "int4")

# engine -> (family, classes it is compared in). Classes compare like with like; OpenVINO's
# default mode computes in bf16 on CPUs that have it, so it is also the bf16 class's peer.
ENGINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpt2-edge fp32": ("ours", ("fp32",)),
    "gpt2-edge bf16": ("ours", ("bf16",)),  # runs once the kit has the bf16 precision (issue 23)
    "gpt2-edge int8": ("ours", ("int8",)),
    "gpt2-edge int4": ("ours", ("int4",)),
    "openvino fair fp32": ("openvino", ("fp32",)),
    "openvino default fp32": ("openvino", ("fp32", "bf16")),
    "openvino fair int8": ("openvino", ("int8",)),
    "openvino default int8": ("openvino", ("int8",)),
    "openvino fair int4": ("openvino", ("int4",)),
    "openvino default int4": ("openvino", ("int4",)),
    "llama.cpp f32": ("llama", ("fp32",)),
    "llama.cpp bf16": ("llama", ("bf16",)),
    "llama.cpp q8_0": ("llama", ("int8",)),
    "llama.cpp q4_0": ("llama", ("int4",)),
    "ctranslate2 float32": ("ct2", ("fp32",)),
    "ctranslate2 int8": ("ct2", ("int8",)),
    "ort-gpt2-tool fp32": ("ortgpt2", ("fp32",)),
    "ort-gpt2-tool int8": ("ortgpt2", ("int8",)),
    "optimum fp32": ("optimum", ("fp32",)),
}
FAMILY_NAMES = ("ours", "openvino", "llama", "ct2", "ortgpt2", "optimum")
# the kit's bundle variant per class (benchmarks.common.variant_of); None: the fp32 bundle itself
OUR_VARIANTS = {"fp32": None, "bf16": "bf16", "int8": "int8-dynamic", "int4": "int4"}


# -------------------------------------------------------------------------------------------
# A runner: prefill + greedy decode of a batch of equal-length prompts, timed. Returns (time to
# first token s, decode seconds for the remaining NEW-1 tokens[, wall-clock seconds of the whole
# call, where the first two are the engine's own metrics]).
# -------------------------------------------------------------------------------------------
Runner = Callable[[list[list[int]], int], tuple[float, ...]]


def ours(engine: str, threads: int) -> Runner:
    """The kit as an app calls it: ``Generator.generate`` with token ids (``ignore_eos``)."""
    from gpt2_edge import GenerationConfig, Generator

    variant = OUR_VARIANTS[ENGINES[engine][1][0]]
    # bf16 is made from the `tensorrt` target (standard ops, which OpenVINO reads); the rest from `ort`
    base = bundle_of(random_checkpoint("gpt2"), target="tensorrt" if variant == "bf16" else "ort")
    path = base if variant is None else variant_of(base, variant)
    # bf16 runs where `provider="auto"` puts it: OpenVINO on a CPU with bf16 arithmetic (the default
    # "cpu" provider is ONNX Runtime, which computes a bf16 bundle in fp32)
    provider = "auto" if variant == "bf16" else "cpu"
    gen = Generator.from_bundle(str(path), provider=provider, threads=threads, verify=False)

    def run(prompts: list[list[int]], new: int) -> tuple[float, float]:
        t = gen.generate(prompts, GenerationConfig(max_new_tokens=new, ignore_eos=True))
        return t[0].timings["prefill_s"], t[0].timings["decode_s"]

    return run


def llama(engine: str, threads: int) -> Runner:
    from benchmarks.peer_llama import llama as runner

    return runner(engine, threads)


def openvino(engine: str, threads: int) -> Runner:
    from benchmarks.peer_openvino import openvino as runner

    return runner(engine, threads)


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
        # in its own folder: the tool writes gpt2_parity_results.csv into the working directory
        subprocess.run(cmd, check=True, capture_output=True, cwd=out)
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


FAMILIES: dict[str, Callable[[str, int], Runner]] = {
    "ours": ours,
    "openvino": openvino,
    "llama": llama,
    "ct2": ct2,
    "ortgpt2": ortgpt2,
    "optimum": optimum,
}


# -- what each engine runs with, and why one cannot run --------------------------------------
def settings(engine: str, threads: int) -> str:
    """The settings ``engine`` runs with, in a sentence (the report's settings table)."""
    family, classes = ENGINES[engine]
    if family == "ours":
        variant = OUR_VARIANTS[classes[0]]
        if variant == "bf16":
            return (
                "Generator.generate (provider auto), the tensorrt-target bundle's bf16 variant (its "
                f"OpenVINO IR); OpenVINO CPU, bf16 compute and KV cache, {threads} threads"
            )
        which = "fp32" if variant is None else f"its {variant} variant"
        return (
            f"Generator.generate, the ort-target bundle ({which}, in-place KV); "
            f"ONNX Runtime CPU, {threads} intra-op threads"
        )
    if family == "openvino":
        from benchmarks.peer_openvino import settings as ov_settings

        _, mode, precision = engine.split()
        return ov_settings(mode, precision, threads)
    if family == "llama":
        from benchmarks.peer_llama import settings as llama_settings

        return llama_settings(engine, threads)
    if family == "ct2":
        compute = engine.split()[-1]
        return f"ctranslate2.Generator.generate_batch, compute_type {compute}, intra_threads {threads}"
    if family == "ortgpt2":
        return (
            f"convert_to_onnx -o -p {engine.split()[-1]} (its fusions; int8: its dynamic quantizer), "
            f"stacked past fed back as numpy, {threads} intra-op threads"
        )
    return f"ORTModelForCausalLM.generate (optimum's export, KV cache), {threads} intra-op threads"


def python_for(engine: str, environ: Mapping[str, str]) -> str:
    """The Python an engine's worker runs in: the kit's, or OpenVINO's own (``OPENVINO_GENAI_PYTHON``)."""
    if ENGINES[engine][0] == "openvino":
        return environ["OPENVINO_GENAI_PYTHON"]
    return sys.executable


def unavailable(engine: str, environ: Mapping[str, str], cache: Path = CACHE) -> str | None:
    """Why ``engine`` cannot run here (checked before any worker starts), or None where it may: a
    worker can still fail later, and is then skipped with its own reason."""
    family, classes = ENGINES[engine]
    if family == "ours":
        variant = OUR_VARIANTS[classes[0]]
        if variant is not None:
            from gpt2_edge.runtime.manifest import PRECISIONS

            if variant not in PRECISIONS:
                return (
                    f"the bundle variant {variant!r} cannot be made: the kit's precisions are "
                    f"{', '.join(PRECISIONS)}"
                )
    if family == "openvino":
        python = environ.get("OPENVINO_GENAI_PYTHON")
        if not python:
            return (
                "set OPENVINO_GENAI_PYTHON to a Python with openvino-genai and optimum-intel "
                "(see benchmarks/requirements-peers.txt)"
            )
        if not os.access(python, os.X_OK):
            return f"OPENVINO_GENAI_PYTHON={python} is not an executable"
    if family == "ortgpt2":
        built = (cache / "ort-gpt2-tool" / engine.split()[-1] / "model.onnx").is_file()
        if not built and not environ.get("ORT_GPT2_TOOL_PYTHON"):
            return (
                "set ORT_GPT2_TOOL_PYTHON to a Python with torch, onnxruntime and transformers<4.45 "
                "(see benchmarks/requirements-peers.txt)"
            )
    if family == "llama":
        lib = environ.get("LLAMA_CPP_LIB_PATH")
        if lib and not (Path(lib) / "libllama.so").is_file() and not list(Path(lib).glob("libllama.*")):
            return f"LLAMA_CPP_LIB_PATH={lib} holds no libllama (a llama.cpp build's bin folder)"
        src = environ.get("LLAMA_CPP_PYTHON_PATH")
        if src and not (Path(src) / "llama_cpp" / "__init__.py").is_file():
            return (
                f"LLAMA_CPP_PYTHON_PATH={src} holds no llama_cpp package (an unpacked llama-cpp-python sdist)"
            )
    return None


def versions(engine: str) -> dict[str, str]:
    """The peer's packages, as its worker sees them."""
    import importlib.metadata as md

    family = ENGINES[engine][0]
    if family == "openvino":
        from benchmarks.peer_openvino import versions as ov_versions

        return ov_versions()
    if family == "llama":
        from benchmarks.peer_llama import versions as llama_versions

        return llama_versions()
    dists = {"ours": ["onnxruntime"], "ct2": ["ctranslate2"], "ortgpt2": ["onnxruntime"]}.get(
        family, ["optimum-onnx", "onnxruntime"]
    )
    out = {}
    for d in dists:
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            continue
    return out


# -- one engine in its own process ------------------------------------------------------------
def worker(
    engine: str, threads: int, prompts: Mapping[str, list[list[int]]], workloads: Sequence[str] = WORKLOADS
) -> dict[str, Any]:
    """Every workload of ``engine``: each warmed up once on its own shape, then timed."""
    run = FAMILIES[ENGINES[engine][0]](engine, threads)
    res: dict[str, Any] = {}
    for w in WORKLOADS:
        if w not in workloads:
            continue
        batch = prompts[PROMPTS[w]]
        run(batch, 4)  # warm-up on this shape
        first, dec, *wall = run(batch, NEW)
        res[w] = len(batch) * (NEW - 1) / dec
        res[{"b1": "ttft_short_ms", "long": "ttft_long_ms", "b8": "ttft_b8_ms"}[w]] = 1000 * first
        if wall:  # the engine's own metrics above; the wall clock around the whole call here
            res[f"{w}_wall"] = len(batch) * (NEW - 1) / (wall[0] - first)
        if w == "b1":
            res["rss_b1_mib"] = peak_rss_mib()
    res["versions"] = versions(engine)
    return res


# -- the tables -------------------------------------------------------------------------------
# (key, label, format, lower is better)
FIGURES = (
    ("b1", "b1 tok/s", ".1f", False),
    ("b8", "b8 tok/s", ".1f", False),
    ("long", "@896 tok/s", ".1f", False),
    ("ttft_short_ms", "TTFT 32 ms", ".0f", True),
    ("ttft_long_ms", "TTFT 896 ms", ".0f", True),
    ("rss_b1_mib", "peak RSS MiB", ".0f", True),
)


def per_round(results: Mapping[str, Sequence[Mapping[str, Any] | None]], engine: str, key: str) -> list:
    """``engine``'s ``key`` per round (None where the round or the figure is missing)."""
    return [None if r is None else r.get(key) for r in results.get(engine, [])]


def class_rows(
    results: Mapping[str, Sequence[Mapping[str, Any] | None]], engines: Sequence[str], cls: str
) -> list[dict[str, Any]]:
    """One class's table: the kit's row, then each peer's row followed by a row of the per-round
    ratios kit / peer (their median and range, as text; the numbers in the row's ``ratios``)."""
    mine = next((e for e in engines if ENGINES[e][0] == "ours" and cls in ENGINES[e][1]), None)
    members = [e for e in engines if cls in ENGINES[e][1] and any(results.get(e, []))]
    if mine not in members:
        return []
    rows: list[dict[str, Any]] = []
    for e in [mine] + [e for e in members if e != mine]:
        row: dict[str, Any] = {"engine": f"**{e}**" if e == mine else e}
        for key, *_ in FIGURES:
            got = [v for v in per_round(results, e, key) if v is not None]
            row[key] = list(summary(got)) if got else None
        rows.append(row)
        if e == mine:
            continue
        ratio: dict[str, Any] = {"engine": f"↳ {mine.split()[0]} / {e}", "ratios": {}}
        for key, *_ in FIGURES:
            a, b = per_round(results, mine, key), per_round(results, e, key)
            pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y]
            if not pairs:
                ratio[key] = None
                continue
            med, lo, hi = ratio_summary([x for x, _ in pairs], [y for _, y in pairs])
            ratio["ratios"][key] = [med, lo, hi]
            ratio[key] = f"{med:.2f}" if lo == hi else f"{med:.2f} ({lo:.2f}-{hi:.2f})"
        rows.append(ratio)
    return rows


def class_columns() -> list[Column]:
    return [Column("engine", "engine")] + [Column(k, label, fmt) for k, label, fmt, _ in FIGURES]


def settings_rows(
    engines: Sequence[str], results: Mapping[str, Sequence[Mapping[str, Any] | None]], threads: int
) -> list[dict[str, str]]:
    """Each engine that ran: its packages (as its worker reported them) and its settings."""
    rows = []
    for e in engines:
        ran = [r for r in results.get(e, []) if r]
        if not ran:
            continue
        vers = ran[0].get("versions") or {}
        rows.append(
            {
                "engine": e,
                "versions": ", ".join(f"{k} {v}" for k, v in vers.items()) or "n/a",
                "settings": settings(e, threads),
            }
        )
    return rows


def wall_check(
    results: Mapping[str, Sequence[Mapping[str, Any] | None]], engines: Sequence[str]
) -> list[str]:
    """For each family timed by its own metrics: the range of (metric decode rate / wall-clock
    decode rate) over all its engines, workloads and rounds, in one line."""
    by_family: dict[str, list[float]] = {}
    for e in engines:
        for w in WORKLOADS:
            for r in results.get(e, []):
                if r and f"{w}_wall" in r:
                    by_family.setdefault(ENGINES[e][0], []).append(r[w] / r[f"{w}_wall"])
    return [
        f"{fam}: decode rate by its own metrics / by the wall clock around the call "
        f"{min(rs):.3f}-{max(rs):.3f} ({len(rs)} figures)"
        for fam, rs in by_family.items()
    ]


def select(only: str | None, workloads: str | None) -> tuple[list[str], list[str]]:
    """The engines (``--only``: families, the kit always) and workloads (``--workloads``) to run;
    an unknown name is refused with the known ones."""
    families = set(FAMILY_NAMES)
    if only:
        families = {f.strip() for f in only.split(",") if f.strip()}
        bad = families - set(FAMILY_NAMES)
        if bad:
            raise SystemExit(
                f"--only: unknown {', '.join(sorted(bad))}; choose from {', '.join(FAMILY_NAMES)}"
            )
        families.add("ours")
    work = list(WORKLOADS)
    if workloads:
        work = [w.strip() for w in workloads.split(",") if w.strip()]
        bad = set(work) - set(WORKLOADS)
        if bad or not work:
            raise SystemExit(
                f"--workloads: unknown {', '.join(sorted(bad)) or '(none)'}; "
                f"choose from {', '.join(WORKLOADS)}"
            )
    return [e for e, (fam, _) in ENGINES.items() if fam in families], [w for w in WORKLOADS if w in work]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--only", help=f"comma-separated families: {','.join(FAMILY_NAMES)} (the kit always runs)"
    )
    ap.add_argument("--workloads", help=f"comma-separated, default all: {','.join(WORKLOADS)}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    add_json_argument(ap)
    args = ap.parse_args(argv)
    engines, workloads = select(args.only, args.workloads)
    if args.worker:
        prompts = json.loads(Path(args.prompts).read_text())
        print(json.dumps(worker(args.worker, args.threads, prompts, workloads)))
        return
    report = Report("bench_peers", "gpt2-edge against its peers", argv, vars(args))

    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(0, 50256, n).tolist()  # noqa: E731 - never eos
    prompts = {"short": [ids(SHORT)], "long": [ids(LONG)], "batch": [ids(SHORT) for _ in range(BATCH)]}
    CACHE.mkdir(parents=True, exist_ok=True)
    random_checkpoint("gpt2")  # here, once: the peers' own Pythons only read it
    pfile = CACHE / "peer-prompts.json"
    pfile.write_text(json.dumps(prompts))
    skipped: dict[str, str] = {}
    for e in engines:
        why = unavailable(e, os.environ)
        if why:
            skipped[e] = why
            print(f"{e}: skipped ({why})", file=sys.stderr)
    engines_run = [e for e in engines if e not in skipped]

    def subject(e: str):
        def turn(r: int) -> dict | None:
            if e in skipped:
                return None
            cmd = [python_for(e, os.environ), "-m", "benchmarks.bench_peers", "--worker", e]
            cmd += [
                "--threads",
                str(args.threads),
                "--prompts",
                str(pfile),
                "--workloads",
                ",".join(workloads),
            ]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
            if p.returncode != 0:
                skipped[e] = (p.stderr.strip().splitlines() or ["failed"])[-1][:200]
                print(f"round {r + 1}: {e}: skipped ({skipped[e]})", file=sys.stderr)
                return None
            out = json.loads(p.stdout.strip().splitlines()[-1])
            out["worker_s"] = time.perf_counter() - t0
            return out

        return turn

    runs = (
        interleave(
            {e: subject(e) for e in engines_run},
            args.rounds,
            warmup=0,  # each worker warms up itself
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
        if engines_run
        else None
    )
    results = runs.results if runs else {}
    report.raw["runs"] = results
    report.raw["orders"] = runs.orders if runs else []
    report.raw["workloads"] = workloads

    for cls in CLASSES:
        rows = class_rows(results, engines_run, cls)
        if rows:
            report.table(
                f"{cls} class",
                class_columns(),
                rows,
                note=f"GPT-2 124M shape, random weights, {args.threads} threads, {args.rounds} round(s): "
                "each engine's median (min-max over rounds); ↳ rows: kit / peer, the median (min-max) of the "
                "per-round ratios (tok/s: >1 = the kit faster; TTFT and peak RSS: <1 = the kit lower).",
            )
    report.table(
        "Settings each engine ran with",
        [Column("engine", "engine"), Column("versions", "packages"), Column("settings", "settings")],
        settings_rows(engines_run, results, args.threads),
    )
    for line in wall_check(results, engines_run):
        report.note(f"cross-check: {line}")
    for e, why in skipped.items():
        report.note(f"skipped {e}: {why}")
    report.emit(args.json)


if __name__ == "__main__":
    main()
