"""Registered generators (MLflow Model Registry) evaluated under an evaluation protocol.

One MLflow run per (model version, protocol id): evaluating the same version under the same
protocol again finds its run and computes nothing (idempotent), while another protocol (held
set, feature network, sampler settings, seeds, sample count) starts another series, never
compared with this one. Each run holds the metrics per sampler setting
(``nfe<N>.cfg<s>.<metric>``), each guidance-free metric as a series over NFE (``<metric>``
at step = NFE), and the headline values (largest NFE, no guidance) as ``headline.<metric>``.

A registered generator's weights are read from the safetensors checkpoint logged with it;
no code logged with a model is ever executed here.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from cafm_core.checkpoint import load_checkpoint, model_from_checkpoint
from cafm_core.evaluation import IMAGE_METRICS, POINT_METRICS, summarise_over_seeds
from cafm_core.protocol import EvaluationProtocol, evaluate_under
from tasks.dataset_format import load_for_protocol
from tasks.storage import Store
from tasks.tracking import DATASET_TAG, PROTOCOL_TAG, Tracker

__all__ = ["MODEL_EVALUATION_EXPERIMENT", "MODEL_TAG", "VERSION_TAG", "VersionEvaluation", "alias_versions", "evaluate_version",
           "evaluate_version_task", "load_registered_generator", "record_version_evaluation", "resolve_version", "trend"]

MODEL_EVALUATION_EXPERIMENT = "cafm-model-evaluation"  # where every registered version's evaluation runs live
MODEL_TAG = "cafm.registered_model"
VERSION_TAG = "cafm.model_version"


@dataclass(frozen=True)
class VersionEvaluation:
    version: str
    run_id: str
    headline: dict[str, float]
    reused: bool


def alias_versions(tracker: Tracker, model_name: str) -> dict[str, str]:
    """``{"champion": version, "candidate": version}`` for the aliases that exist."""
    try:
        model = tracker.client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"no registered model {model_name!r} at {tracker.tracking_uri}; run the pipeline first ({exc.message})") from None
    aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
    return {role: aliases[role] for role in ("champion", "candidate") if role in aliases}


def resolve_version(client: mlflow.MlflowClient, reference: str) -> tuple[str, str]:
    """``name@alias`` or ``name/version`` (or ``name``: its champion) -> ``(name, version)``."""
    if "@" in reference:
        name, alias = reference.split("@", 1)
    elif "/" in reference:
        name, version = reference.rsplit("/", 1)
        try:
            client.get_model_version(name, version)
        except mlflow.exceptions.MlflowException as exc:
            raise ValueError(f"no version {version!r} of registered model {name!r} ({exc.message})") from None
        return name, version
    else:
        name, alias = reference, "champion"
    try:
        return name, str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"no version of {name!r} has the alias {alias!r} ({exc.message})") from None


def load_registered_generator(client: mlflow.MlflowClient, model_name: str, version: str) -> tuple[torch.nn.Module, str | None]:
    """The generator of a registered version, from its logged safetensors checkpoint (the
    model's Python file is not executed), and the dataset identity it was trained on."""
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=scratch,
                                                         tracking_uri=client.tracking_uri))
        markers = sorted(local.rglob("checkpoint.json"))
        if not markers:
            raise ValueError(f"registered model {model_name} version {version} holds no generator checkpoint")
        tensors, config, metadata = load_checkpoint(markers[0].parent)
    model = model_from_checkpoint(tensors, config, metadata).eval()
    tags = client.get_model_version(model_name, version).tags or {}
    return model, tags.get(DATASET_TAG) or metadata.get("dataset")


def _find_run(tracker: Tracker, model_name: str, version: str, protocol_id: str):
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=(f"tags.`{PROTOCOL_TAG}` = '{protocol_id}' and tags.`{MODEL_TAG}` = '{model_name}' "
                       f"and tags.`{VERSION_TAG}` = '{version}' and attributes.status = 'FINISHED'"),
        max_results=1,
    )
    return runs[0] if runs else None


def _headline(run) -> dict[str, float]:
    return {k.removeprefix("headline."): v for k, v in run.data.metrics.items() if k.startswith("headline.")}


