"""Ray's ``worker_process_setup_hook`` for every worker of a cluster this project starts or joins.

Ray runs the hook in every worker process of the job: Ray Train's controller and its helper
actors, Ray Data's tasks and the training workers alike, about six new processes per training
stage. So this module imports nothing beyond the standard library: the hook used to live in
``tasks.ray_cluster``, whose imports pull in torch (0.9 s of CPU in each of those processes;
only the training workers need it).
"""

from __future__ import annotations

import logging
import os
import sys

# Loggers quietened in every worker, each to a level, nothing else:
# - Ray Train's placement-group cleaner asks the dashboard's state API every second whether the
#   train controller lives and logs a WARNING each time it cannot (local clusters here run
#   without a dashboard);
# - the worker's training context logs every ``ray.train.report`` at INFO, the whole metrics
#   dict again after the loop's own progress line. Its logger is named by its file's path
#   (``logging.getLogger(__file__)``), so the name is found from where ``ray`` is installed.
NOISY_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}
NOISY_FILE_LOGGERS = {
    "train/v2/_internal/execution/context.py": logging.WARNING,
}


def _file_logger_name(relative: str) -> str | None:
    """The logger name of ``ray``'s module at ``relative`` (its ``__file__``), where ray is imported."""
    ray = sys.modules.get("ray")
    origin = getattr(ray, "__file__", None)
    return os.path.join(os.path.dirname(origin), *relative.split("/")) if origin else None


class AtLeast(logging.Filter):
    """Pass records of ``level`` and above."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def quiet_worker_logs() -> None:
    """Quiet the routine records of the noisy loggers in the worker this runs in: a level and a
    filter each, since Ray Train's own logging set-up (``logging.config.dictConfig`` of the
    ``ray.train`` logger) resets the levels of that logger's children, not their filters."""
    levels = dict(NOISY_LOGGERS)
    for relative, level in NOISY_FILE_LOGGERS.items():
        if (name := _file_logger_name(relative)) is not None:
            levels[name] = level
    for name, level in levels.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(f, AtLeast) for f in logger.filters):
            logger.addFilter(AtLeast(level))
