"""The CAFM pipeline as Prefect flows: prepare -> FM pretrain -> CAFM post-train -> sample -> evaluate.

``pipeline`` runs the whole DAG, passing each stage's outputs to the next task (the
Prefect run graph shows the dependencies). Every stage is also a flow of its own, usable
alone: it finds its inputs' outputs in storage (``tasks.stage_ledger``). A rerun with the
same parameters skips complete stages; a stage folder made with other parameters is never
silently overwritten. Every flow holds the run's lease (``tasks.run_lease``) from its
preflight to its end, so two runs of one ``run_name`` never write into the same folders.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow
from prefect.runtime import flow_run

from cafm_core.features import load_inception_features
from flows.params import PipelineParams
from flows.run_layout import RunLayout, tracking_uri
from tasks.code_version import code_tags, describe_code
from tasks.pipeline_stages import evaluate_task, posttrain_task, prepare_task, pretrain_task, sample_task
from tasks.run_lease import RunLease, describe_holder
from tasks.run_tracking import RunTracking
from tasks.secrets import load_secret_blocks
from tasks.storage import Store, check_reachable
from tasks.tracking import Tracker, ui_command

__all__ = ["evaluate_flow", "evaluate_stage", "holding_run", "pipeline", "posttrain_flow", "posttrain_stage", "preflight",
           "prepare_flow", "prepare_stage", "pretrain_flow", "pretrain_stage", "run_lease", "sample_flow", "sample_stage"]


def run_lease(params: PipelineParams) -> RunLease:
    """The lease on ``<storage_root>/<run_name>`` (``tasks.run_lease``), naming this flow run."""
    store = Store(params.storage_root)
    return RunLease(store, store.url(params.run_name), run_name=params.run_name, flow_run_id=flow_run.get_id())


def preflight(params: PipelineParams, lease: RunLease | None = None) -> dict:
    """Before any compute: secrets loaded, storage and MLflow reachable (clear errors now),
    the run's ``lease`` taken when given (``RunLeaseHeld`` names the live run holding it),
    then what an earlier attempt of this run left unlogged or RUNNING is put right
    (``RunTracking.replay_unlogged``, whose result this returns)."""
    load_secret_blocks()  # credentials named in CAFM_SECRET_BLOCKS, before anything touches storage
    check_reachable(params.storage_root)
    if params.inception_weights:
        load_inception_features(params.inception_weights)  # a clear error now, not after training
    # raises TrackingError with the URI if the store is unusable now (later outages are buffered)
    Tracker(tracking_uri(params), params.experiment)
    if lease is not None:
        lease.acquire()  # before anything is written under the run
    return RunLayout(params).tracking.replay_unlogged()


@contextmanager
def holding_run(params: PipelineParams) -> Iterator[dict]:
    """:func:`preflight` with the run's lease, held until the block ends, however it ends
    (a killed process leaves it behind; the next run takes it over: its owner is gone).
    Yields the preflight's result."""
    lease = run_lease(params)
    try:
        result = preflight(params, lease)
        if lease.took_over is not None:
            print(f"took over the lease {lease.url} that a stopped run left: {describe_holder(lease.took_over)}")
        yield result
    finally:
        lease.release()  # nothing when it was never taken


# ---- one task call per stage, from the parameters: the same in the DAG, the single-stage
# flows and the sweep ------------------------------------------------------------------------


def _cached(stage_task, layout: RunLayout):
    """The stage task with its results persisted beside the run (Prefect's cache: a reused
    stage shows as Cached)."""
    return stage_task.with_options(result_storage=layout.result_storage)


def prepare_stage(params: PipelineParams, layout: RunLayout, tracking: RunTracking) -> dict:
    return _cached(prepare_task, layout)(layout.folder("data"), params.data.model_dump(), params.seed, tracking)


def pretrain_stage(params: PipelineParams, layout: RunLayout, tracking: RunTracking, data: dict) -> dict:
    return _cached(pretrain_task, layout)(layout.folder("fm"), data, params.model.model_dump(),
                                          params.fm.core_config(params.seed), params.compute.settings(), tracking)


def posttrain_stage(params: PipelineParams, layout: RunLayout, tracking: RunTracking, data: dict, fm: dict | None) -> dict:
    curve = None
    if params.cafm.curve_samples:
        curve = {"method": params.sampling.method, "nfe": min(params.sampling.nfes),
                 "num_samples": params.cafm.curve_samples, "seed": params.seed}
    start = {"from_scratch": params.model.model_dump()} if params.cafm.from_scratch else {}
    return _cached(posttrain_task, layout)(layout.folder("cafm"), data, None if params.cafm.from_scratch else fm,
                                           params.cafm.core_config(params.seed), params.compute.settings(), tracking,
                                           init_checkpoint=params.cafm.init_checkpoint, curve=curve, **start)


