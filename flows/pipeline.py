"""The CAFM pipeline as Prefect flows: prepare -> FM pretrain -> CAFM post-train -> sample -> evaluate.

Every stage reads its inputs from storage and writes its outputs under
``<storage_root>/<run_name>/<stage>/``, ending with ``_COMPLETE.json`` (written last, with a
fingerprint of the parameters that made it). A rerun with the same parameters skips
complete stages; a stage folder made with other parameters is never silently overwritten.
Each stage is also a flow of its own, usable alone (it finds its inputs in storage).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path

from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.exceptions import MissingContextError

from cafm_core.evaluation import SamplerSetting, labels_in_proportion
from cafm_core.features import load_inception_features
from cafm_core.models import MLPConfig, dit_config
from cafm_core.plots import training_curves
from flows.params import PipelineParams
from tasks.evaluate import evaluate_stage, headline
from tasks.prepare import prepare_dataset
from tasks.prepare import shard_urls as prepared_shard_urls
from tasks.sampling import generate_sample_shards
from tasks.secrets import load_secret_blocks
from tasks.storage import Store, check_reachable
from tasks.tracking import OWNER_PID_TAG, Tracker, default_tracking_uri, owner_state
from tasks.train import run_cafm, run_flow_matching, start_cluster, worker_cpus

STAGES = ("data", "fm", "cafm", "samples", "eval")


class StageMismatch(RuntimeError):
    """A stage folder holds outputs made with other parameters."""


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


RUN_URL_TAG = "cafm.run_url"


class Run:
    """Where one pipeline run's stages live, and their fingerprints."""

    def __init__(self, params: PipelineParams) -> None:
        self.params = params
        self.store = Store(params.storage_root)
        self.base = self.store.url(params.run_name)
        self.tags = {RUN_URL_TAG: self.base}  # on every MLflow run of this pipeline run

    def url(self, stage: str, *parts: str) -> str:
        return Store.join(self.base, stage, *parts)

    def fingerprint(self, stage: str) -> str:
        p = self.params
        data = _fingerprint(p.data.model_dump(), p.seed)
        fm = _fingerprint(data, p.model.model_dump(), p.fm.model_dump(), p.compute.num_workers)
        cafm = _fingerprint(fm if p.cafm.init_checkpoint is None else p.cafm.init_checkpoint,
                            p.cafm.model_dump(exclude={"curve_samples"}))  # the curve changes no weight
        samples = _fingerprint(fm, cafm, p.sampling.model_dump(), p.eval_seeds)
        evaluation = _fingerprint(samples, data, p.inception_weights)
        return {"data": data, "fm": fm, "cafm": cafm, "samples": samples, "eval": evaluation}[stage]

    def completed(self, stage: str) -> dict | None:
        """The stage's outputs if complete with these parameters; error if made with others."""
        record = self.store.completed(self.url(stage))
        if record is None:
            return None
        done = record["outputs"]
        if done.get("fingerprint") != self.fingerprint(stage):
            raise StageMismatch(
                f"{self.url(stage)} is complete but was made with other parameters "
                f"(fingerprint {done.get('fingerprint')} != {self.fingerprint(stage)}); "
                "use another run_name, or remove that folder to recompute it"
            )
        return done["outputs"]

    def require(self, stage: str) -> dict:
        outputs = self.completed(stage)
        if outputs is None:
            raise RuntimeError(f"stage {stage!r} has no complete output at {self.url(stage)}; run it first")
        return outputs

    def complete(self, stage: str, outputs: dict) -> dict:
        self.store.mark_complete(self.url(stage), {"fingerprint": self.fingerprint(stage), "outputs": outputs})
        return outputs


def _ray(params: PipelineParams) -> None:
    compute = params.compute
    start_cluster(compute.num_workers, worker_cpus(compute.num_workers, compute.cpus_per_worker), compute.use_gpu)


_TRACKERS: dict[tuple[str, str], Tracker] = {}


