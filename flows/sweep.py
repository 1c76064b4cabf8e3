"""The CAFM sweep as a Prefect flow: one FM generator, many CAFM settings, one table.

    cafm-pipeline sweep                                   # default grid on digits
    cafm-pipeline sweep --set space.generator_lr=[1e-5,3e-5,1e-4] --set pipeline.cafm.steps=600

Reuses the pipeline's prepare and FM stages (skipped when complete), then runs every
point of the grid as a Ray Tune trial (``tasks.sweep``). Results: an MLflow parent run
``sweep-<name>`` with one child run per trial (its point, the training series and the
diagnostic curve as metric series, the final metrics per sampler setting), a markdown
table (FM, every trial, the noise floor; mean ± std over the evaluation seeds) and a
picture of the curves, as Prefect artifacts and under ``<run>/sweep/<name>/`` on storage.
"""

from __future__ import annotations

import io

from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.cache_policies import NONE

from cafm_core.evaluation import (
    SamplerSetting,
    format_differences,
    format_table,
    paired_differences,
    rank_models,
    summarise_over_seeds,
)
from cafm_core.plots import training_curves
from flows.params import SweepParams
from flows.pipeline import Run, StageMismatch, preflight, artifact_url, _fingerprint, _ray, _settings, _tracker, prepare_task, pretrain_task
from tasks.storage import Store
from tasks.sweep import run_sweep, trial_name


def _trial_specs(params: SweepParams) -> list[dict]:
    specs = []
    for index, point in enumerate(params.points()):
        config = params.cafm_for(point).core_config(params.pipeline.seed)
        specs.append({"name": trial_name(index, point), "point": point, "config": config})
    return specs


