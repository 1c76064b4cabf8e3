"""Scheduled evaluation of the registered generators: ``champion`` vs ``candidate``.

Each version is evaluated once per held evaluation set and sampler settings (its MLflow run
is found on later runs, so re-running for the same versions computes and logs nothing new),
the trend over every evaluated version is published as Prefect artifacts, the candidate is
promoted to champion when it is strictly better on the primary metric without regressing,
and the run fails (after publishing) when a watched metric of the candidate is worse than the
champion's by more than ``max_regression``. Deployed with a cron schedule in ``prefect.yaml``.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cafm_core.evaluation import ChampionDecision, decide_promotion
from flows.params import ModelEvaluationParams
from tasks.registry_evaluation import alias_versions, evaluate_version_task, evaluation_fingerprint, trend
from tasks.secrets import load_secret_blocks
from tasks.storage import Store, check_reachable
from tasks.tracking import Tracker, default_tracking_uri


class ModelRegression(RuntimeError):
    """The candidate is worse than the champion past the configured threshold."""


def _report(params: ModelEvaluationParams, roles: dict[str, str], results: dict[str, dict],
            decision: ChampionDecision | None, promoted: bool) -> str:
    lines = [f"# {params.registered_model}: champion vs candidate", "",
             f"Held evaluation set `{params.data_url}`; sampler {params.sampling.method}, NFE {params.sampling.nfes}, "
             f"seeds {params.seeds}; headline = largest NFE without guidance.", "",
             "| role | version | " + " | ".join(params.watched_metrics) + " |",
             "|---|---|" + "---|" * len(params.watched_metrics)]
    for role, version in roles.items():
        headline = results[version]["headline"]
        cells = [f"{headline[m]:.4g}" if m in headline else "" for m in params.watched_metrics]
        lines.append(f"| {role} | {version} | " + " | ".join(cells) + " |")
    lines.append("")
    if decision is None:
        lines.append("One version holds both roles (or only one role exists): nothing to compare.")
    elif decision.regressions:
        lines.append(f"**Regression**: {decision.describe(params.max_regression)}. Champion kept.")
    elif promoted:
        lines.append(f"Candidate is better on {params.primary_metric}: **promoted to champion**.")
    else:
        lines.append(f"Candidate is not better on {params.primary_metric}: champion kept.")
    if promoted and decision is None:
        lines.append("No champion existed: the candidate became the champion.")
    return "\n".join(lines) + "\n"


@flow(name="model-evaluation", log_prints=True)
def evaluate_registered(params: ModelEvaluationParams = ModelEvaluationParams()) -> dict:
    """Evaluate champion and candidate on the held set, publish the trend, promote or fail."""
    logger = get_run_logger()
    load_secret_blocks()  # credentials named in CAFM_SECRET_BLOCKS
    check_reachable_data(params.data_url)
    tracker = Tracker(params.tracking_uri or default_tracking_uri("outputs"), params.experiment)
    roles = alias_versions(tracker, params.registered_model)
    if not roles:
        raise ValueError(f"registered model {params.registered_model!r} has neither a 'champion' nor a 'candidate' alias")
    settings = params.sampling.sampler_settings()
    fingerprint = evaluation_fingerprint(Store(params.data_url), params.data_url, settings, params.seeds,
                                         params.sampling.num_samples)
    results = {
        version: evaluate_version_task(tracker.tracking_uri, params.experiment, params.registered_model, version,
                                       data_url=params.data_url, settings=settings, seeds=params.seeds,
                                       num_samples=params.sampling.num_samples, fingerprint=fingerprint)
        for version in sorted(set(roles.values()), key=int)
    }

    decision, promoted = None, False
    champion, candidate = roles.get("champion"), roles.get("candidate")
    if champion is not None and candidate is not None and champion != candidate:
        decision = decide_promotion(results[champion]["headline"], results[candidate]["headline"],
                                    primary=params.primary_metric, watched=params.watched_metrics,
                                    max_regression=params.max_regression)
        promoted = decision.promote
    elif champion is None:
        promoted = True  # the first candidate becomes the champion
    if promoted:
        tracker.client.set_registered_model_alias(params.registered_model, "champion", candidate)
        logger.info("promoted version %s of %s to champion", candidate, params.registered_model)

    metrics = list(dict.fromkeys([params.primary_metric, *params.watched_metrics]))
    history = trend(tracker, params.registered_model, fingerprint, metrics)
    now = alias_versions(tracker, params.registered_model)
    for row in history:
        row["role"] = ", ".join(role for role, version in now.items() if version == row["version"])
    create_table_artifact(key="model-trend", table=history,
                          description=f"{params.registered_model}: headline metrics of every evaluated version on {params.data_url}")
    report = _report(params, roles, results, decision, promoted)
    create_markdown_artifact(key="model-evaluation", markdown=report, description="champion vs candidate")
    print(report)
    if decision is not None and decision.regressions:
        raise ModelRegression(decision.describe(params.max_regression))
    return {"roles": now, "evaluated": roles, "promoted": promoted, "trend": history,
            "computed": [v for v, r in results.items() if not r["reused"]], "fingerprint": fingerprint}


def check_reachable_data(data_url: str) -> None:
    """The held set's storage must be readable before any model is loaded."""
    if "://" in data_url:
        bucket_root = "s3://" + data_url[len("s3://"):].split("/", 1)[0]
        check_reachable(bucket_root)
