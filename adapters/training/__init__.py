"""Training: the encoder in PyTorch, the head, hyperparameter search, gradual unfreezing, ONNX
export, the training pipeline and the retrain job. Never imported by serving."""
