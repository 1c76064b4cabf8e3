"""MLflow tracking for the pipeline: one parent run per pipeline run, a nested run per stage.

Only plain parameters are logged; anything that looks like a secret (keys, tokens,
passwords, credentials) is refused, and storage credentials never appear here at all:
they come from the environment. The post-trained generator is registered in the Model
Registry with alias ``candidate``; ``champion`` moves only when evaluation says so.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient

log = logging.getLogger(__name__)

SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential", "api_key")
MLFLOW_MODEL_CODE = str(Path(__file__).with_name("mlflow_model.py"))


class TrackingError(RuntimeError):
    """The MLflow store cannot be used (unreachable server, bad URI)."""


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


def flat_params(params: Mapping) -> dict[str, str]:
    """Nested parameters as ``a.b.c -> str``; refuses keys that look like secrets."""
    flat: dict = {}
    _flatten("", params, flat)
    leaked = [k for k in flat if any(m in k.lower() for m in SECRET_MARKERS)]
    if leaked:
        raise ValueError(f"refusing to log parameters that look like secrets: {leaked}")
    return {k: str(v)[:500] for k, v in flat.items()}


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail early, with the URI in the message, when the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).read()
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable: {exc}") from exc
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)


class Tracker:
    """Thin wrapper around MLflow's fluent API for the pipeline's run structure."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        check_tracking_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        try:
            existing = mlflow.get_experiment_by_name(experiment)
            if existing is None and tracking_uri.startswith("sqlite:///"):
                # keep artifacts beside the SQLite store, not in the current directory
                artifacts = Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts"
                mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri())
            self.experiment_id = mlflow.set_experiment(experiment).experiment_id
        except Exception as exc:  # noqa: BLE001 - any store error is reported the same way
            raise TrackingError(f"cannot use MLflow experiment {experiment!r} at {tracking_uri}: {exc}") from exc
        self.client = MlflowClient(tracking_uri)

    @contextmanager
    def run(self, name: str, params: Mapping | None = None, *, parent_run_id: str | None = None,
            tags: Mapping | None = None) -> Iterator[str]:
        """Start a run (nested under ``parent_run_id`` when given); yields its id."""
        nested = parent_run_id is not None or mlflow.active_run() is not None
        with mlflow.start_run(run_name=name, nested=nested, parent_run_id=parent_run_id,
                              experiment_id=self.experiment_id, tags=dict(tags or {})) as active:
            if params:
                mlflow.log_params(flat_params(params))
            yield active.info.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, prefix: str = "") -> None:
        numeric = {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    def log_summary_row(self, row: Mapping, prefix: str = "") -> None:
        """One evaluation summary row (a model at a sampler setting) as metrics named
        ``<prefix>nfe<N>.cfg<s>.<metric>``."""
        setting = f"{prefix}nfe{row['nfe']}.cfg{row['cfg_scale']:g}."
        self.log_metrics({k: v for k, v in row.items() if k not in ("model", "method", "nfe", "cfg_scale", "seeds")},
                         prefix=setting)

    def log_history(self, rows, prefix: str = "") -> None:
        """Log training rows (each with a ``step``) as metric series."""
        for row in rows:
            self.log_metrics(row, step=int(row.get("step", 0)), prefix=prefix)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        mlflow.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        mlflow.log_image(image, artifact_file=artifact_file)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        mlflow.log_artifacts(local_dir, artifact_path)

    def register_generator(self, checkpoint_dir: str, model_name: str, *, tags: Mapping | None = None) -> str:
        """Log the generator as a pyfunc model (from code) and register it; alias ``candidate``."""
        info = mlflow.pyfunc.log_model(
            name="generator",
            python_model=MLFLOW_MODEL_CODE,
            artifacts={"checkpoint": checkpoint_dir},
            pip_requirements=["torch", "safetensors", "numpy"],
        )
        version = mlflow.register_model(info.model_uri, model_name, tags=dict(tags or {})).version
        self.client.set_registered_model_alias(model_name, "candidate", version)
        return str(version)

    def model_metric(self, model_name: str, alias: str, metric_tag: str) -> float | None:
        try:
            version = self.client.get_model_version_by_alias(model_name, alias)
        except Exception:  # noqa: BLE001 - no such alias yet
            return None
        value = version.tags.get(metric_tag)
        return float(value) if value is not None else None

    def promote_if_better(self, model_name: str, version: str, metric_tag: str, value: float) -> bool:
        """Tag ``version`` with its metric; move ``champion`` to it if lower than the champion's."""
        self.client.set_model_version_tag(model_name, version, metric_tag, str(value))
        champion = self.model_metric(model_name, "champion", metric_tag)
        if champion is None or value < champion:
            self.client.set_registered_model_alias(model_name, "champion", version)
            return True
        return False


def default_tracking_uri(root: str) -> str:
    """A local SQLite store beside the outputs when no server is configured."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # beside local outputs; for remote storage, in ./outputs of the machine running the flow
    base = Path(root if "://" not in root else "outputs").expanduser().resolve()
    return f"sqlite:///{base / 'mlflow.db'}"
