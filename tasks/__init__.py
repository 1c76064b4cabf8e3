"""Prefect tasks and Ray Train loops: thin adapters that load inputs from storage, call
``cafm_core``, write outputs to storage and log to MLflow."""

from tasks import offline  # noqa: F401  (telemetry off before any service library loads)
