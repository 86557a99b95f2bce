#!/usr/bin/env bash
# Install gpt2-edge's runtime for one image flavour, then check the install. The Dockerfile runs
# this for every target; CI runs it for `cpu` in a fresh virtual environment.
#
#   scripts/docker-install.sh cpu|gpu|jetson [SOURCE_DIR]
#
#   cpu     onnxruntime (CPU) + the CLI + the HTTP server. No torch: the runtime never needs it.
#   gpu     onnxruntime-gpu + tensorrt + cuda-python + the server (x86-64, NVIDIA TensorRT image).
#   jetson  onnxruntime-gpu from the Jetson wheel index + cuda-python 12.x + the server; TensorRT
#           is JetPack's own (python3-libnvinfer), never from PyPI (its wheels are not for Jetsons).
#
# Environment: PYTHON (default python3) is the interpreter to install into; PIP_* settings (cache,
# index, find-links) pass through to pip; JETSON_INDEX overrides the Jetson wheel index;
# SMOKE_BUNDLE, if set, is a bundle the check generates a few tokens from.
set -euo pipefail

flavour="${1:?usage: docker-install.sh cpu|gpu|jetson [SOURCE_DIR]}"
src="${2:-$(cd "$(dirname "$0")/.." && pwd)}"
py="${PYTHON:-python3}"
pip=("$py" -m pip install --disable-pip-version-check)

case "$flavour" in
  cpu)
    "${pip[@]}" "${src}[cpu,serve]"
    ;;
  gpu)
    # tensorrt (10/11) and cuda-python (12/13) must match the image's CUDA major version.
    "${pip[@]}" "${src}[gpu,tensorrt,serve]"
    ;;
  jetson)
    index="${JETSON_INDEX:-https://pypi.jetson-ai-lab.io/jp6/cu126}"
    "${pip[@]}" --extra-index-url "$index" "onnxruntime-gpu" "cuda-python>=12.6,<13" "${src}[serve]"
    ;;
  *)
    echo "docker-install.sh: unknown flavour '$flavour' (cpu, gpu or jetson)" >&2
    exit 2
    ;;
esac

# The check: the runtime imports without torch, the CLI answers, doctor reports this machine.
"$py" - "$flavour" <<'PY'
import importlib.util
import sys

flavour = sys.argv[1]
import gpt2_edge.engine.doctor  # noqa: F401
import gpt2_edge.runtime.generator  # noqa: F401
import gpt2_edge.runtime.trt.backend  # noqa: F401

for mod in ("onnxruntime", "tokenizers", "numpy", "fastapi", "uvicorn"):
    if importlib.util.find_spec(mod) is None:
        sys.exit(f"docker-install.sh: {mod} is missing from the {flavour} install")
if flavour == "cpu" and importlib.util.find_spec("torch") is not None:
    sys.exit("docker-install.sh: torch was installed into the cpu runtime; it must not be")
leaked = [m for m in ("torch", "transformers", "onnx") if m in sys.modules]
if leaked:
    sys.exit(f"docker-install.sh: importing the runtime pulled in {leaked}")
print(f"docker-install.sh: {flavour} runtime imports without torch")
PY
bindir="$("$py" -c 'import sys, os; print(os.path.dirname(sys.executable))')"
"$bindir/gpt2-edge" --version
"$bindir/gpt2-edge" doctor
if [ -n "${SMOKE_BUNDLE:-}" ]; then
  "$bindir/gpt2-edge" generate "$SMOKE_BUNDLE" --prompt "ROMEO:" --max-new-tokens 8
fi
