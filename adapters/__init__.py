"""Fine-tuning, export and the model registry, in two sides: ``serving`` (torch-free, what the
service imports) and ``training`` (PyTorch). Never imports the web framework."""
