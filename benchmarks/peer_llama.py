"""llama.cpp as a peer of ``benchmarks/bench_peers.py``: its C API through llama-cpp-python's
ctypes bindings, the model converted by llama.cpp's own ``convert_hf_to_gguf.py`` and quantized by
its own quantizer.

Where it comes from (environment variables; each unset one falls back as said):
  LLAMA_CPP_PYTHON_PATH  a folder holding the ``llama_cpp`` package and ``vendor/llama.cpp`` (an
                         unpacked llama-cpp-python sdist); put first on the worker's ``sys.path``.
                         Unset: the installed ``llama_cpp``, and the converter's sources from the
                         sdist on PyPI, downloaded once into the bench cache.
  LLAMA_CPP_LIB_PATH     llama-cpp-python's own: the folder of ``libllama.so`` and ``libggml*.so``
                         (a llama.cpp build's ``build/bin``). Unset: the libraries inside the
                         package.

Settings per workload (``SETTINGS``), checked against llama.cpp's own ``llama-bench`` on the
same GGUF and by interleaved A/B runs of this runner (busy 2-core Zen 4, 2026-12-08, 1 thread:
under that load llama.cpp at 2 threads measured 30 tok/s in ``llama-bench -p 32 -n 64 -t 2`` against
126 at ``-t 1`` in the same minute, so no 2-thread A/B could rank anything):
  - This loop against llama-cpp-python's own ``Llama`` API (``Llama.generate``, greedy, same GGUF,
    same threads): 0.98 (median of 6 interleaved rounds, q4_0 b1): the C API loop costs nothing
    over it (one ``llama_batch`` reused, logits of the last position only, read in place), so the
    README's q4_0 figure (120 tok/s) against an outside 185 is the load of that run, not the loop;
    llama.cpp is the peer that loses most on a busy machine (its threads spin at every barrier).
  - b1: flash attention off (the ``Llama`` API's default; on measured 1.01x decode, 1.01x TTFT:
    no difference), n_ubatch 512 (the 32-token prompt is one micro-batch either way).
  - long: n_batch = n_ubatch = 1024, so the 896-token prompt is one micro-batch
    (``llama-bench -p 896 -ub 512,1024``: 233 vs 388 tok/s with flash attention off); flash
    attention off, as measured before for decoding at 896 (q8_0: 63.5 vs 46.5 tok/s against
    llama.cpp's default "auto"; the q4_0 A/B here at n_ubatch 1024: on 1.02x decode, 1.01x TTFT: noise).
  - b8: one unified KV cache for the 8 sequences, flash attention off (against per-sequence
    streams and flash attention on, 4 ways: the others 0.96-0.97x decode, 1.00-1.15x TTFT).
  - Everywhere: f16 KV (llama.cpp's default; the GGUF's weights keep their type), mmap, n_threads
    = n_threads_batch = the bench's threads.
A quiet machine should check again: ``llama-bench -m MODEL.gguf -p 32,896 -n 64 -t 2 -fa 0,1
-ub 512,1024`` and ``-p 0 -n 64 -d 896 -t 2 -fa 0,1``.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, random_checkpoint


@dataclass(frozen=True)
class Settings:
    """One workload's llama.cpp context parameters (``llama_context_params``)."""

    n_ctx: int = 1024
    n_batch: int = 1024  # the whole 896-token prompt in one llama_decode call
    n_ubatch: int = 512  # llama.cpp's default micro-batch
    flash_attn: bool = False
    kv_type: str = "f16"  # llama.cpp's default KV cache type
    kv_unified: bool = True  # batches: one cache, each sequence masked to its own cells

    def describe(self) -> str:
        return (
            f"n_ctx {self.n_ctx}, n_batch {self.n_batch}, n_ubatch {self.n_ubatch}, flash attention "
            f"{'on' if self.flash_attn else 'off'}, {self.kv_type} KV"
            + (", unified KV" if self.kv_unified else "")
        )


# workload -> settings; "b1" also times the 32-token prefill (TTFT 32), "long" the 896-token one.
SETTINGS: dict[str, Settings] = {
    "b1": Settings(n_ubatch=512),
    "long": Settings(n_ubatch=1024),
    "b8": Settings(n_ubatch=512),
}


def workload_of(n_seq: int, n_prompt: int) -> str:
    """Which workload's settings a batch of ``n_seq`` prompts of ``n_prompt`` tokens runs with."""
    if n_seq > 1:
        return "b8"
    return "long" if n_prompt > 128 else "b1"


def settings(engine: str, threads: int) -> str:
    """What an engine ``llama.cpp KIND`` runs with, for the table's settings note."""
    per = "; ".join(f"{w}: {s.describe()}" for w, s in SETTINGS.items())
    return (
        f"GGUF by convert_hf_to_gguf.py (f32/bf16) and llama_model_quantize ({engine.split()[-1]}); "
        f"C API: one llama_decode per step, logits of the last position only, {threads} threads "
        f"(n_threads = n_threads_batch), mmap; {per}"
    )


