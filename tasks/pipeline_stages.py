"""The pipeline's stages as Prefect tasks: prepare -> FM pretrain -> CAFM post-train ->
sample -> evaluate.

Each task is a thin adapter: it takes its inputs explicitly (the upstream stages' outputs,
plain settings), skips itself when its :class:`~tasks.stage_ledger.StageFolder` is
complete, otherwise reads from storage, calls the stage code, writes its outputs under its
folder, logs to MLflow and returns its outputs. The flows pass each task's outputs to the
next, so the Prefect run graph shows the DAG.

``compute`` is a dict of the training driver's resource arguments (``num_workers``,
``cpus_per_worker``, ``use_gpu``, ``mixed_precision``, ``checkpoint_every``,
``divergence``).
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

from mlflow.exceptions import MlflowException
from PIL import Image
from prefect import task
from prefect.artifacts import create_markdown_artifact

from cafm_core.data import MAX_FILE_BYTES
from cafm_core.models import MLPConfig, dit_config
from cafm_core.plots import training_curves
from tasks.dataset_format import dataset_identity, evaluation_protocol, shard_urls
from tasks.prefect_artifacts import publish_image
from tasks.prepare import FEATURE_SAMPLE, prepare_dataset
from tasks.ray_cluster import start_cluster, worker_cpus
from tasks.run_tracking import RunTracking, stage_logger
from tasks.promotion import promote
from tasks.registry_evaluation import (
    MODEL_EVALUATION_EXPERIMENT,
    alias_versions,
    evaluate_version,
    record_version_evaluation,
)
from tasks.sample_scoring import score_samples
from tasks.sampling import generate_sample_shards
from tasks.stage_ledger import STAGE_CACHE, StageFolder
from tasks.tracking import PROTOCOL_TAG, Tracker, TrackingError
from tasks.train.driver import run_cafm, run_flow_matching

__all__ = ["STAGE_TASK", "complete_outputs", "evaluate_task", "lineage", "model_config_for", "posttrain_task", "prepare_task", "pretrain_task",
           "register_and_promote", "sample_task", "start_compute"]

# every stage task: cached by its folder's fingerprint, its outputs persisted as JSON (the
# flows set where: the run's own storage); a reused stage shows as Cached in the Prefect UI
STAGE_TASK = {"cache_policy": STAGE_CACHE, "persist_result": True, "result_serializer": "json"}


def start_compute(compute: dict) -> None:
    """Ray for the stage's workers (a local cluster, or ``RAY_ADDRESS``)."""
    start_cluster(compute["num_workers"], worker_cpus(compute["num_workers"], compute["cpus_per_worker"]),
                  compute["use_gpu"])


def model_config_for(model: dict, manifest: dict) -> dict:
    """The generator's config for a prepared dataset: a DiT for images, an MLP for points.
    ``model`` holds the pipeline's model settings (preset, patch size, ...)."""
    shape = manifest["sample_shape"]
    if manifest["kind"] == "image":
        return dit_config(model["preset"], image_size=shape[-1], in_channels=shape[0], patch_size=model["patch_size"],
                          num_classes=manifest["num_classes"], prediction=model["prediction"],
                          time_scale=model["time_scale"]).to_dict()
    return MLPConfig(data_dim=shape[0], hidden_size=model["mlp_hidden"], depth=model["mlp_depth"], num_classes=0,
                     prediction=model["prediction"]).to_dict()


def complete_outputs(folder: StageFolder) -> dict | None:
    """The stage's outputs when its folder is complete (logged as skipped), else None."""
    done = folder.completed()
    if done is not None:
        stage_logger().info("%s stage complete at %s: skipped", folder.stage, folder.url)
    return done