def _tracker(params: PipelineParams) -> Tracker:
    """This process's tracker for the run's MLflow store, shared by the stages so that what
    one stage could not log (server unavailable) is sent by a later one."""
    uri = params.tracking_uri or default_tracking_uri(params.storage_root)
    if (uri, params.experiment) not in _TRACKERS:
        _TRACKERS[uri, params.experiment] = Tracker(uri, params.experiment, strict=False)
    return _TRACKERS[uri, params.experiment]


UNLOGGED_FILE = "tracking_unlogged.json"


def _log() -> logging.Logger:
    """The Prefect run logger inside a flow (shown in the UI), else this module's logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def replay_unlogged(params: PipelineParams) -> dict:
    """Send what an earlier attempt of this run could not log (``<run>/tracking_unlogged.json``:
    it stopped while MLflow was down), then end the MLflow runs a killed attempt left RUNNING.
    Runs at the start of every flow (and as ``cafm-pipeline replay-tracking``); a record whose
    process is still alive is left to that process."""
    run, tracker = Run(params), _tracker(params)
    url = Store.join(run.base, UNLOGGED_FILE)
    result = {"record": url, "found": run.store.exists(url), "replayed": 0, "left": 0}
    if result["found"]:
        record = json.loads(run.store.read_bytes(url))
        if owner_state(record) == "alive":
            _log().info("%s belongs to the live process %s: left to it", url, record[OWNER_PID_TAG])
            result["left"] = len(record["items"])
        else:
            sent = tracker.replay(record)
            result["replayed"] = len(record["items"]) if sent else 0
            result["left"] = 0 if sent else len(tracker.pending)
            _note_unlogged(run, tracker)  # removes the file, or rewrites it with what is still queued
            _log().warning("%s: %s item(s) an earlier attempt could not log %s", url, len(record["items"]),
                           "are now in MLflow" if sent else f"are still queued ({tracker.last_error})")
    result["ended_runs"] = tracker.end_orphaned_runs(RUN_URL_TAG, run.base)
    return result


def _note_unlogged(run: Run, tracker: Tracker) -> list[dict]:
    """After a stage: what MLflow has not received yet, with its values, in
    ``<run>/tracking_unlogged.json`` (removed once everything is logged); returns the summary."""
    url = Store.join(run.base, UNLOGGED_FILE)
    if tracker.flush():
        run.store.remove(url, recursive=False)
        return []
    # plain json.dumps: a NaN metric must not stop the record (Python's json reads it back)
    run.store.write_bytes(url, json.dumps(tracker.unlogged_record(), indent=2, default=str).encode())
    summary = tracker.unlogged()
    _log().warning("MLflow unavailable (%s): %d item(s) not logged yet, kept in %s: %s", tracker.last_error,
                   len(summary), url, "; ".join(f"{i['run']}: {i['what']}" for i in summary[:8]))
    return summary


def _model_config(params: PipelineParams, manifest: dict) -> dict:
    shape = manifest["sample_shape"]
    if manifest["kind"] == "image":
        return dit_config(params.model.preset, image_size=shape[-1], in_channels=shape[0],
                          patch_size=params.model.patch_size, num_classes=manifest["num_classes"],
                          prediction=params.model.prediction, time_scale=params.model.time_scale).to_dict()
    return MLPConfig(data_dim=shape[0], hidden_size=params.model.mlp_hidden, depth=params.model.mlp_depth,
                     num_classes=0, prediction=params.model.prediction).to_dict()


def _settings(params: PipelineParams) -> list[SamplerSetting]:
    return [SamplerSetting(params.sampling.method, nfe, cfg) for cfg in params.sampling.cfg_scales for nfe in params.sampling.nfes]


# ---------------------------------------------------------------- stages (Prefect tasks)

@task(name="prepare-dataset", cache_policy=NONE)
def prepare_task(params: PipelineParams, parent_run_id: str | None = None) -> dict:
    run = Run(params)
    if (done := run.completed("data")) is not None:
        get_run_logger().info("data stage complete at %s: skipped", run.url("data"))
        return done
    tracker = _tracker(params)
    with tracker.run("prepare", params.data.model_dump(), parent_run_id=parent_run_id, tags=run.tags):
        manifest = prepare_dataset(
            params.data.source, run.store, run.url("data", "out"), resolution=params.data.resolution,
            channels=params.data.channels, max_bad_fraction=params.data.max_bad_fraction,
            feature_steps=params.data.feature_steps, seed=params.seed, num_samples=params.data.num_samples,
        )
        tracker.log_metrics({"count": manifest["count"], "num_classes": manifest["num_classes"]})
        tracker.log_dict(manifest, "manifest.json")
    _note_unlogged(run, tracker)
    return run.complete("data", {"data_url": run.url("data", "out"), "manifest": manifest})


def _train_stage(params: PipelineParams, stage: str, parent_run_id: str | None) -> dict:
    run = Run(params)
    if (done := run.completed(stage)) is not None:
        get_run_logger().info("%s stage complete at %s: skipped", stage, run.url(stage))
        return done
    data = run.require("data")
    manifest = data["manifest"]
    shard_urls = prepared_shard_urls(run.store, data["data_url"])
    compute = params.compute
    common = dict(shard_urls=shard_urls, sample_shape=tuple(manifest["sample_shape"]),
                  num_classes=manifest["num_classes"] if manifest["kind"] == "image" else 0,
                  num_workers=compute.num_workers, cpus_per_worker=compute.cpus_per_worker, use_gpu=compute.use_gpu,
                  mixed_precision=compute.mixed_precision, checkpoint_every=compute.checkpoint_every,
                  storage_path=run.url("ray"), run_name=f"{params.run_name}-{stage}",
                  divergence=compute.divergence())
    tracker = _tracker(params)
    stage_params = params.fm.model_dump() if stage == "fm" else params.cafm.model_dump()
    _ray(params)
    with tracker.run(stage, stage_params, parent_run_id=parent_run_id, tags=run.tags), \
            tempfile.TemporaryDirectory() as scratch:
        if stage == "fm":
            result = run_flow_matching(model_config=_model_config(params, manifest), fm_config=params.fm.core_config(params.seed),
                                       output_dir=str(Path(scratch) / "out"), **common)
        else:
            init_url = params.cafm.init_checkpoint or run.require("fm")["model_url"]
            init_dir = Path(scratch) / "init"
            run.store.download_dir(init_url, str(init_dir))
            curve = None
            if params.cafm.curve_samples:
                curve = {"store_root": run.store.root, "data_url": data["data_url"], "method": params.sampling.method,
                         "nfe": min(params.sampling.nfes), "num_samples": params.cafm.curve_samples, "seed": params.seed}
            result = run_cafm(init_checkpoint=str(init_dir), cafm_config=params.cafm.core_config(params.seed),
                              output_dir=str(Path(scratch) / "out"), curve=curve, **common)
            if curve is not None:
                _log_curves(run, tracker, result["history"])
        # this stage run (a new MLflow run on every attempt) gets every row: those of an
        # interrupted earlier attempt, never logged, and this attempt's
        tracker.log_history(result["earlier_history"] + result["history"])
        tracker.log_metrics({"seconds": result["seconds"], "steps": result["steps"],
                             "rollbacks": len(result["rollbacks"])})
        if result["rollbacks"]:
            tracker.log_dict({"rollbacks": result["rollbacks"]}, "rollbacks.json")
        model_url = run.url(stage, "model")
        run.store.upload_dir(result["model_dir"], model_url, marker_last="checkpoint.json")
    _note_unlogged(run, tracker)
    return run.complete(stage, {"model_url": model_url, "final_metrics": result["final_metrics"],
                                "steps": result["steps"], "seconds": result["seconds"],
                                "rollbacks": result["rollbacks"], "resumed_from_step": result["resumed_from_step"]})


def _log_curves(run: Run, tracker: Tracker, history: list[dict]) -> None:
    """The CAFM stage's diagnostic curves as a picture: MLflow artifact and ``cafm/curves.png``."""
    metric = "fd" if any("fd_model" in row for row in history) else "sliced_wasserstein"
    start = next((row for row in history if row["step"] == 0 and f"{metric}_model" in row), None)
    picture = io.BytesIO()
    training_curves({"CAFM": history}, metric, picture, reference=start[f"{metric}_model"] if start else None)
    run.store.write_bytes(run.url("cafm", "curves.png"), picture.getvalue())
    tracker.log_image(Image.open(io.BytesIO(picture.getvalue())), "curves.png")