@task(name="cafm-sweep", cache_policy=NONE)
def sweep_task(params: SweepParams, parent_run_id: str) -> dict:
    pipeline = params.pipeline
    run = Run(pipeline)
    out_url = run.url("sweep", params.name)
    fingerprint = _fingerprint(run.fingerprint("fm"), params.model_dump(exclude={"pipeline": {"cafm": {"enabled"}}}))
    record = run.store.completed(out_url)
    if record is not None:
        if record["outputs"].get("fingerprint") != fingerprint:
            raise StageMismatch(f"{out_url} is complete but was made with other parameters; use another sweep name")
        get_run_logger().info("sweep %s complete at %s: skipped", params.name, out_url)
        return record["outputs"]["outputs"]

    data_url = run.require("data")["data_url"]
    fm_url = pipeline.cafm.init_checkpoint or run.require("fm")["model_url"]
    settings = _settings(pipeline)
    trials = _trial_specs(params)
    get_run_logger().info("sweep %s: %d trials from %s", params.name, len(trials), fm_url)
    _ray(pipeline)
    result = run_sweep(
        run.store, data_url=data_url, fm_url=fm_url, trials=trials, settings=settings,
        seeds=list(pipeline.eval_seeds), num_samples=pipeline.sampling.num_samples,
        curve_setting=SamplerSetting(pipeline.sampling.method, params.curve_nfe, 1.0),
        curve_every=params.curve_every, curve_samples=params.curve_samples,
        cpus_per_trial=params.cpus_per_trial, out_url=out_url, name=params.name,
        divergence=pipeline.compute.divergence(),
    )
    keys = result["metrics"]
    metric = "fd" if "fd" in keys else "sliced_wasserstein"
    floor = result["noise_floor"]
    rows = [{"model": "FM", **r} for r in result["fm_rows"]]
    rows += [{"model": t["name"], **r} for t in result["trials"] for r in t.get("rows", [])]
    summary = summarise_over_seeds(rows, keys)
    ranking = rank_models(summary, metric)
    table = format_table(summary, floor, keys)
    failed = [t["name"] for t in result["trials"] if t["error"]]
    diverged = {t["name"]: t["diverged"] for t in result["trials"] if t.get("diverged")}

    def outcome(trial: dict) -> str:
        if trial["error"]:
            return f" (failed: {trial['error'][:200]})"
        if trial["name"] in diverged:
            return f" (**diverged** at step {diverged[trial['name']]['step']}: {diverged[trial['name']]['reason']}; not evaluated)"
        return ""

    points = "\n".join(f"- `{t['name']}`: {t['point']}{outcome(t)}" for t in result["trials"])
    for name, what in diverged.items():
        get_run_logger().warning("sweep %s: trial %s diverged at step %d (%s)", params.name, name, what["step"], what["reason"])
    ranked = "\n".join(f"{i + 1}. {name}: {value:.4g}" for i, (name, value) in enumerate(ranking))
    paired = "\n".join(format_differences(paired_differences(rows, metric, other=t["name"]), other=t["name"], floor=floor)
                       for t in result["trials"] if t.get("rows"))
    report = (
        f"# CAFM sweep `{params.name}` on {result['dataset']}\n\n{table}\n\n"
        f"Ranking by {metric} averaged over the guidance-free settings (lower is better):\n\n{ranked}\n\n"
        f"Each trial against FM, paired by evaluation seed (same noise and labels):\n\n{paired}\n\n"
        f"Trials (all from the FM generator {fm_url}):\n\n{points}\n\n"
        f"{len(pipeline.eval_seeds)} evaluation seed(s); identical sampler settings, noise and labels for every "
        f"model. Sweep time {result['seconds']:.0f}s.\n"
    )
    picture = io.BytesIO()
    training_curves({t["name"].split("-")[0]: t["curve"] for t in result["trials"]}, metric, picture,
                    reference=result["fm_curve"][f"{metric}_model"])
    picture = picture.getvalue()

    tracker = _tracker(pipeline)
    configs = {t["name"]: t["config"] for t in trials}
    for trial in result["trials"]:
        tags = {"cafm.diverged": f"step {diverged[trial['name']]['step']}: {diverged[trial['name']]['reason']}"} \
            if trial["name"] in diverged else None
        with tracker.run(trial["name"], {"point": trial["point"], "cafm": configs[trial["name"]]}, parent_run_id=parent_run_id,
                         tags=tags):
            tracker.log_history(trial["curve"])
            for row in summary:
                if row["model"] == trial["name"]:
                    tracker.log_summary_row(row)
    tracker.log_text(report, "sweep_report.md")
    tracker.log_image(Image.open(io.BytesIO(picture)), "sweep_curves.png")

    run.store.write_bytes(Store.join(out_url, "report.md"), report.encode())
    run.store.write_bytes(Store.join(out_url, "curves.png"), picture)
    run.store.write_json(Store.join(out_url, "sweep.json"), {**result, "summary": summary, "noise_floor": floor,
                                                             "ranking": ranking})
    create_markdown_artifact(key=f"sweep-{params.name}".lower().replace("_", "-").replace(".", "-"), markdown=report,
                             description="CAFM sweep: FM vs every trial at identical sampler settings")
    create_image_artifact(image_url=artifact_url(Store.join(out_url, "curves.png")), key="sweep-curves", description="diagnostic curves of every trial")
    outputs = {"report_url": Store.join(out_url, "report.md"), "table": table, "ranking": ranking,
               "best": next((name for name, _ in ranking if name != "FM"), None), "failed": failed,
               "diverged": sorted(diverged)}
    if not failed:  # a sweep with failed trials is reported but not marked complete: a rerun retries it
        run.store.mark_complete(out_url, {"fingerprint": fingerprint, "outputs": outputs})
    return outputs


@flow(name="cafm-sweep", log_prints=True)
def sweep_flow(params: SweepParams = SweepParams()) -> dict:
    """Prepare and FM-pretrain (skipped when complete; no FM stage when
    ``pipeline.cafm.init_checkpoint`` names the generator to start from), then the sweep."""
    pipeline = params.pipeline
    preflight(pipeline)
    tracker = _tracker(pipeline)
    with tracker.run(f"sweep-{params.name}", {"run_name": pipeline.run_name, "space": params.space,
                                              "storage_root": pipeline.storage_root}) as parent_id:
        prepare_task(pipeline, parent_id)
        if pipeline.cafm.init_checkpoint is None:  # else the trials start from that checkpoint
            pretrain_task(pipeline, parent_id)
        outputs = sweep_task(params, parent_id)
    print(f"\n{outputs['table']}\n")
    print("ranking (lower is better): " + ", ".join(f"{n} {v:.4g}" for n, v in outputs["ranking"]))
    print(f"report: {outputs['report_url']}; MLflow: {tracker.tracking_uri}, run {parent_id}")
    if outputs["failed"]:
        raise RuntimeError(f"sweep trials failed: {outputs['failed']} (see the report)")
    return outputs
