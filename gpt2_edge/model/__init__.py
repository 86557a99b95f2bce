"""Reference PyTorch GPT-2: config, model, checkpoints, tokenizer, training and evaluation.

Submodules import torch; this package's ``__init__`` does not, so the tokenizer and config
stay usable from the torch-free runtime.
"""
