"""OpenVINO's runtime reading a bundle's ONNX graph: the ``openvino`` provider, which computes bf16
bundles in bf16 on CPUs that have the instructions (AVX512-BF16, AMX). Torch-free; ``openvino``
(the optional ``openvino`` extra) is imported when a backend is made, never when this package is."""
