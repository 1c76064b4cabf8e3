"""Environment defaults of every process of the project: the services' own telemetry off
(this project sends traffic to loopback only), Ray Train's polling interval and preemption watcher.

Imported first by ``tasks`` and ``flows`` (and so by ``infra``, whose services inherit them);
only sets variables the user has not set.
"""

import os

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # Prefect server telemetry
    "DO_NOT_TRACK": "1",  # honoured by Prefect and others
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # one bar per operator per epoch floods the console
    # the ephemeral Prefect API (SQLite) needs more than the default 20 s on 2 slow cores
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}

RAY_TRAIN_DEFAULTS = {
    # Ray Train's controller polls its workers every 2 s by default, and a finished stage is
    # only noticed at a poll: a stage's end took 4.6 s, 0.8 s at 0.5 s (bench/bench_pipeline.py).
    # A worker whose poll hangs is still declared dead only after
    # RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 minutes). Read by the processes of a Ray node:
    # a local cluster's and the stack's nodes inherit it from the process that starts them.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray Train 2.60 starts a PreemptionWatcher actor per run to poll the nodes for spot-instance
    # preemption notices: a new process (~1 s of CPU on 2 cores while the workers set up) on the
    # clusters this project starts (one machine, nothing to preempt). A cloud cluster's nodes,
    # started by its operators, keep Ray's default (on) unless they set this too.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

for _key, _value in {**OFFLINE_DEFAULTS, **RAY_TRAIN_DEFAULTS}.items():
    os.environ.setdefault(_key, _value)
