"""gpt2-edge: GPT-2 from a PyTorch checkpoint to ONNX, quantized variants and a torch-free runtime."""

__version__ = "0.1.0"
