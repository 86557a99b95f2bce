"""What this machine offers the ``openvino`` provider: the module, and bf16 arithmetic on its CPU."""

from __future__ import annotations

from typing import Any

from ...errors import Gpt2EdgeError

INSTALL_HINT = "pip install 'gpt2-edge[openvino]'"

# The bf16 bundle's graph as OpenVINO IR, written beside model.onnx by `quantize --precision bf16`
# where OpenVINO is installed (its weights in model.ov.bin, which OpenVINO maps instead of parsing
# the ONNX protobuf into memory); model.onnx stays for ONNX Runtime.
IR_FILE = "model.ov.xml"
IR_WEIGHTS = "model.ov.bin"


class OpenVinoError(Gpt2EdgeError):
    """The openvino provider cannot run here (not installed, no bf16 on this CPU, a graph it refuses)."""


def import_openvino() -> Any:
    """The ``openvino`` module, or ``OpenVinoError`` naming the extra to install."""
    try:
        import openvino
    except ImportError:
        raise OpenVinoError(f"the openvino provider needs OpenVINO: {INSTALL_HINT}") from None
    return openvino


def openvino_installed() -> bool:
    """Whether ``openvino`` can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def cpu_has_bf16(core: Any) -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 here (it lists ``BF16`` among its optimization
    capabilities on CPUs with AVX512-BF16 or AMX)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
