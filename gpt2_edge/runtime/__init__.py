"""Torch-free runtime: numpy + onnxruntime (or tensorrt) + tokenizers only."""
