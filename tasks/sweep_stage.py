"""The CAFM sweep as a Prefect task: every trial from one FM generator (``tasks.sweep``),
then one report: a table of FM, every trial and the noise floor (mean ± std over the
evaluation seeds), the ranking, each trial paired with FM, and the curves; on storage
under ``<run>/sweep/<name>/``, in MLflow (one child run per trial) and as Prefect artifacts.
"""

from __future__ import annotations

import io

from PIL import Image
from prefect import task
from prefect.artifacts import create_markdown_artifact

from cafm_core.evaluation import (
    SamplerSetting,
    format_differences,
    format_table,
    paired_differences,
    rank_models,
    summarise_over_seeds,
)
from cafm_core.plots import training_curves
from tasks.pipeline_stages import STAGE_TASK, complete_outputs, start_compute
from tasks.dataset_format import evaluation_protocol
from tasks.prefect_artifacts import publish_image
from tasks.run_tracking import RunTracking, stage_logger
from tasks.stage_ledger import StageFolder
from tasks.tracking import PROTOCOL_TAG
from tasks.sweep import run_sweep

__all__ = ["sweep_task"]


@task(name="cafm-sweep", **STAGE_TASK)
def sweep_task(folder: StageFolder, data: dict, fm: dict | None, trials: list[dict], evaluation: dict,
               compute: dict, tracking: RunTracking, *, init_checkpoint: str | None = None,
               curve_setting: SamplerSetting, curve_every: int, curve_samples: int,
               cpus_per_trial: int) -> dict:
    """Run the sweep's ``trials`` (``{"name", "point", "config"}``) from the FM stage's
    generator (``fm``: its outputs) or ``init_checkpoint``, every generator evaluated under the
    evaluation protocol of the prepared data (``evaluation``: settings, seeds, sample count,
    shard size); a sweep with failed trials is reported but not marked complete, so a rerun
    retries it."""
    log = stage_logger()
    if (done := complete_outputs(folder)) is not None:
        return done
    name, out_url = folder.stage.removeprefix("sweep/"), folder.url
    fm_url = init_checkpoint or (fm or {}).get("model_url")
    if fm_url is None:
        raise ValueError("the sweep needs the FM stage's outputs or an init_checkpoint URL")
    protocol = evaluation_protocol(folder.store, data["data_url"], **evaluation)
    seeds = protocol.seeds
    log.info("sweep %s: %d trials from %s, %s", name, len(trials), fm_url, protocol.describe())
    start_compute(compute)
    result = run_sweep(
        folder.store, data_url=data["data_url"], fm_url=fm_url, trials=trials, protocol=protocol,
        curve_setting=curve_setting, curve_every=curve_every, curve_samples=curve_samples,
        cpus_per_trial=cpus_per_trial, out_url=out_url, name=name, divergence=compute["divergence"],
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
    for trial_name, what in diverged.items():
        log.warning("sweep %s: trial %s diverged at step %d (%s)", name, trial_name, what["step"], what["reason"])
    ranked = "\n".join(f"{i + 1}. {model}: {value:.4g}" for i, (model, value) in enumerate(ranking))
    paired = "\n".join(format_differences(paired_differences(rows, metric, other=t["name"]), other=t["name"], floor=floor)
                       for t in result["trials"] if t.get("rows"))
    report = (
        f"# CAFM sweep `{name}` on {result['dataset']}\n\n{table}\n\n"
        f"Ranking by {metric} averaged over the guidance-free settings (lower is better):\n\n{ranked}\n\n"
        f"Each trial against FM, paired by evaluation seed (same noise and labels):\n\n{paired}\n\n"
        f"Trials (all from the FM generator {fm_url}):\n\n{points}\n\n"
        f"{len(seeds)} evaluation seed(s); identical sampler settings, noise and labels for every "
        f"model; evaluation protocol `{protocol.id}` (the pipeline's numbers under the same id compare one to one). "
        f"Sweep time {result['seconds']:.0f}s.\n"
    )
    if result.get("real_reference"):
        report += f"\n{result['real_reference']} Trials post-trained on the sampled rows.\n"
    picture = io.BytesIO()
    training_curves({t["name"].split("-")[0]: t["curve"] for t in result["trials"]}, metric, picture,
                    reference=result["fm_curve"][f"{metric}_model"])
    picture = picture.getvalue()

    tracker = tracking.tracker
    configs = {t["name"]: t["config"] for t in trials}
    for trial in result["trials"]:
        tags = {"cafm.diverged": f"step {diverged[trial['name']]['step']}: {diverged[trial['name']]['reason']}"} \
            if trial["name"] in diverged else None
        with tracker.run(trial["name"], {"point": trial["point"], "cafm": configs[trial["name"]]},
                         parent_run_id=tracking.parent_run_id, tags={**(tags or {}), PROTOCOL_TAG: protocol.id}):
            tracker.log_history(trial["curve"])
            for row in summary:
                if row["model"] == trial["name"]:
                    tracker.log_summary_row(row)
    tracker.log_text(report, "sweep_report.md")
    tracker.log_image(Image.open(io.BytesIO(picture)), "sweep_curves.png")

    store = folder.store
    store.write_bytes(folder.join("report.md"), report.encode())
    store.write_bytes(folder.join("curves.png"), picture)
    store.write_json(folder.join("sweep.json"), {**result, "summary": summary, "noise_floor": floor, "ranking": ranking,
                                                 "protocol_id": protocol.id, "protocol": protocol.to_dict()})
    create_markdown_artifact(key=f"sweep-{name}".lower().replace("_", "-").replace(".", "-"), markdown=report,
                             description="CAFM sweep: FM vs every trial at identical sampler settings")
    publish_image("sweep-curves", picture, description="diagnostic curves of every trial",
                  storage_url=folder.join("curves.png"))
    outputs = {"url": folder.url, "report_url": folder.join("report.md"), "table": table, "ranking": ranking,
               "best": next((model for model, _ in ranking if model != "FM"), None), "failed": failed,
               "diverged": sorted(diverged), "protocol_id": protocol.id}
    if not failed:  # a sweep with failed trials is reported but not marked complete: a rerun retries it
        folder.complete(outputs)
    return outputs
