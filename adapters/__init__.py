"""Fine-tuning, export, the model registry and the ONNX runtime. Never imports the web framework."""
