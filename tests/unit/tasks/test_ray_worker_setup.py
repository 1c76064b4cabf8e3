"""The Ray worker hook keeps the placement-group cleaner's routine warnings out of the logs, also
after Ray Train's own logging set-up (a ``dictConfig`` of ``ray.train``, which resets the
levels of that logger's children)."""

from __future__ import annotations

import logging
import logging.config

import pytest

from tasks.ray_worker_setup import NOISY_LOGGER, quiet_worker_logs


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


def test_the_cleaners_warnings_stay_quiet_after_ray_trains_logging_setup(caplog, ray_train_loggers):
    logger = logging.getLogger(NOISY_LOGGER)
    quiet_worker_logs()
    quiet_worker_logs()  # twice, as a reused worker may: one filter
    assert len(logger.filters) == 1
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                               "loggers": {"ray.train": {"level": "DEBUG", "propagate": True}}})
    with caplog.at_level(logging.DEBUG):
        logger.warning("Failed to query Ray Train Controller actor state.")
        logger.error("a real error")
    assert [r.getMessage() for r in caplog.records if r.name == NOISY_LOGGER] == ["a real error"]