@task(name="prepare-dataset", **STAGE_TASK)
def prepare_task(folder: StageFolder, data: dict, seed: int, tracking: RunTracking) -> dict:
    """Read, check and write the dataset (``data``: the pipeline's data settings)."""
    if (done := complete_outputs(folder)) is not None:
        return done
    tracker = tracking.tracker
    with tracking.stage_run("prepare", data):
        manifest = prepare_dataset(
            data["source"], folder.store, folder.join("out"), resolution=data["resolution"],
            channels=data["channels"], max_bad_fraction=data["max_bad_fraction"],
            max_file_bytes=data.get("max_file_bytes", MAX_FILE_BYTES),
            feature_steps=data["feature_steps"], feature_sample=data.get("feature_sample", FEATURE_SAMPLE), seed=seed,
            num_samples=data["num_samples"],
        )
        tracker.log_metrics({"count": manifest["count"], "num_classes": manifest["num_classes"]})
        tracker.log_dict(manifest, "manifest.json")
    tracking.note_unlogged()
    return folder.complete({"data_url": folder.join("out"), "manifest": manifest})


def lineage(manifest: dict) -> dict:
    """What a generator records of its training data (``tasks.dataset_format.dataset_identity``)."""
    return {"dataset": dataset_identity(manifest), "dataset_name": manifest["name"]}


def _train(folder: StageFolder, data: dict, compute: dict, tracking: RunTracking, logged: dict, run) -> dict:
    """What both training stages share: Ray, the MLflow run, the model on storage.

    ``run(scratch, **inputs)`` calls the stage's driver with the shard inputs; Ray Train
    keeps its run directory (checkpoints) in ``<run>/ray/<run_name>-<stage>-<fingerprint>``."""
    tracker = tracking.tracker
    manifest = data["manifest"]
    start_compute(compute)
    with tracking.stage_run(folder.stage, logged), tempfile.TemporaryDirectory() as scratch:
        result = run(
            Path(scratch),
            shard_urls=shard_urls(folder.store, data["data_url"]), sample_shape=tuple(manifest["sample_shape"]),
            num_classes=manifest["num_classes"] if manifest["kind"] == "image" else 0,
            storage_path=folder.store.join(folder.run_url, "ray"), run_name=folder.ray_run_name,
            output_dir=str(Path(scratch) / "out"), lineage=lineage(manifest), **compute,
        )
        # this stage run (a new MLflow run on every attempt) gets every row: those of an
        # interrupted earlier attempt, never logged, and this attempt's
        tracker.log_history(result["earlier_history"] + result["history"])
        tracker.log_metrics({"seconds": result["seconds"], "steps": result["steps"], "rollbacks": len(result["rollbacks"])})
        if result["rollbacks"]:
            tracker.log_dict({"rollbacks": result["rollbacks"]}, "rollbacks.json")
        model_url = folder.join("model")
        folder.store.upload_dir(result["model_dir"], model_url, marker_last="checkpoint.json")
        if result["workers"]:
            tracker.log_dict({"workers": result["workers"]}, "workers.json")
    tracking.note_unlogged()
    return folder.complete({"model_url": model_url, "final_metrics": result["final_metrics"], "steps": result["steps"],
                            "seconds": result["seconds"], "rollbacks": result["rollbacks"],
                            "resumed_from_step": result["resumed_from_step"], "workers": result["workers"]})


@task(name="fm-pretrain", **STAGE_TASK)
def pretrain_task(folder: StageFolder, data: dict, model: dict, fm_config: dict, compute: dict,
                  tracking: RunTracking) -> dict:
    """FM pretraining on the prepared data (``data``: the prepare stage's outputs)."""
    if (done := complete_outputs(folder)) is not None:
        return done
    model_config = model_config_for(model, data["manifest"])

    def run(scratch: Path, **inputs) -> dict:
        return run_flow_matching(model_config=model_config, fm_config=fm_config, **inputs)

    return _train(folder, data, compute, tracking, fm_config, run)


