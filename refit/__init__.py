"""refit: a text classifier that learns in production.

The core shared by the three parts of the system: settings, the error hierarchy, the store of
predictions, feedback and retrain jobs, and the command line. The parts are ``adapters``
(fine-tuning, export, the model registry, the ONNX runtime), ``service`` (the HTTP surface) and
``monitoring`` (metrics, drift, dashboards, alert rules).
"""

__version__ = "0.1.0"