def sample_stage(params: PipelineParams, layout: RunLayout, data: dict, fm: dict, cafm: dict | None) -> dict:
    generators = {"fm": fm} if cafm is None else {"fm": fm, "cafm": cafm}
    return _cached(sample_task, layout)(layout.folder("samples"), data, generators,
                                        params.sampling.evaluation(params.eval_seeds), params.compute.settings())


def evaluate_stage(params: PipelineParams, layout: RunLayout, tracking: RunTracking, data: dict, samples: dict,
                   cafm: dict | None) -> dict:
    registration = None
    if cafm is not None:
        registration = {"model_name": params.registered_model, "cafm": cafm, "rule": params.promotion.rule(),
                        "tags": {"run_name": params.run_name, "data": params.data.source}}
    return _cached(evaluate_task, layout)(layout.folder("eval"), data, samples,
                                          params.sampling.evaluation(params.eval_seeds), tracking,
                                          logged=params.sampling.model_dump(), inception_weights=params.inception_weights,
                                          registration=registration)


# ---- flows ---------------------------------------------------------------------------------


@flow(name="cafm-pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    """The whole DAG; returns where the results are and the FM-vs-CAFM table."""
    print(describe_code())  # where this run's code came from (a deployment's: the worker's clone)
    with holding_run(params):
        layout = RunLayout(params)
        variant = layout.record_variant()
        tracker = layout.tracking.tracker
        logged = {"run_name": params.run_name, "storage_root": params.storage_root, "seed": params.seed}
        with tracker.run(f"pipeline-{params.run_name}", logged, tags={**layout.tracking.tags, **code_tags()}) as parent_id:
            tracking = layout.tracking.under(parent_id)
            data = prepare_stage(params, layout, tracking)
            fm = pretrain_stage(params, layout, tracking, data)
            cafm = posttrain_stage(params, layout, tracking, data, fm) if params.cafm.enabled else None
            samples = sample_stage(params, layout, data, fm, cafm)
            evaluation = evaluate_stage(params, layout, tracking, data, samples, cafm)
        result = {"run_url": layout.base, "variant": layout.variant, "changes": variant["changes"],
                  "stages": layout.stage_fingerprints(), "data": data["data_url"], "fm": fm["model_url"],
                  "cafm": cafm["model_url"] if cafm else None, "samples": samples["count"],
                  "report": evaluation["report_url"], "table": evaluation["table"],
                  "registered": evaluation["registered"], "protocol_id": evaluation.get("protocol_id"), "mlflow_run_id": parent_id,
                  "prefect_flow_run_id": flow_run.get_id(),
                  "tracking_uri": tracker.tracking_uri, "tracking_unlogged": layout.tracking.note_unlogged()}
        print(f"\n{evaluation['table']}\n")
        print(f"variant {layout.variant} of run {params.run_name!r}; settings that differ from its first variant: "
              f"{layout.tracking.variant_changes}  (all variants: cafm-pipeline list --run {params.run_name})")
        if evaluation["registered"]:
            print(evaluation["registered"]["summary"])
        print(f"results under {layout.base} (report: {evaluation['report_url']}); evaluation protocol "
              f"{evaluation.get('protocol_id', 'not recorded')}; MLflow: {tracker.tracking_uri}, run {parent_id}")
        print(f"open the MLflow UI: {ui_command(tracker.tracking_uri)}   (or: make ui)")
    return result


@flow(name="prepare", log_prints=True)
def prepare_flow(params: PipelineParams = PipelineParams()) -> dict:
    with holding_run(params):
        layout = RunLayout(params)
        return prepare_stage(params, layout, layout.tracking)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(params: PipelineParams = PipelineParams()) -> dict:
    with holding_run(params):
        layout = RunLayout(params)
        return pretrain_stage(params, layout, layout.tracking, layout.folder("data").require())


@flow(name="posttrain", log_prints=True)
def posttrain_flow(params: PipelineParams = PipelineParams()) -> dict:
    with holding_run(params):
        layout = RunLayout(params)
        fm = None if params.cafm.init_checkpoint or params.cafm.from_scratch else layout.folder("fm").require()
        return posttrain_stage(params, layout, layout.tracking, layout.folder("data").require(), fm)


@flow(name="sample", log_prints=True)
def sample_flow(params: PipelineParams = PipelineParams()) -> dict:
    with holding_run(params):
        layout = RunLayout(params)
        cafm = layout.folder("cafm").require() if params.cafm.enabled else None
        return sample_stage(params, layout, layout.folder("data").require(), layout.folder("fm").require(), cafm)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: PipelineParams = PipelineParams()) -> dict:
    with holding_run(params):
        layout = RunLayout(params)
        cafm = layout.folder("cafm").require() if params.cafm.enabled else None
        return evaluate_stage(params, layout, layout.tracking, layout.folder("data").require(),
                              layout.folder("samples").require(), cafm)
