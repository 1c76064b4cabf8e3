"""Secrets from Prefect Secret blocks into the environment, for the processes that read them.

``CAFM_SECRET_BLOCKS`` (set on the worker, or in a deployment's ``job_variables.env``) maps
environment variables to Secret block names, e.g.
``AWS_ACCESS_KEY_ID=s3-key-id,AWS_SECRET_ACCESS_KEY=s3-secret-key``. Each variable not already
set is filled from its block at the start of a flow, so s3fs, MLflow and the Ray workers
(which get ``AWS_*`` through their runtime environment) read it like any other environment
credential. Only names are ever logged, never values; the mapping holds names only.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

SECRET_BLOCKS_ENV = "CAFM_SECRET_BLOCKS"


def parse_mapping(text: str) -> dict[str, str]:
    """``"VAR=block,VAR2=block2"`` -> ``{"VAR": "block", ...}``; a clear error for bad entries."""
    mapping = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        variable, sep, block = entry.partition("=")
        if not sep or not variable.strip() or not block.strip():
            raise ValueError(f"{SECRET_BLOCKS_ENV}: expected VARIABLE=block-name entries, got {entry!r}")
        mapping[variable.strip()] = block.strip()
    return mapping


def load_secret_blocks() -> list[str]:
    """Fill unset variables named in ``CAFM_SECRET_BLOCKS`` from Prefect Secret blocks;
    returns the variables filled (names only)."""
    mapping = parse_mapping(os.environ.get(SECRET_BLOCKS_ENV, ""))
    wanted = {var: block for var, block in mapping.items() if not os.environ.get(var)}
    if not wanted:
        return []
    from prefect.blocks.system import Secret

    filled = []
    for variable, block in wanted.items():
        try:
            value = Secret.load(block).get()
        except ValueError as exc:  # Prefect: no such block
            raise ValueError(f"{SECRET_BLOCKS_ENV}: cannot load Secret block {block!r} for {variable}: {exc}") from None
        os.environ[variable] = str(value)
        filled.append(variable)
    log.info("environment filled from Prefect Secret blocks: %s", ", ".join(filled))
    return filled