def source() -> Path:
    """llama.cpp's sources (the converter and gguf-py): from ``LLAMA_CPP_PYTHON_PATH``, else the
    llama-cpp-python sdist from PyPI, unpacked in the bench cache."""
    given = os.environ.get("LLAMA_CPP_PYTHON_PATH")
    if given:
        path = Path(given) / "vendor" / "llama.cpp"
        if not (path / "convert_hf_to_gguf.py").is_file():
            raise RuntimeError(f"LLAMA_CPP_PYTHON_PATH={given} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        return path
    src = CACHE / "llama-src"
    found = list(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[0]
    src.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(src)]
    subprocess.run([*cmd, "llama-cpp-python"], check=True, capture_output=True)
    (tarball,) = src.glob("llama_cpp_python-*.tar.gz")
    shutil.unpack_archive(tarball, src)
    return next(src.glob("llama_cpp_python-*/vendor/llama.cpp"))


def import_llama_cpp():
    """llama-cpp-python's ctypes bindings (``llama_cpp.llama_cpp``), from ``LLAMA_CPP_PYTHON_PATH``
    when set, else the installed package. Where the package's ``__init__`` cannot import (its
    high-level ``Llama`` API needs ``diskcache`` and more, which an unpacked sdist does not bring),
    the bindings are loaded alone: they need only ctypes and numpy, and they are all this uses."""
    given = os.environ.get("LLAMA_CPP_PYTHON_PATH")
    if given and given not in sys.path:
        sys.path.insert(0, given)
    try:
        import llama_cpp.llama_cpp as bindings
    except ModuleNotFoundError as e:
        if e.name == "llama_cpp":
            raise
        sys.modules.pop("llama_cpp", None)
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            raise
        package = types.ModuleType("llama_cpp")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["llama_cpp"] = package
        bindings = importlib.import_module("llama_cpp.llama_cpp")
    return bindings


def gguf(kind: str) -> Path:
    """The checkpoint in GGUF: f32 and bf16 by llama.cpp's converter, q8_0 / q4_0 by its quantizer."""
    L = import_llama_cpp()
    ckpt = random_checkpoint("gpt2")
    base = "bf16" if kind == "bf16" else "f32"
    conv = CACHE / "llama" / f"model-{base}.gguf"
    if not conv.is_file():
        conv.parent.mkdir(parents=True, exist_ok=True)
        tmp = conv.with_suffix(".tmp")
        env = {**os.environ, "PYTHONPATH": str(source() / "gguf-py")}
        cmd = [sys.executable, str(source() / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", base]
        p = subprocess.run([*cmd, "--outfile", str(tmp)], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed: {(p.stderr.strip().splitlines() or [''])[-1]}")
        os.replace(tmp, conv)
    if kind in ("f32", "bf16"):
        return conv
    out = conv.with_name(f"model-{kind}.gguf")
    if not out.is_file():
        params = L.llama_model_quantize_default_params()
        params.ftype = {"q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
        params.nthread = 2
        rc = L.llama_model_quantize(str(conv).encode(), str(out).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize returned {rc}")
    return out


def llama(engine: str, threads: int):
    """A runner for ``llama.cpp KIND``: ``run(prompts, new)`` returns (time to first token s,
    decode s for the other new-1 tokens). One context per workload (``SETTINGS``), a slot per
    sequence in one KV cache for batches; the prompt in one ``llama_decode``, then one call per
    step with every sequence's token; greedy over the last position's logits, read in place."""
    L = import_llama_cpp()
    L.llama_backend_init()
    model = L.llama_model_load_from_file(
        str(gguf(engine.split()[-1])).encode(), L.llama_model_default_params()
    )
    if not model:
        raise RuntimeError(f"llama.cpp could not load {engine}'s GGUF")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    kv_types = {"f16": L.GGML_TYPE_F16, "f32": L.GGML_TYPE_F32, "q8_0": L.GGML_TYPE_Q8_0}
    contexts: dict[tuple[str, int], object] = {}

    def context(work: str, n_seq: int) -> object:
        if (work, n_seq) not in contexts:
            s = SETTINGS[work]
            cp = L.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch = s.n_ctx, s.n_batch, s.n_ubatch
            cp.n_seq_max, cp.kv_unified = n_seq, s.kv_unified
            cp.n_threads = cp.n_threads_batch = threads
            cp.flash_attn_type = (
                L.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            cp.type_k = cp.type_v = kv_types[s.kv_type]
            ctx = L.llama_init_from_model(model, cp)
            if not ctx:
                raise RuntimeError(f"llama_init_from_model refused {s.describe()}")
            contexts[(work, n_seq)] = ctx
        return contexts[(work, n_seq)]

    batch = L.llama_batch_init(1024, 0, 8)
    logits_t = ctypes.POINTER(ctypes.c_float * n_vocab)

    def submit(ctx: object, items: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(ctx: object, i: int) -> int:
        return int(
            np.argmax(
                np.frombuffer(ctypes.cast(L.llama_get_logits_ith(ctx, i), logits_t).contents, np.float32)
            )
        )

    def run(prompts: list[list[int]], new: int) -> tuple[float, float]:
        ctx = context(workload_of(len(prompts), len(prompts[0])), len(prompts))
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        items = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        submit(ctx, items)
        outs = [k for k, it in enumerate(items) if it[3]]
        toks = [argmax(ctx, k) for k in outs]
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        n = len(prompts[0])
        for step in range(new - 1):
            submit(ctx, [(t, n + step, s, True) for s, t in enumerate(toks)])
            toks = [argmax(ctx, k) for k in range(len(prompts))]
        return first, time.perf_counter() - t1

    return run


def versions() -> dict[str, str]:
    """llama-cpp-python's version and where its llama.cpp library came from."""
    import_llama_cpp()
    init = Path(sys.modules["llama_cpp"].__path__[0]) / "__init__.py"
    found = [
        line.split("=")[1].strip().strip('"')
        for line in init.read_text().splitlines()
        if "__version__" in line
    ]
    out = {"llama-cpp-python": found[0] if found else "?"}
    lib = os.environ.get("LLAMA_CPP_LIB_PATH")
    if lib:
        out["libllama"] = lib
    return out
