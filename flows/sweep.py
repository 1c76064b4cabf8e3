"""The CAFM sweep as a Prefect flow: one FM generator, many CAFM settings, one table.

    cafm-pipeline sweep                                   # default grid on digits
    cafm-pipeline sweep --set space.generator_lr=[1e-5,3e-5,1e-4] --set pipeline.cafm.steps=600

Reuses the pipeline's prepare and FM stages (skipped when complete), then runs every
point of the grid as a Ray Tune trial (``tasks.sweep_stage``). Results: an MLflow parent
run ``sweep-<name>`` with one child run per trial (its point, the training series and the
diagnostic curve as metric series, the final metrics per sampler setting), a markdown
table (FM, every trial, the noise floor; mean ± std over the evaluation seeds) and a
picture of the curves, as Prefect artifacts and under ``<run>/sweep/<name>/`` on storage.
"""

from __future__ import annotations

from prefect import flow

from cafm_core.evaluation import SamplerSetting
from flows.params import SweepParams
from flows.pipeline import holding_run, prepare_stage, pretrain_stage
from flows.run_layout import RunLayout
from tasks.stage_ledger import fingerprint
from tasks.sweep import trial_name
from tasks.sweep_stage import sweep_task
from tasks.tracking import ui_command

__all__ = ["sweep_flow"]


def _trial_specs(params: SweepParams) -> list[dict]:
    specs = []
    for index, point in enumerate(params.points()):
        config = params.cafm_for(point).core_config(params.pipeline.seed)
        specs.append({"name": trial_name(index, point), "point": point, "config": config})
    return specs


@flow(name="cafm-sweep", log_prints=True)
def sweep_flow(params: SweepParams = SweepParams()) -> dict:
    """Prepare and FM-pretrain (skipped when complete; no FM stage when
    ``pipeline.cafm.init_checkpoint`` names the generator to start from), then the sweep."""
    pipeline = params.pipeline
    with holding_run(pipeline):  # the run's lease: no other run of this name writes beside the sweep
        layout = RunLayout(pipeline)
        tracker = layout.tracking.tracker
        compute = pipeline.compute.settings()
        sweep_fingerprint = fingerprint(layout.fingerprint("fm"),
                                        params.model_dump(exclude={"pipeline": {"cafm": {"enabled"}}}))
        with tracker.run(f"sweep-{params.name}", {"run_name": pipeline.run_name, "space": params.space,
                                                  "storage_root": pipeline.storage_root}) as parent_id:
            tracking = layout.tracking.under(parent_id)
            data = prepare_stage(pipeline, layout, tracking)
            fm = None
            if pipeline.cafm.init_checkpoint is None:  # else the trials start from that checkpoint
                fm = pretrain_stage(pipeline, layout, tracking, data)
            outputs = sweep_task.with_options(result_storage=layout.result_storage)(
                layout.sweep_folder(params.name, sweep_fingerprint), data, fm, _trial_specs(params),
                pipeline.sampling.evaluation(pipeline.eval_seeds), compute, tracking,
                init_checkpoint=pipeline.cafm.init_checkpoint, curve_setting=SamplerSetting(pipeline.sampling.method, params.curve_nfe, 1.0),
                curve_every=params.curve_every, curve_samples=params.curve_samples, cpus_per_trial=params.cpus_per_trial,
            )
        print(f"\n{outputs['table']}\n")
        print("ranking (lower is better): " + ", ".join(f"{n} {v:.4g}" for n, v in outputs["ranking"]))
        print(f"report: {outputs['report_url']}; evaluation protocol {outputs.get('protocol_id', 'not recorded')}; MLflow: "
              f"{tracker.tracking_uri}, run {parent_id}")
        print(f"open the MLflow UI: {ui_command(tracker.tracking_uri)}   (or: make ui)")
        if outputs["failed"]:
            raise RuntimeError(f"sweep trials failed: {outputs['failed']} (see the report)")
        return outputs
