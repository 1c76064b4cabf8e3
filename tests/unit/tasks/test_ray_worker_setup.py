"""The Ray worker hook keeps the placement-group cleaner's routine warnings and the training
context's per-report INFO records out of the logs, also after Ray Train's own logging set-up (a ``dictConfig`` of ``ray.train``, which resets the
levels of that logger's children)."""

from __future__ import annotations

import logging
import logging.config

import pytest

import ray.train.v2._internal.execution.context as train_context

from tasks.ray_worker_setup import NOISY_LOGGERS, quiet_worker_logs

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
CONTEXT = train_context.logger.name  # Ray names it by the module's file path


@pytest.fixture
def ray_train_loggers():
    """What dictConfig changes, put back afterwards (this process's other tests log too)."""
    names = ["ray.train", *[n for n in logging.root.manager.loggerDict if n.startswith("ray.train.")]]
    saved = {n: (lg.level, list(lg.handlers), lg.propagate, lg.disabled, list(lg.filters))
             for n in names if isinstance(lg := logging.getLogger(n), logging.Logger)}
    yield
    for name, (level, handlers, propagate, disabled, filters) in saved.items():
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.handlers, lg.propagate, lg.disabled, lg.filters = handlers, propagate, disabled, filters


def test_routine_records_stay_quiet_after_ray_trains_logging_setup(caplog, ray_train_loggers):
    assert set(NOISY_LOGGERS) == {CLEANER}
    quiet_worker_logs()
    quiet_worker_logs()  # twice, as a reused worker may: one filter each
    assert all(len(logging.getLogger(name).filters) == 1 for name in (CLEANER, CONTEXT))
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                               "loggers": {"ray.train": {"level": "DEBUG", "propagate": True}}})
    with caplog.at_level(logging.DEBUG):
        logging.getLogger(CLEANER).warning("Failed to query Ray Train Controller actor state.")
        logging.getLogger(CLEANER).error("a real error")
        logging.getLogger(CONTEXT).info("Reporting training result 1: TrainingReport(...)")
        logging.getLogger(CONTEXT).warning("a context warning")
        logging.getLogger("ray.train.v2._internal.execution.storage").info("Checkpoint successfully created at: ...")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        (CLEANER, "a real error"),
        (CONTEXT, "a context warning"),
        ("ray.train.v2._internal.execution.storage", "Checkpoint successfully created at: ..."),
    ]