@task(name="fm-pretrain", cache_policy=NONE)
def pretrain_task(params: PipelineParams, parent_run_id: str | None = None) -> dict:
    return _train_stage(params, "fm", parent_run_id)


@task(name="cafm-posttrain", cache_policy=NONE)
def posttrain_task(params: PipelineParams, parent_run_id: str | None = None) -> dict:
    return _train_stage(params, "cafm", parent_run_id)


@task(name="sample", cache_policy=NONE)
def sample_task(params: PipelineParams, parent_run_id: str | None = None) -> dict:
    run = Run(params)
    if (done := run.completed("samples")) is not None:
        get_run_logger().info("samples complete at %s: skipped", run.url("samples"))
        return done
    manifest = run.require("data")["manifest"]
    models = {"fm": run.require("fm")["model_url"]}
    if params.cafm.enabled:
        models["cafm"] = run.require("cafm")["model_url"]
    count = params.sampling.num_samples or (manifest["count"] if manifest["kind"] == "image" else 10000)
    labels = None
    if manifest["kind"] == "image" and manifest["num_classes"] > 0 and manifest.get("class_counts"):
        labels = labels_in_proportion(manifest["class_counts"], count)
    _ray(params)
    start = time.perf_counter()
    layout = generate_sample_shards(run.store, models=models, out_url=run.url("samples", "out"),
                                    settings=_settings(params), num_samples=count, labels=labels,
                                    seeds=params.eval_seeds, shard_size=params.sampling.shard_size,
                                    use_gpu=params.compute.use_gpu)
    seconds = time.perf_counter() - start
    total = count * len(layout)
    get_run_logger().info("generated %d samples in %.0fs (%.0f samples/s)", total, seconds, total / seconds)
    return run.complete("samples", {"layout": layout, "count": count, "seconds": seconds})