@task(name="cafm-posttrain", **STAGE_TASK)
def posttrain_task(folder: StageFolder, data: dict, fm: dict | None, cafm_config: dict, compute: dict,
                   tracking: RunTracking, *, init_checkpoint: str | None = None, curve: dict | None = None,
                   from_scratch: dict | None = None) -> dict:
    """CAFM post-training from the FM stage's generator (``fm``: its outputs), or from
    ``init_checkpoint`` (a checkpoint URL) when given, or from a freshly initialised generator
    when ``from_scratch`` holds the model settings (no checkpoint is read). ``curve`` (``method``, ``nfe``,
    ``num_samples``, ``seed``) adds the diagnostic curve to every report."""
    if (done := complete_outputs(folder)) is not None:
        return done
    init_url = None if from_scratch is not None else init_checkpoint or (fm or {}).get("model_url")
    if init_url is None and from_scratch is None:
        raise ValueError("CAFM post-training needs the FM stage's outputs, an init_checkpoint URL, or from_scratch")
    curve_spec = {**curve, "store_root": folder.store_root, "data_url": data["data_url"]} if curve else None

    def run(scratch: Path, **inputs) -> dict:
        if from_scratch is not None:
            start = {"init_checkpoint": None, "model_config": model_config_for(from_scratch, data["manifest"])}
        else:
            folder.store.download_dir(init_url, str(scratch / "init"))
            start = {"init_checkpoint": str(scratch / "init")}
        result = run_cafm(cafm_config=cafm_config, curve=curve_spec, **start, **inputs)
        if curve_spec is not None:
            _log_curves(folder, tracking, result["history"])
        return result

    logged = {**cafm_config, "init_checkpoint": init_url, "from_scratch": from_scratch is not None,
              "curve_samples": curve["num_samples"] if curve else 0}
    return _train(folder, data, compute, tracking, logged, run)


def _log_curves(folder: StageFolder, tracking: RunTracking, history: list[dict]) -> None:
    """The CAFM stage's diagnostic curves as a picture: MLflow artifact and ``cafm/curves.png``."""
    metric = "fd" if any("fd_model" in row for row in history) else "sliced_wasserstein"
    start = next((row for row in history if row["step"] == 0 and f"{metric}_model" in row), None)
    picture = io.BytesIO()
    training_curves({"CAFM": history}, metric, picture, reference=start[f"{metric}_model"] if start else None)
    folder.store.write_bytes(folder.join("curves.png"), picture.getvalue())
    tracking.tracker.log_image(Image.open(io.BytesIO(picture.getvalue())), "curves.png")
    publish_image("cafm-curves", picture.getvalue(), storage_url=folder.join("curves.png"),
                  description=f"CAFM post-training: {metric} of the generator and its EMA on a fixed sample")


@task(name="sample", **STAGE_TASK)
def sample_task(folder: StageFolder, data: dict, generators: dict[str, dict], evaluation: dict, compute: dict) -> dict:
    """Samples of every generator (``generators``: name -> its training stage's outputs) under
    the evaluation protocol of the prepared data (``evaluation``: its settings, seeds, sample
    count and shard size), as shards on storage. A generator of other data is refused
    before any sample is drawn."""
    if (done := complete_outputs(folder)) is not None:
        return done
    protocol = evaluation_protocol(folder.store, data["data_url"], **evaluation)
    for name, outputs in generators.items():
        _, config, metadata = folder.store.read_checkpoint(outputs["model_url"])
        protocol.check_generator(config, trained_on=metadata.get("dataset"), what=f"the {name} generator")
    start_compute(compute)
    start = time.perf_counter()
    layout, nodes = generate_sample_shards(folder.store, models={name: outputs["model_url"] for name, outputs in generators.items()},
                                    out_url=folder.join("out"), protocol=protocol, use_gpu=compute["use_gpu"])
    seconds = time.perf_counter() - start
    total = protocol.num_samples * len(layout)
    stage_logger().info("generated %d samples in %.0fs (%.0f samples/s) on %d Ray node(s) under %s", total, seconds,
                        total / seconds, len(nodes), protocol.describe())
    return folder.complete({"layout": layout, "count": protocol.num_samples, "seconds": seconds,
                            "protocol_id": protocol.id, "nodes": nodes})


