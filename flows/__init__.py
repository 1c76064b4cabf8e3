"""Prefect flows composing the pipeline's tasks into a DAG.

Dependencies point one way: ``flows -> tasks -> cafm_core``.
"""

from tasks import offline  # noqa: F401  (telemetry off before Prefect loads)
