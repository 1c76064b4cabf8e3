"""Scheduled evaluation of the registered generators: ``champion`` vs ``candidate``.

Both versions are evaluated under one evaluation protocol (the held set, its frozen feature
network, the sampler settings, sample count and seeds; ``cafm_core.protocol``): each once
per protocol (its MLflow run, tagged with the protocol id, is found on later runs, so
re-running for the same versions computes nothing new; the pipeline records its candidate's
run under the same protocol). The trend over every version evaluated under that protocol is
published as Prefect artifacts, the one promotion rule (``tasks.promotion``) moves
``champion``, and the run fails (after publishing) when a watched metric of the candidate is
worse than the champion's by more than ``max_regression``. Deployed with a cron schedule in
``prefect.yaml``.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cafm_core.protocol import EvaluationProtocol
from flows.params import ModelEvaluationParams
from tasks.code_version import describe_code
from tasks.dataset_format import evaluation_protocol, resolve_dataset_url
from tasks.promotion import PromotionOutcome, promote
from tasks.registry_evaluation import alias_versions, evaluate_version_task, trend
from tasks.secrets import load_secret_blocks
from tasks.storage import Store, check_reachable
from tasks.tracking import Tracker, default_tracking_uri

__all__ = ["ModelRegression", "evaluate_registered"]


class ModelRegression(RuntimeError):
    """The candidate is worse than the champion past the configured threshold."""


def _report(params: ModelEvaluationParams, protocol: EvaluationProtocol, roles: dict[str, str],
            results: dict[str, dict], outcome: PromotionOutcome) -> str:
    watched = list(outcome.rule.watched)
    lines = [f"# {params.registered_model}: champion vs candidate", "",
             f"Evaluation protocol `{protocol.id}`: held set `{protocol.data_url}` ({protocol.dataset_name}, "
             f"`{protocol.dataset[:12]}`), sampler {params.sampling.method}, NFE {params.sampling.nfes}, "
             f"{protocol.num_samples} samples, seeds {params.seeds}; headline = largest NFE without guidance.", "",
             "| role | version | " + " | ".join(watched) + " |",
             "|---|---|" + "---|" * len(watched)]
    for role, version in roles.items():
        headline = results[version]["headline"]
        cells = [f"{headline[m]:.4g}" if m in headline else "" for m in watched]
        lines.append(f"| {role} | {version} | " + " | ".join(cells) + " |")
    lines += ["", outcome.describe()]
    return "\n".join(lines) + "\n"


@flow(name="model-evaluation", log_prints=True)
def evaluate_registered(params: ModelEvaluationParams = ModelEvaluationParams()) -> dict:
    """Evaluate champion and candidate under one protocol, publish the trend, promote or fail."""
    logger = get_run_logger()
    logger.info("%s", describe_code())  # where this run's code came from (a deployment's: the worker's clone)
    load_secret_blocks()  # credentials named in CAFM_SECRET_BLOCKS
    check_reachable_data(params.data_url)
    tracker = Tracker(params.tracking_uri or default_tracking_uri(), params.experiment)
    roles = alias_versions(tracker, params.registered_model)
    if not roles:
        raise ValueError(f"registered model {params.registered_model!r} has neither a 'champion' nor a 'candidate' alias")
    store = Store(params.data_url)
    held_set = resolve_dataset_url(store, params.data_url)  # a run's data stage folder names its dataset
    protocol = evaluation_protocol(store, held_set, **params.evaluation())
    logger.info("%s", protocol.describe())
    results = {
        version: evaluate_version_task(tracker.tracking_uri, params.experiment, params.registered_model, version,
                                       protocol.to_dict())
        for version in sorted(set(roles.values()), key=int)
    }
    outcome = promote(tracker, params.registered_model, roles,
                      {version: result["headline"] for version, result in results.items()}, params.promotion.rule(),
                      kind=protocol.kind)
    rule = outcome.rule
    if outcome.promoted:
        logger.info("promoted version %s of %s to champion", outcome.candidate, params.registered_model)

    metrics = list(dict.fromkeys([rule.primary, *rule.watched]))
    history = trend(tracker, params.registered_model, protocol.id, metrics)
    now = alias_versions(tracker, params.registered_model)
    for row in history:
        row["role"] = ", ".join(role for role, version in now.items() if version == row["version"])
    create_table_artifact(key="model-trend", table=history,
                          description=f"{params.registered_model}: headline metrics of every version evaluated under "
                                      f"protocol {protocol.id} ({protocol.data_url})")
    report = _report(params, protocol, roles, results, outcome)
    create_markdown_artifact(key="model-evaluation", markdown=report, description="champion vs candidate")
    print(report)
    if outcome.decision is not None and outcome.decision.regressions:
        raise ModelRegression(outcome.decision.describe(rule.max_regression))
    return {"roles": now, "evaluated": roles, "promoted": outcome.promoted, "trend": history,
            "computed": [v for v, r in results.items() if not r["reused"]], "protocol_id": protocol.id}


def check_reachable_data(data_url: str) -> None:
    """The held set's storage must be readable before any model is loaded."""
    if "://" in data_url:
        bucket_root = "s3://" + data_url[len("s3://"):].split("/", 1)[0]
        check_reachable(bucket_root)
