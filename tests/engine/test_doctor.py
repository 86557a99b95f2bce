"""``gpt2-edge doctor``: runs on this CPU machine, and its recommendation rule on machines we lack."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from gpt2_edge.cli import main
from gpt2_edge.engine import system
from gpt2_edge.engine.doctor import Facts, recommend
from gpt2_edge.runtime.trt import system as trt_system

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse4_2 avx f16c fma avx2 avx512f avx512bw avx512_vnni avx512_bf16
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp
CPU part\t: 0xd42
"""


def _facts(**kw) -> Facts:
    base = Facts(
        python="3.10.12",
        platform="Linux 5.15 x86_64",
        gpt2_edge="0.1.0",
        onnxruntime={
            "version": "1.22.0",
            "package": "onnxruntime",
            "device": "CPU",
            "providers": ["CPUExecutionProvider"],
        },
        gpu=None,
        nvidia_driver=None,
        cuda_runtime=None,
        cuda_python=None,
        tensorrt=None,
        jetson=None,
        cpu={"machine": "x86_64", "model": "x", "cores": 8, "simd": ["avx2", "fma"]},
        memory_bytes=32 * 2**30,
    )
    return replace(base, **kw)


ORIN_NANO = {"name": "Orin", "compute_capability": "8.7", "memory_bytes": 7 * 2**30}
ORT_GPU = {
    "version": "1.20.0",
    "package": "onnxruntime-gpu",
    "device": "GPU",
    "providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def test_doctor_on_this_machine(capsys):
    assert main(["doctor", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    facts, rec = rep["facts"], rep["recommendation"]
    assert facts["onnxruntime"]["providers"][-1] == "CPUExecutionProvider"
    assert facts["cpu"]["cores"] >= 1 and isinstance(facts["cpu"]["simd"], list)
    if facts["gpu"] is None:
        assert rec["provider"] == "cpu" and rec["target"] == "ort"
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime" in text and "CPU SIMD" in text and "use here: provider" in text


def test_cpu_flags_from_cpuinfo():
    x86 = system.cpu_info(X86)
    assert x86["model"] == "AMD EPYC 9R14 96-Core Processor"
    assert x86["simd"] == [
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512_bf16",
    ]
    assert system.cpu_info(ARM)["simd"] == ["asimd", "asimddp", "asimdhp", "fphp"]


@pytest.mark.parametrize(
    "facts, provider, precision, needle",
    [
        (
            _facts(gpu={"name": "NVIDIA L4", "compute_capability": "8.9", "memory_bytes": 24 * 2**30},
                   tensorrt="10.8.0.43", cuda_python="12.8.0", onnxruntime=ORT_GPU),
            "trt-engine", "fp16", "gpt2-edge build-engine out/fp16",
        ),
        (
            _facts(gpu=ORIN_NANO, tensorrt="10.3.0.30", cuda_python="12.6.0", memory_bytes=7 * 2**30,
                   jetson={"model": "NVIDIA Jetson Orin Nano Developer Kit", "l4t": "R36.4.0"}),
            "trt-engine", "fp16", "--max-batch 2 --max-context 512 --workspace-mib 512",
        ),
        (_facts(gpu=ORIN_NANO, tensorrt="10.3.0.30", onnxruntime=ORT_GPU), "tensorrt", "fp16", "--provider tensorrt"),
        (
            _facts(gpu=ORIN_NANO, onnxruntime={**ORT_GPU, "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}),
            "cuda", "fp16", "--provider cuda",
        ),
        (_facts(gpu=ORIN_NANO), "cpu", "int4", "is idle"),
        (_facts(cpu={"machine": "x86_64", "model": "x", "cores": 4, "simd": ["avx512_vnni"]}), "cpu", "int4", "avx512_vnni"),
        (_facts(cpu={"machine": "aarch64", "model": "x", "cores": 4, "simd": ["asimd", "asimddp"]}), "cpu", "int4", "asimddp"),
        (_facts(cpu={"machine": "x86_64", "model": "x", "cores": 2, "simd": ["sse4_2"]}), "cpu", "fp32", "fp32"),
    ],
)  # fmt: skip
def test_recommendation(facts, provider, precision, needle):
    r = recommend(facts)
    assert (r.provider, r.precision) == (provider, precision)
    assert needle in " ".join([r.why, *r.commands, *r.notes])
    if provider in ("trt-engine", "tensorrt", "cuda"):
        assert r.target == "tensorrt"


def test_tensorrt_library_version_decoding():
    assert trt_system._decode_nvinfer_version(100803) == "10.8.3"
    assert trt_system._decode_nvinfer_version(110400) == "11.4.0"
    assert trt_system._decode_nvinfer_version(8601) == "8.6.1"
