"""Keep the services' own telemetry off: this project sends traffic to loopback only.

Imported first by ``tasks`` and ``flows``; only sets variables the user has not set.
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

for _key, _value in OFFLINE_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
