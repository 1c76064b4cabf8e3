"""Run in every Ray worker process of a cluster started or joined by this project
(``runtime_env["worker_process_setup_hook"]``).

Ray Train 2.60's placement-group cleaner asks the state API (served by the dashboard)
every second whether the train controller is alive; local clusters here run without a
dashboard, so it logs "State API may be temporarily unavailable" at WARNING each time.
Without the state API that cleaner cannot act at all, but a local cluster ends with the
driver that started it, placement groups included; clusters joined through
``RAY_ADDRESS`` normally run the dashboard, where the warning does not occur. Only this
one logger is quietened (to ERROR), nothing else.
"""

import logging

_NOISY = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_worker_logs() -> None:
    logging.getLogger(_NOISY).setLevel(logging.ERROR)