def record_version_evaluation(tracker: Tracker, protocol: EvaluationProtocol, model_name: str, version: str,
                              rows: list[dict], *, parent_run_id: str | None = None) -> VersionEvaluation:
    """Log a version's rows under ``protocol`` (computed here or by the pipeline's sample
    shards: the same numbers) as its evaluation run; returns the headline."""
    keys = tuple(k for k in (*IMAGE_METRICS, *POINT_METRICS) if any(k in row for row in rows))
    summary = summarise_over_seeds([{**row, "model": f"v{version}"} for row in rows], keys)
    unguided = sorted((r for r in summary if r["cfg_scale"] == 1.0), key=lambda r: r["nfe"]) or summary
    headline = {k: float(v) for k, v in unguided[-1].items() if k in keys}
    tags = {PROTOCOL_TAG: protocol.id, MODEL_TAG: model_name, VERSION_TAG: version, DATASET_TAG: protocol.dataset}
    params = {"protocol": protocol.to_dict()}
    with tracker.run(f"{model_name}-v{version}", params, parent_run_id=parent_run_id, tags=tags) as run_id:
        for row in summary:
            tracker.log_summary_row(row)
        for row in unguided:
            tracker.log_metrics({k: row[k] for k in keys if k in row}, step=int(row["nfe"]))
        tracker.log_metrics(headline, prefix="headline.")
        tracker.log_dict({"protocol_id": protocol.id, "protocol": protocol.to_dict(), "rows": rows,
                          "summary": summary}, "evaluation.json")
    return VersionEvaluation(version, run_id, headline, reused=False)


def evaluate_version(tracker: Tracker, protocol: EvaluationProtocol, model_name: str, version: str, *,
                     parent_run_id: str | None = None) -> VersionEvaluation:
    """The version's evaluation run under ``protocol``: found when it exists, else computed
    in this process (``cafm_core.protocol.evaluate_under``) and logged. A version trained on
    other data than the protocol's held set is refused (``CAFMInputError``), not scored."""
    found = _find_run(tracker, model_name, version, protocol.id)
    if found is not None:
        return VersionEvaluation(version, found.info.run_id, _headline(found), reused=True)
    generator, trained_on = load_registered_generator(tracker.client, model_name, version)
    reference = load_for_protocol(Store(protocol.data_url), protocol)  # at most 50,000 real rows
    rows = evaluate_under(protocol, {f"v{version}": generator}, reference.dataset, feature_net=reference.feature_net,
                          trained_on={f"v{version}": trained_on}, real_stats=reference.stats)
    return record_version_evaluation(tracker, protocol, model_name, version, rows, parent_run_id=parent_run_id)


def trend(tracker: Tracker, model_name: str, protocol_id: str, metrics: list[str]) -> list[dict]:
    """Every version of the model evaluated under this protocol, oldest version first."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=(f"tags.`{PROTOCOL_TAG}` = '{protocol_id}' and tags.`{MODEL_TAG}` = '{model_name}' "
                       "and attributes.status = 'FINISHED'"),
        max_results=1000,
    )
    rows = []
    for run in runs:
        headline = _headline(run)
        rows.append({"version": run.data.tags[VERSION_TAG], **{m: round(headline[m], 6) for m in metrics if m in headline},
                     "mlflow_run": run.info.run_id})
    return sorted(rows, key=lambda r: int(r["version"]))


@task(name="evaluate-model-version", cache_policy=NONE)
def evaluate_version_task(tracking_uri: str, experiment: str, model_name: str, version: str, protocol: dict) -> dict:
    """One registered version evaluated under the protocol (or its earlier evaluation found)."""
    tracker = Tracker(tracking_uri, experiment)
    result = evaluate_version(tracker, EvaluationProtocol.from_dict(protocol), model_name, version)
    get_run_logger().info("version %s: %s (%s)", version, result.headline,
                          "found its evaluation run" if result.reused else "evaluated")
    return {"version": result.version, "run_id": result.run_id, "headline": result.headline, "reused": result.reused}
