"""Prefect flows composing the pipeline's tasks into a DAG (built in the pipeline issue).

Dependencies point one way: ``flows -> tasks -> cafm_core``.
"""
