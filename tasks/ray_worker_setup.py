"""Ray's ``worker_process_setup_hook`` for every worker of a cluster this project starts or joins.

Ray runs the hook in every worker process of the job: Ray Train's controller and its helper
actors, Ray Data's tasks and the training workers alike, about six new processes per training
stage. So this module imports nothing beyond the standard library: the hook used to live in
``tasks.ray_cluster``, whose imports pull in torch (0.9 s of CPU in each of those processes;
only the training workers need it).
"""

from __future__ import annotations

import logging

# Ray Train's placement-group cleaner asks the dashboard's state API every second whether the
# train controller lives and logs a WARNING each time it cannot (local clusters here run
# without a dashboard); this one logger is quietened in every worker, nothing else.
NOISY_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


class ErrorsOnly(logging.Filter):
    """Pass records of level ERROR and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_worker_logs() -> None:
    """Quiet the placement-group cleaner's routine warnings in the worker this runs in: a level
    and a filter, since Ray Train's own logging set-up (``logging.config.dictConfig`` of the
    ``ray.train`` logger) resets the levels of that logger's children, not their filters."""
    logger = logging.getLogger(NOISY_LOGGER)
    logger.setLevel(logging.ERROR)
    if not any(isinstance(f, ErrorsOnly) for f in logger.filters):
        logger.addFilter(ErrorsOnly())
