"""Prefect tasks and Ray Train loops: thin adapters that load inputs from storage, call
``cafm_core``, write outputs to storage and log to MLflow (built in the pipeline issue).
"""
