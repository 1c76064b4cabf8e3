"""One pipeline run's layout: each stage's folder and fingerprint, from the parameters.

``<storage_root>/<run_name>/<stage>/<fingerprint>/`` holds a stage's outputs (``data``,
``fm``, ``cafm``, ``samples``, ``eval``; ``sweep/<name>`` for sweeps; Ray Train's run
directories under ``ray/``, Prefect's cached results under ``prefect-results/``, the
variants' records under ``variants/``). A stage's fingerprint hashes the parameters that
change its outputs, chained with its inputs' fingerprints, so a changed setting makes new
folders for exactly the stages downstream of it and reuses the rest (``tasks.stage_ledger``).
The evaluation's fingerprint names the run's *variant* (``tasks.run_variants``).
"""

from __future__ import annotations

from functools import cached_property

from cafm_core.data import BUILTIN_DATASETS
from flows.params import PipelineParams
from tasks.dataset_format import MANIFEST_VERSION
from tasks.run_tracking import RunTracking
from tasks.run_variants import record_variant
from tasks.stage_ledger import StageFolder, fingerprint, result_storage
from tasks.storage import Store
from tasks.tracking import default_tracking_uri

__all__ = ["STAGES", "RunLayout", "tracking_uri"]

STAGES = ("data", "fm", "cafm", "samples", "eval")


def tracking_uri(params: PipelineParams) -> str:
    """The MLflow store of a pipeline run: the parameter, else the one default of every flow
    (``MLFLOW_TRACKING_URI``, else ``outputs/mlflow.db``)."""
    return params.tracking_uri or default_tracking_uri()


class RunLayout:
    """Where one pipeline run's stages live, their fingerprints, and where it logs."""

    def __init__(self, params: PipelineParams) -> None:
        self.params = params
        self.store = Store(params.storage_root)
        self.base = self.store.url(params.run_name)
        self.tracking = RunTracking(tracking_uri(params), params.experiment, self.store.root, self.base)

    def fingerprint(self, stage: str) -> str:
        p = self.params
        # a new format: new folders. The size cap reads no file of a built-in set: theirs keep their folders
        settings = p.data.model_dump(exclude={"max_file_bytes"} if p.data.source in BUILTIN_DATASETS else None)
        data = fingerprint(settings, p.seed, {"format": MANIFEST_VERSION})
        fm = fingerprint(data, p.model.model_dump(), p.fm.model_dump(), p.compute.num_workers)
        start = fm if p.cafm.init_checkpoint is None else p.cafm.init_checkpoint
        if p.cafm.from_scratch:  # no FM generator involved: the data, the model and the seed
            start = fingerprint(data, p.model.model_dump(), p.compute.num_workers)
        cafm = fingerprint(start, p.cafm.model_dump(exclude={"curve_samples"}))  # the curve changes no weight
        samples = fingerprint(fm, cafm, p.sampling.model_dump(), p.eval_seeds)
        evaluation = fingerprint(samples, data, p.inception_weights)
        return {"data": data, "fm": fm, "cafm": cafm, "samples": samples, "eval": evaluation}[stage]

    @property
    def variant(self) -> str:
        """The variant these parameters make: the evaluation stage's fingerprint."""
        return self.fingerprint("eval")

    def stage_fingerprints(self) -> dict[str, str]:
        """The fingerprint of every stage these parameters run (CAFM only when enabled)."""
        stages = [s for s in STAGES if s != "cafm" or self.params.cafm.enabled]
        return {stage: self.fingerprint(stage) for stage in stages}

    def record_variant(self) -> dict:
        """Record this variant (once) and tag its tracking with it: its id and the settings
        that differ from the run's first variant."""
        record = record_variant(self.store, self.base, self.variant, self.params.model_dump(mode="json"),
                                self.stage_fingerprints())
        changes = ", ".join(f"{k}={v}" for k, v in record["changes"].items()) or "none (the run's first variant)"
        self.tracking = self.tracking.with_variant(self.variant, changes)
        return record

    @cached_property
    def result_storage(self):
        """Where the stage tasks' results are persisted (Prefect's cache): beside the run.
        Made once per layout (on S3 it is a block saved to the Prefect server)."""
        return result_storage(self.store.root, self.base)

    def folder(self, stage: str) -> StageFolder:
        """The folder of one of :data:`STAGES`."""
        return StageFolder(self.store.root, self.base, self.params.run_name, stage, self.fingerprint(stage))

    def sweep_folder(self, name: str, sweep_fingerprint: str) -> StageFolder:
        """The folder of the sweep ``name`` (its fingerprint chains the FM stage's)."""
        return StageFolder(self.store.root, self.base, self.params.run_name, f"sweep/{name}", sweep_fingerprint)
