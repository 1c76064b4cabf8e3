"""Evaluation of registered generators (MLflow Model Registry) on a held evaluation set.

One MLflow run per (model version, evaluation fingerprint): the fingerprint covers the held
set's manifest and the sampler settings, seeds and sample count, so evaluating the same
version again finds its run and computes nothing (idempotent), while a changed evaluation set
or setting starts a new series. Each run holds the metrics per sampler setting
(``nfe<N>.cfg<s>.<metric>``), each guidance-free metric as a series over NFE (``<metric>``
at step = NFE), and the headline values (largest NFE, no guidance) as ``headline.<metric>``.
Metrics come from ``cafm_core.evaluation`` through the same loader as the pipeline's
evaluation stage (:func:`tasks.dataset_format.load_for_evaluation`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from cafm_core.evaluation import IMAGE_METRICS, POINT_METRICS, SamplerSetting, evaluate_generator, summarise_over_seeds
from tasks.dataset_format import load_for_evaluation, read_manifest
from tasks.storage import Store
from tasks.tracking import Tracker

KEY_TAG = "cafm.eval_fingerprint"
MODEL_TAG = "cafm.registered_model"
VERSION_TAG = "cafm.model_version"


@dataclass(frozen=True)
class VersionEvaluation:
    version: str
    run_id: str
    headline: dict[str, float]
    reused: bool


def evaluation_fingerprint(store: Store, data_url: str, settings: list[SamplerSetting], seeds: list[int],
                           num_samples: int | None) -> str:
    """What makes two evaluations comparable: the held set (its manifest) and the sampling."""
    manifest = read_manifest(store, data_url)  # a clear error when data_url holds no prepared dataset
    payload = json.dumps({"manifest": manifest, "settings": [s.to_dict() for s in settings], "seeds": list(seeds),
                          "num_samples": num_samples}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def alias_versions(tracker: Tracker, model_name: str) -> dict[str, str]:
    """``{"champion": version, "candidate": version}`` for the aliases that exist."""
    try:
        model = tracker.client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"no registered model {model_name!r} at {tracker.tracking_uri}; run the pipeline first ({exc.message})") from None
    aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
    return {role: aliases[role] for role in ("champion", "candidate") if role in aliases}


def _find_run(tracker: Tracker, model_name: str, version: str, fingerprint: str):
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=(f"tags.`{KEY_TAG}` = '{fingerprint}' and tags.`{MODEL_TAG}` = '{model_name}' "
                       f"and tags.`{VERSION_TAG}` = '{version}' and attributes.status = 'FINISHED'"),
        max_results=1,
    )
    return runs[0] if runs else None


def _headline(run) -> dict[str, float]:
    return {k.removeprefix("headline."): v for k, v in run.data.metrics.items() if k.startswith("headline.")}


def evaluate_version(tracker: Tracker, store: Store, *, model_name: str, version: str, data_url: str,
                     settings: list[SamplerSetting], seeds: list[int], num_samples: int | None,
                     fingerprint: str) -> VersionEvaluation:
    """The version's evaluation run: found when it exists, else computed and logged."""
    found = _find_run(tracker, model_name, version, fingerprint)
    if found is not None:
        return VersionEvaluation(version, found.info.run_id, _headline(found), reused=True)
    generator = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}").unwrap_python_model().model
    dataset, _, feature_net = load_for_evaluation(store, data_url)
    rows = evaluate_generator(generator, dataset, settings, feature_net=feature_net, num_samples=num_samples, seeds=seeds)
    keys = IMAGE_METRICS if dataset.kind == "image" else POINT_METRICS
    summary = summarise_over_seeds([{"model": f"v{version}", **row} for row in rows], keys)
    unguided = sorted((r for r in summary if r["cfg_scale"] == 1.0), key=lambda r: r["nfe"]) or summary
    headline = {k: float(v) for k, v in unguided[-1].items() if k in keys}
    tags = {KEY_TAG: fingerprint, MODEL_TAG: model_name, VERSION_TAG: version}
    params = {"data_url": data_url, "seeds": seeds, "num_samples": num_samples,
              "settings": [s.to_dict() for s in settings]}
    with tracker.run(f"{model_name}-v{version}", params, tags=tags) as run_id:
        for row in summary:
            tracker.log_summary_row(row)
        for row in unguided:
            tracker.log_metrics({k: row[k] for k in keys if k in row}, step=int(row["nfe"]))
        tracker.log_metrics(headline, prefix="headline.")
        tracker.log_dict({"rows": rows, "summary": summary}, "evaluation.json")
    return VersionEvaluation(version, run_id, headline, reused=False)


def trend(tracker: Tracker, model_name: str, fingerprint: str, metrics: list[str]) -> list[dict]:
    """Every evaluated version of the model on this evaluation set, oldest version first."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{fingerprint}' and tags.`{MODEL_TAG}` = '{model_name}' and attributes.status = 'FINISHED'",
        max_results=1000,
    )
    rows = []
    for run in runs:
        headline = _headline(run)
        rows.append({"version": run.data.tags[VERSION_TAG], **{m: round(headline[m], 6) for m in metrics if m in headline},
                     "mlflow_run": run.info.run_id})
    return sorted(rows, key=lambda r: int(r["version"]))


@task(name="evaluate-model-version", cache_policy=NONE)
def evaluate_version_task(tracking_uri: str, experiment: str, model_name: str, version: str, *, data_url: str,
                          settings: list[SamplerSetting], seeds: list[int], num_samples: int | None,
                          fingerprint: str) -> dict:
    """One registered version evaluated on the held set (or its earlier evaluation found)."""
    tracker = Tracker(tracking_uri, experiment)
    result = evaluate_version(tracker, Store(data_url), model_name=model_name, version=version, data_url=data_url,
                              settings=settings, seeds=seeds, num_samples=num_samples, fingerprint=fingerprint)
    get_run_logger().info("version %s: %s (%s)", version, result.headline,
                          "found its evaluation run" if result.reused else "evaluated")
    return {"version": result.version, "run_id": result.run_id, "headline": result.headline, "reused": result.reused}