@task(name="evaluate", **STAGE_TASK)
def evaluate_task(folder: StageFolder, data: dict, samples: dict, evaluation: dict, tracking: RunTracking, *,
                  logged: dict, inception_weights: str | None = None, registration: dict | None = None) -> dict:
    """Metrics of every generator's samples under the evaluation protocol, the report, the
    picture (storage, MLflow, Prefect artifacts). ``registration`` (``model_name``, ``cafm``:
    the CAFM stage's outputs, ``rule``: the promotion rule, ``tags``) registers the CAFM
    generator as ``candidate`` and applies the promotion rule against the ``champion``,
    both evaluated under this protocol."""
    if (done := complete_outputs(folder)) is not None:
        return done
    protocol = evaluation_protocol(folder.store, data["data_url"], **evaluation)
    tracker = tracking.tracker
    with tracking.stage_run("evaluate", logged, tags={PROTOCOL_TAG: protocol.id}):
        result = score_samples(folder.store, protocol=protocol, sample_layout=samples["layout"],
                               out_url=folder.join("out"), inception_weights=inception_weights)
        for row in result["summary"]:
            tracker.log_summary_row(row, prefix=f"{row['model'].lower()}.")
        tracker.log_text(result["report"], "report.md")
        tracker.log_dict({k: v for k, v in result.items() if k not in ("picture_png", "report")}, "metrics.json")
        tracker.log_image(Image.open(io.BytesIO(result["picture_png"])), "samples.png")
        registered = None
        if registration:  # the generator is logged with this stage's MLflow run
            registered = register_and_promote(folder, tracking, protocol, result["rows"], data, registration)
    tracking.note_unlogged()
    report = result["report"] + (f"\n## Registry\n\n{registered['summary']}\n" if registered else "")
    if tracking.variant is not None:
        report += (f"\n## Variant\n\nVariant `{tracking.variant}` of run `{folder.run_name}`; settings that differ "
                   f"from the run's first variant: {tracking.variant_changes}.\n")
    create_markdown_artifact(key="fm-vs-cafm", markdown=report, description=f"FM vs CAFM, protocol {protocol.id}")
    publish_image("samples", result["picture_png"], description="FM and CAFM samples beside real data",
                  storage_url=folder.join("out", "samples.png"))
    return folder.complete({"table": result["table"], "summary": result["summary"], "protocol_id": protocol.id,
                            "report_url": folder.join("out", "report.md"), "registered": registered})


def register_and_promote(folder: StageFolder, tracking: RunTracking, protocol, rows: list[dict], data: dict,
                         registration: dict) -> dict:
    """Register the CAFM generator as ``candidate`` (tagged with its dataset and the protocol),
    record its evaluation (the pipeline's rows: the numbers the protocol gives it), evaluate
    the ``champion`` under the same protocol and apply the promotion rule (``tasks.promotion``)."""
    tracker = tracking.tracker
    name, model_url, rule = registration["model_name"], registration["cafm"]["model_url"], registration["rule"]
    with tempfile.TemporaryDirectory() as scratch:
        folder.store.download_dir(model_url, scratch)
        version, refused = tracker.register_generator(scratch, name, dataset=dataset_identity(data["manifest"]),
                                                      tags={**registration["tags"], PROTOCOL_TAG: protocol.id})
    registered = {"name": name, "version": version, "protocol_id": protocol.id, "champion": False}
    if version is None:
        registered["not_registered"] = f"{refused}; the model is at {model_url}"
        registered["summary"] = f"Not registered: {registered['not_registered']}."
        return registered
    try:
        evaluations = Tracker(tracker.tracking_uri, MODEL_EVALUATION_EXPERIMENT)
        roles = alias_versions(evaluations, name)
        cafm_rows = [{k: v for k, v in row.items() if k != "model"} for row in rows if row["model"] == "CAFM"]
        headlines = {version: record_version_evaluation(evaluations, protocol, name, version, cafm_rows).headline}
        champion = roles.get("champion")
        if champion is not None and champion != version:
            headlines[champion] = evaluate_version(evaluations, protocol, name, champion).headline
        outcome = promote(evaluations, name, roles, headlines, rule, kind=protocol.kind)
    except (TrackingError, ValueError, MlflowException) as exc:  # ValueError includes CAFMInputError
        # the candidate is registered and the model is on storage: the decision is left to the
        # scheduled evaluation (or a rerun) rather than failing a finished training run
        registered["summary"] = (f"`{name}` version {version} registered as candidate; promotion not decided: "
                                 f"{str(exc)[:500]}")
        stage_logger().warning("%s", registered["summary"])
        return registered
    registered.update(champion=outcome.promoted, previous_champion=champion, headlines=headlines,
                      summary=f"`{name}` version {version} registered as candidate. {outcome.describe()}")
    stage_logger().info("%s", registered["summary"])
    return registered
