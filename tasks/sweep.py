"""CAFM hyper-parameter sweep on Ray Tune.

Every trial post-trains the same FM generator (its EMA weights) with one point of a grid
of CAFM settings, in one process (``cafm_core.training.train_cafm``; the models here are
small enough that a trial per CPU beats data parallelism), and:

* every ``curve_every`` steps reports the training rows (D/G losses, real/fake logits,
  gradient norms) together with a diagnostic curve point: the metric of the generator and
  of its EMA on a fixed small sample (``cafm_core.evaluation.TrainingCurve``);
* stops as soon as a step's metrics diverge (``cafm_core.training.DivergenceGuard``: NaN/inf
  or exploding losses/logits) and reports the trial as *diverged* at that step, with the
  reason, unevaluated: in a sweep a setting that diverges is a result, not something to
  rescue with another learning rate (the pipeline's stages roll back instead);
* at the end evaluates its EMA generator under the evaluation protocol
  (``cafm_core.protocol.evaluate_under``: the same draws, labels, noise and scoring as the
  pipeline's sample shards, so a sweep's numbers and the pipeline's compare one to one),
  and writes the generator to ``<out_url>/trials/<trial>/model``.

The FM generator is evaluated once at the same settings, so every trial's table row sits
beside the baseline and the noise floor. Trials read their inputs from storage, so they
run on any node of a cluster that reaches it.

The real data of the driver and of every trial is the prepared set's real reference
(``tasks.dataset_format.load_for_protocol``): every row of a set of up to 50,000 rows, else a
seeded uniform sample of 50,000 (FD against the statistics of all rows). Trials post-train on
those rows too: a sweep over a larger set trains on that sample, not on every row.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from ray.tune.result import AUTO_RESULT_KEYS

from cafm_core.checkpoint import model_from_checkpoint, model_to_tensors
from cafm_core.ema import EMA
from cafm_core.evaluation import (
    IMAGE_METRICS,
    POINT_METRICS,
    SamplerSetting,
    TrainingCurve,
)
from cafm_core.models import discriminator_from_generator
from cafm_core.protocol import EvaluationProtocol, evaluate_under
from cafm_core.training import DivergenceGuard, infinite_batches, train_cafm
from tasks.dataset_format import load_for_protocol
from tasks.sample_scoring import reference_floor
from tasks.storage import Store
from tasks.arrow_storage import ray_storage
from tasks.train.configs import train_config

# what Tune adds to every report (iteration counters, timestamps, host): not ours to log
_TUNE_KEYS = frozenset({*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint"})

__all__ = ["evaluate_generator", "rows_from_report", "run_sweep", "trial_name"]


def trial_name(index: int, point: Mapping[str, Any]) -> str:
    """``t03-generator_lr=3e-05,kind=uniform``: the index, then each swept value (a folder
    and run name; ``time_sampler.`` is dropped from keys)."""
    def show(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    parts = ",".join(f"{key.removeprefix('time_sampler.')}={show(value)}" for key, value in point.items())
    return f"t{index:02d}" + (f"-{parts}" if parts else "")


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if _is_number(v)}


class _Diverged(Exception):
    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"diverged at step {step}: {reason}")
        self.step, self.reason = step, reason


def _trial(config: dict, *, spec: dict) -> None:
    """One Tune trial (runs in a Ray worker process)."""
    from ray import tune

    trial = config["trial"]

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(trial["config"]["seed"])  # the discriminator head's initialisation
    store = Store(spec["store_root"])
    protocol = EvaluationProtocol.from_dict(spec["protocol"])
    reference = load_for_protocol(store, protocol, spec["data_url"])
    dataset, feature_net = reference.dataset, reference.feature_net
    tensors, model_config, metadata = store.read_checkpoint(spec["fm_url"])
    generator = model_from_checkpoint(tensors, model_config, metadata, use_ema=True)
    discriminator = discriminator_from_generator(generator)
    point = trial["point"]
    cfg = train_config("cafm", {**trial["config"], "log_every": 1})  # the callback picks the rows it reports
    curve = TrainingCurve(dataset, SamplerSetting(**spec["curve_setting"]), feature_net=feature_net,
                          num_samples=spec["curve_samples"], seed=protocol.seeds[0], real_stats=reference.stats)
    ema = EMA(generator, cfg.ema_decay, warmup=cfg.ema_warmup)
    labels = dataset.labels if getattr(generator, "null_class", None) is not None else None
    batches = infinite_batches(dataset.data, labels, cfg.batch_size, seed=cfg.seed)
    started = time.perf_counter()
    # the curve's starting point: the FM generator itself
    tune.report({"step": 0, **curve(generator, ema), "seconds": 0.0})

    guard = DivergenceGuard(**spec["divergence"])
    logged = [0]  # the last step whose metrics were checked

    def on_log(step: int, row: dict) -> None:
        done = logged[0] = step + 1
        reason = guard.reason({k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"})
        if reason:
            raise _Diverged(done, reason)
        if done % spec["curve_every"] and done != cfg.steps:
            return
        tune.report({**_finite(row), "step": done, **curve(generator, ema), "seconds": time.perf_counter() - started})

    try:
        train_cafm(generator, discriminator, batches, cfg, ema=ema, callback=on_log)
    except (_Diverged, FloatingPointError) as exc:  # train_cafm raises the latter on NaN/inf itself
        step, reason = (exc.step, exc.reason) if isinstance(exc, _Diverged) else (logged[0] + 1, str(exc))
        store.write_json(Store.join(spec["out_url"], "trials", trial["name"], "diverged.json"),
                         {"step": step, "reason": reason, "point": point})
        tune.report({"step": step, "final": 1.0, "diverged_at_step": step, "seconds": time.perf_counter() - started})
        return
    ema.copy_to(generator)
    rows = evaluate_generator(protocol, generator, dataset, feature_net, metadata.get("dataset"),
                              real_stats=reference.stats)
    model_url = Store.join(spec["out_url"], "trials", trial["name"], "model")
    lineage = {k: metadata[k] for k in ("dataset", "dataset_name") if k in metadata}
    model_tensors, saved_config, saved_meta = model_to_tensors(
        generator, ema_shadow=ema.shadow, metadata={**lineage, "stage": "cafm-sweep", "trial": trial["name"], "point": point}
    )
    store.write_checkpoint(model_url, model_tensors, saved_config, saved_meta)
    final = {"step": cfg.steps, "final": 1.0, "seconds": time.perf_counter() - started}
    for row in rows:
        prefix = f"eval.{row['method']}-nfe{row['nfe']}-cfg{row['cfg_scale']:g}.seed{row['seed']}."
        final.update({prefix + k: v for k, v in _finite(row).items() if k not in ("nfe", "cfg_scale", "seed")})
    tune.report(final)


def run_sweep(
    store: Store,
    *,
    data_url: str,
    fm_url: str,
    trials: list[dict[str, Any]],
    protocol: EvaluationProtocol,
    curve_setting: SamplerSetting,
    curve_every: int,
    curve_samples: int,
    cpus_per_trial: int,
    out_url: str,
    name: str,
    divergence: Mapping[str, Any] | None = None,
) -> dict:
    """Run every trial (``{"name", "point", "config"}``, config: CAFMConfig fields) with Ray
    Tune; returns each trial's curve and evaluation rows under ``protocol``, the FM
    generator's rows and the noise floor.

    Every config is validated (``CAFMConfig``) before Ray starts. The Tune experiment lives
    under ``<out_url>/tune``.
    """
    from ray import tune

    if not trials:
        raise ValueError("the sweep has no trials")
    for trial in trials:
        cfg = train_config("cafm", trial["config"])  # every config validated before compute
        if cfg.warmup_steps >= cfg.steps:
            raise ValueError(f"trial {trial['name']}: warmup_steps {cfg.warmup_steps} >= steps {cfg.steps}: no generator step")
    if not isinstance(curve_every, int) or curve_every < 1:
        raise ValueError(f"curve_every must be an int >= 1, got {curve_every!r}")
    reference = load_for_protocol(store, protocol, data_url)
    dataset, manifest, feature_net = reference.dataset, reference.manifest, reference.feature_net
    tensors, model_config, metadata = store.read_checkpoint(fm_url)
    fm_generator = model_from_checkpoint(tensors, model_config, metadata, use_ema=False)
    fm_rows = evaluate_generator(protocol, fm_generator, dataset, feature_net, metadata.get("dataset"),
                                 real_stats=reference.stats)
    seeds = list(protocol.seeds)
    curve = TrainingCurve(dataset, curve_setting, feature_net=feature_net, num_samples=curve_samples, seed=seeds[0],
                          real_stats=reference.stats)
    fm_curve = curve(fm_generator)
    floor = reference_floor(reference, real_features=curve.real_features, seed=seeds[0], store=store)

    spec = {
        "store_root": store.root, "data_url": data_url, "fm_url": fm_url, "out_url": out_url,
        "protocol": protocol.to_dict(),
        "curve_setting": curve_setting.to_dict(), "curve_every": curve_every, "curve_samples": curve_samples,
        "threads": cpus_per_trial, "divergence": DivergenceGuard(**(divergence or {})).to_dict(),
    }
    storage_fs, storage_base = ray_storage(Store.join(out_url, "tune"))
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, spec=spec), {"cpu": cpus_per_trial}),
        param_space={"trial": tune.grid_search(list(trials))},
        tune_config=tune.TuneConfig(
            trial_name_creator=lambda t: t.config["trial"]["name"],
            trial_dirname_creator=lambda t: t.config["trial"]["name"],
            # a local cluster counts one CPU more than the machine has (for Ray Data): keep
            # trials to the real cores; an existing cluster schedules by its own resources
            max_concurrent_trials=None if os.environ.get("RAY_ADDRESS") else max(1, (os.cpu_count() or 1) // cpus_per_trial),
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_base, storage_filesystem=storage_fs,
            verbose=1,
        ),
    )
    started = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - started
    outcomes = []
    for result in results:
        trial = result.config["trial"]
        history = [] if result.metrics_dataframe is None else result.metrics_dataframe.to_dict("records")
        history = [{k: v for k, v in row.items() if k not in _TUNE_KEYS and not str(k).startswith("config/") and _is_number(v)}
                   for row in history]
        curve = [{k: v for k, v in row.items() if not str(k).startswith("eval.")} for row in history if not row.get("final")]
        entry = {"name": trial["name"], "point": trial["point"], "curve": curve,
                 "error": None if result.error is None else str(result.error)}
        final = next((row for row in reversed(history) if row.get("final")), None)
        if final is not None and "diverged_at_step" in final:
            entry["diverged"] = store.read_json(Store.join(out_url, "trials", trial["name"], "diverged.json"))
        elif final is not None:
            entry["rows"] = rows_from_report(final, list(protocol.settings), seeds)
            entry["model_url"] = Store.join(out_url, "trials", trial["name"], "model")
        outcomes.append(entry)
    outcomes.sort(key=lambda t: t["name"])
    return {"trials": outcomes, "fm_rows": fm_rows, "fm_curve": fm_curve, "seconds": seconds, "noise_floor": floor,
            "dataset": manifest["name"], "metrics": IMAGE_METRICS if dataset.kind == "image" else POINT_METRICS,
            "real_reference": reference.note()}


def evaluate_generator(protocol: EvaluationProtocol, generator, dataset, feature_net, trained_on: str | None, *,
                       real_stats=None) -> list[dict]:
    """A generator's rows under the protocol (what each trial and the FM baseline report): the
    numbers the pipeline's sample shards give the same generator. ``dataset`` is the real
    reference's rows, ``real_stats`` its all-row statistics when they are a sample."""
    rows = evaluate_under(protocol, {"model": generator}, dataset, feature_net=feature_net,
                          trained_on={"model": trained_on}, real_stats=real_stats)
    return [{k: v for k, v in row.items() if k != "model"} for row in rows]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def rows_from_report(final: Mapping[str, Any], settings: list[SamplerSetting], seeds: list[int]) -> list[dict]:
    rows = []
    for setting in settings:
        for seed in seeds:
            prefix = f"eval.{setting.method}-nfe{setting.nfe}-cfg{setting.cfg_scale:g}.seed{seed}."
            metrics = {k[len(prefix):]: v for k, v in final.items() if str(k).startswith(prefix) and _is_number(v)}
            if metrics:
                rows.append({**setting.to_dict(), "seed": seed, **metrics})
    return rows