@task(name="evaluate", cache_policy=NONE)
def evaluate_task(params: PipelineParams, parent_run_id: str | None = None) -> dict:
    run = Run(params)
    if (done := run.completed("eval")) is not None:
        get_run_logger().info("evaluation complete at %s: skipped", run.url("eval"))
        return done
    layout = run.require("samples")["layout"]
    tracker = _tracker(params)
    with tracker.run("evaluate", params.sampling.model_dump(), parent_run_id=parent_run_id, tags=run.tags):
        result = evaluate_stage(run.store, data_url=run.require("data")["data_url"], sample_layout=layout,
                                settings=_settings(params), seeds=params.eval_seeds, out_url=run.url("eval", "out"),
                                inception_weights=params.inception_weights)
        for row in result["summary"]:
            tracker.log_summary_row(row, prefix=f"{row['model'].lower()}.")
        tracker.log_text(result["report"], "report.md")
        tracker.log_dict({k: v for k, v in result.items() if k not in ("picture_png", "report")}, "metrics.json")
        tracker.log_image(Image.open(io.BytesIO(result["picture_png"])), "samples.png")
        registered = None
        if params.cafm.enabled:
            metric = "fd" if "fd" in result["summary"][0] else "sliced_wasserstein"
            value = headline(result["summary"], metric)
            with tempfile.TemporaryDirectory() as scratch:
                run.store.download_dir(run.require("cafm")["model_url"], scratch)
                version = tracker.register_generator(scratch, params.registered_model,
                                                     tags={"run_name": params.run_name, "data": params.data.source})
            promoted = tracker.promote_if_better(params.registered_model, version, metric, value) if version else False
            registered = {"name": params.registered_model, "version": version, "metric": metric, "value": value,
                          "champion": promoted}
            if version is None:
                registered["not_registered"] = f"MLflow unavailable ({tracker.last_error}); the model is at {run.require('cafm')['model_url']}"
    _note_unlogged(run, tracker)
    create_markdown_artifact(key="fm-vs-cafm", markdown=result["report"], description="FM vs CAFM at identical sampler settings")
    create_image_artifact(image_url=artifact_url(run.url("eval", "out", "samples.png")), key="samples", description="FM and CAFM samples beside real data")
    return run.complete("eval", {"table": result["table"], "summary": result["summary"],
                                 "report_url": run.url("eval", "out", "report.md"), "registered": registered})


