"""Torch-free parts: the model registry, the ONNX runtime, tokenisation, data and evaluation.

Serving imports only this side of ``adapters``; nothing here may import torch, transformers or
``adapters.training`` (tests/test_structure.py checks it).
"""
