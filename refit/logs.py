"""Logging set-up shared by every refit process: serving workers, the retrain job, the drift job.

Only the level of refit's own loggers (``refit`` and its children, ``refit.predictor``,
``refit.drift`` ...) is ours to set. Where the log records go is the host's business: in a serving
worker BentoML has configured the root logger's handler before it imports the service (and keeps
the root at WARNING, which would otherwise hide refit's INFO messages), and the jobs configure
theirs with :func:`logging.basicConfig`. A process without any handler gets a plain one on stderr,
so refit's messages are never silently dropped.
"""

from __future__ import annotations

import logging

from refit.settings import RefitSettings

ROOT_LOGGER = "refit"
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def configure_logging(settings: RefitSettings) -> logging.Logger:
    """Set the ``refit.*`` loggers to ``settings.log_level``; returns the ``refit`` logger.

    Records of that level and above propagate to the root logger's handlers whatever the root's
    own level, so this neither hides nor duplicates the host's other logs.
    """
    logger = logging.getLogger(ROOT_LOGGER)
    logger.setLevel(settings.log_level)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    return logger