# ---------------------------------------------------------------- flows

def artifact_url(url: str) -> str:
    """A storage URL as Prefect's image artifacts take it (local paths as file:// URIs)."""
    return url if "://" in url else Path(url).resolve().as_uri()


def preflight(params: PipelineParams) -> dict:
    """Before any compute: secrets loaded, storage and MLflow reachable (clear errors now),
    then what an earlier attempt of this run left unlogged or RUNNING is put right
    (:func:`replay_unlogged`, whose result this returns)."""
    load_secret_blocks()  # credentials named in CAFM_SECRET_BLOCKS, before anything touches storage
    check_reachable(params.storage_root)
    if params.inception_weights:
        load_inception_features(params.inception_weights)  # a clear error now, not after training
    # raises TrackingError with the URI if the store is unusable now (later outages are buffered)
    Tracker(params.tracking_uri or default_tracking_uri(params.storage_root), params.experiment)
    return replay_unlogged(params)


@flow(name="prepare", log_prints=True)
def prepare_flow(params: PipelineParams = PipelineParams()) -> dict:
    preflight(params)
    return prepare_task(params)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(params: PipelineParams = PipelineParams()) -> dict:
    preflight(params)
    return pretrain_task(params)


@flow(name="posttrain", log_prints=True)
def posttrain_flow(params: PipelineParams = PipelineParams()) -> dict:
    preflight(params)
    return posttrain_task(params)


@flow(name="sample", log_prints=True)
def sample_flow(params: PipelineParams = PipelineParams()) -> dict:
    preflight(params)
    return sample_task(params)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: PipelineParams = PipelineParams()) -> dict:
    preflight(params)
    return evaluate_task(params)


@flow(name="cafm-pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    """The whole DAG; returns where the results are and the FM-vs-CAFM table."""
    preflight(params)
    tracker = _tracker(params)
    run = Run(params)
    with tracker.run(f"pipeline-{params.run_name}", {"run_name": params.run_name, "storage_root": params.storage_root,
                                                     "seed": params.seed}, tags=run.tags) as parent_id:
        data = prepare_task(params, parent_id)
        fm = pretrain_task(params, parent_id)
        cafm = posttrain_task(params, parent_id) if params.cafm.enabled else None
        samples = sample_task(params, parent_id)
        evaluation = evaluate_task(params, parent_id)
    result = {"run_url": run.base, "data": data["data_url"], "fm": fm["model_url"],
              "cafm": cafm["model_url"] if cafm else None, "samples": samples["count"],
              "report": evaluation["report_url"], "table": evaluation["table"],
              "registered": evaluation["registered"], "mlflow_run_id": parent_id,
              "tracking_uri": tracker.tracking_uri, "tracking_unlogged": _note_unlogged(run, tracker)}
    print(f"\n{evaluation['table']}\n")
    print(f"results under {run.base} (report: {evaluation['report_url']}); MLflow: {tracker.tracking_uri}, run {parent_id}")
    return result
