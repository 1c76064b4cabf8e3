"""FM vs CAFM on digits at a GPU budget: a larger DiT, bf16, several training seeds at once.

    python3 bench/evidence_gpu.py --out outputs/gpu-evidence          # on a GPU machine (about 9 minutes)
    python3 bench/evidence_gpu.py --device cpu --smoke --seeds 0 1    # the same code path on a CPU (about a minute)

The comparison is the core demo's (`cafm_core.demo.run_demo`: FM pretraining, CAFM
post-training from the FM EMA, evaluation of both at identical Heun settings, guidance-free,
on as many samples as the dataset, against the in-domain feature network), with the
pipeline's digits setting for both stages (`PIPELINE_FM`, `PIPELINE_CAFM`, kept equal to
`flows/params.py` by a test) and, where a GPU affords it, a larger DiT (`--preset`), a larger
batch and bf16 autocast. Each training seed runs in its own process, all at once: the models
are small enough that one process leaves a GPU mostly idle (kernel-launch bound), so three
seeds take little longer than one. The feature network is trained with one seed (0) in every
process, so all seeds share one metric.

Step counts: `--fm-steps` / `--cafm-steps`, or `auto` (the default): a calibration run of the
same processes at smoke size first measures seconds per step under the same concurrency, then
FM gets 30% and CAFM 70% of `--budget` seconds of training. The calibration doubles as a check
that the whole path runs on the device before the long run starts. The chosen steps are
printed and written to the report, so a rerun can pin them.

Writes to `--out`: report.md (tables: mean and spread over training seeds, CAFM - FM paired by
training seed, noise floor), evidence.json (every row), evidence.log (every process's log),
samples.png (first seed's samples).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without an install

import torch  # noqa: E402

from cafm_core.demo import run_demo  # noqa: E402
from cafm_core.evaluation import (  # noqa: E402
    IMAGE_METRICS,
    format_differences,
    format_table,
    paired_differences,
    summarise_over_seeds,
)
from cafm_core.path import TimeSampler  # noqa: E402

# The pipeline's defaults for digits (flows/params.py FMParams / CAFMParams); a unit test keeps them equal.
PIPELINE_FM = {"lr": 1e-3, "ema_decay": 0.999, "label_drop": 0.1, "grad_clip": 1.0}
PIPELINE_CAFM = {
    "generator_lr": 3e-5,
    "discriminator_lr": 1e-4,
    "discriminator_steps": 4,
    "warmup_steps": 200,
    "ema_decay": 0.99,
    "ema_warmup": False,
    "centering_penalty": 1e-3,
    "transport_penalty": 0.0,
    "logit_mode": "reverse",
    "label_drop": 0.1,
    "time_sampler": TimeSampler(kind="logit_normal", mean=-1.0),
}
FM_SHARE = 0.3  # of the training budget; CAFM gets the rest


def choose_steps(budget: float, fm_seconds_per_step: float, cafm_seconds_per_step: float, warmup: int,
                 *, round_to: int = 100) -> tuple[int, int]:
    """FM and CAFM step counts that fit ``budget`` seconds of training (FM ``FM_SHARE`` of it),
    rounded down to ``round_to``; CAFM keeps at least one generator step after its warmup."""
    if budget <= 0 or fm_seconds_per_step <= 0 or cafm_seconds_per_step <= 0:
        raise ValueError("budget and seconds per step must be positive")
    fm = max(round_to, int(FM_SHARE * budget / fm_seconds_per_step) // round_to * round_to)
    cafm = int((1 - FM_SHARE) * budget / cafm_seconds_per_step) // round_to * round_to
    return fm, max(cafm, warmup + round_to)


def _run_seed(job: dict) -> dict:
    """One training seed in its own process; its printout goes to ``job['log']``."""
    torch.set_num_threads(job.pop("threads"))
    log = Path(job.pop("log"))
    with open(log, "w") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        result = run_demo("digits", **job)
    return json.loads(json.dumps(result, default=str))


def _run_all(jobs: list[dict], on_done=None) -> list[dict]:
    """Every job at once, each in a fresh (spawned) process; results in the jobs' order."""
    results: list[dict | None] = [None] * len(jobs)
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_seed, dict(job)): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if on_done is not None:
                on_done()
    return results  # type: ignore[return-value]


def _seconds(stage: dict, seed: int) -> str:
    return "" if stage["seconds"] is None else f" ({stage['seconds']:.0f} s for seed {seed})"


def per_training_seed(results: list[dict], seeds: list[int]) -> list[dict]:
    """One row per (model, setting, training seed): each metric averaged over the sampling seeds."""
    rows = []
    for seed, result in zip(seeds, results):
        groups: dict[tuple, list[dict]] = {}
        for row in result["rows"]:
            groups.setdefault((row["model"], row["method"], row["nfe"], row["cfg_scale"]), []).append(row)
        for (model, method, nfe, cfg), members in groups.items():
            row = {"model": model, "method": method, "nfe": nfe, "cfg_scale": cfg, "seed": seed}
            for key in IMAGE_METRICS:
                values = [m[key] for m in members if key in m and m[key] is not None]
                if values:
                    row[key] = statistics.fmean(values)
            rows.append(row)
    return rows


def verdict(rows: list[dict], metric: str = "fd") -> list[str]:
    """Per NFE: is CAFM lower in every training seed, and is the gap of the means larger than
    the spread (standard deviation over training seeds) of either model?"""
    lines = []
    summary = {(s["model"], s["nfe"]): s for s in summarise_over_seeds(rows, (metric,))}
    for diff in paired_differences(rows, metric):
        fm, cafm = summary[("FM", diff["nfe"])], summary[("CAFM", diff["nfe"])]
        spread = max(fm[f"{metric}_std"], cafm[f"{metric}_std"])
        every = all(d < 0 for d in diff["diffs"])
        gap = fm[metric] - cafm[metric]
        lines.append(
            f"NFE {diff['nfe']}: CAFM {'lower' if every else 'not lower'} in every training seed "
            f"({sum(d < 0 for d in diff['diffs'])}/{len(diff['diffs'])}); gap of the means {gap:+.3f} vs spread {spread:.3f}: "
            f"{'ahead by more than the spread' if gap > spread else 'not beyond the spread'}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/gpu-evidence")
    parser.add_argument("--work", help="checkpoints and per-process logs (default: <out>/work)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--preset", default="mini", help="DiT size (tiny is the CPU pipeline's)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (one process each)")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds per model")
    parser.add_argument("--nfe", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--fm-steps", default="auto")
    parser.add_argument("--cafm-steps", default="auto")
    parser.add_argument("--budget", type=float, default=330, help="seconds of training (FM + CAFM) for auto steps")
    parser.add_argument("--calibration-steps", type=int, default=150, help="FM and CAFM steps of the calibration run")
    parser.add_argument("--smoke", action="store_true", help="smoke-sized evaluation (256 samples), for a quick check")
    parser.add_argument("--evaluate", metavar="DIR",
                        help="no training: evaluate the checkpoints DIR/seedN/{fm,cafm} of an earlier run (its <work>/main), "
                             "e.g. trained on a GPU and evaluated on a CPU; pass that run's --fm-steps/--cafm-steps/--preset/--batch")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible (use --device cpu for a check)")
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // len(args.seeds))
    log_file = out / "evidence.log"
    started = time.perf_counter()

    def jobs(phase: str, fm_steps: int, cafm_steps: int, profile: str, warmup: int) -> list[dict]:
        return [
            {"profile": profile, "output": str(work / phase / f"seed{seed}"), "seed": seed, "device": args.device,
             "nfes": tuple(args.nfe), "fm_steps": fm_steps, "cafm_steps": cafm_steps, "preset": args.preset,
             "batch_size": args.batch, "dtype": args.dtype, "fm_overrides": PIPELINE_FM,
             "cafm_overrides": {**PIPELINE_CAFM, "warmup_steps": warmup},
             "eval_seeds": tuple(args.eval_seeds) if profile == "default" else (args.eval_seeds[0],),
             "feature_seed": 0, "threads": threads, "log": str(work / f"{phase}-seed{seed}.log"),
             **({"trained": str(Path(args.evaluate) / f"seed{seed}")} if args.evaluate else {})}
            for seed in args.seeds
        ]

    def collect_logs() -> None:
        with open(log_file, "w") as merged:
            for log in sorted(work.glob("*-seed*.log")):
                merged.write(f"===== {log.name}\n{log.read_text()}\n")

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device {device_name}, torch {torch.__version__}, {args.dtype}, DiT-{args.preset}, batch {args.batch}, "
          f"training seeds {args.seeds} at once, {threads} CPU threads each", flush=True)
    calibration = None
    try:
        fm_steps, cafm_steps = args.fm_steps, args.cafm_steps
        if args.evaluate and "auto" in (fm_steps, cafm_steps):
            parser.error("--evaluate needs the trained run's --fm-steps and --cafm-steps")
        if "auto" in (fm_steps, cafm_steps):
            print(f"calibration: {args.calibration_steps} FM + {args.calibration_steps} CAFM steps per seed, smoke-sized", flush=True)
            results = _run_all(jobs("calibration", args.calibration_steps, args.calibration_steps, "smoke", args.calibration_steps // 5))
            fm_s = max(r["fm"]["seconds"] for r in results) / args.calibration_steps
            cafm_s = max(r["cafm"]["seconds"] for r in results) / args.calibration_steps
            auto_fm, auto_cafm = choose_steps(args.budget, fm_s, cafm_s, PIPELINE_CAFM["warmup_steps"])
            fm_steps = auto_fm if fm_steps == "auto" else fm_steps
            cafm_steps = auto_cafm if cafm_steps == "auto" else cafm_steps
            calibration = {"fm_ms_per_step": 1e3 * fm_s, "cafm_ms_per_step": 1e3 * cafm_s,
                           "seconds": time.perf_counter() - started}
            print(f"  {1e3 * fm_s:.1f} ms per FM step, {1e3 * cafm_s:.1f} ms per CAFM step (slowest process) "
                  f"-> FM {fm_steps} steps, CAFM {cafm_steps} steps for a {args.budget:.0f} s budget "
                  f"[{calibration['seconds']:.0f}s]", flush=True)
        fm_steps, cafm_steps = int(fm_steps), int(cafm_steps)
        warmup = min(PIPELINE_CAFM["warmup_steps"], cafm_steps // 5)
        print(f"comparison: FM {fm_steps} steps, CAFM {cafm_steps} steps ({warmup} D-only warmup, "
              f"N={PIPELINE_CAFM['discriminator_steps']}) per seed", flush=True)
        done = []
        results = _run_all(jobs("main", fm_steps, cafm_steps, "smoke" if args.smoke else "default", warmup),
                           on_done=lambda: (done.append(1), print(f"  {len(done)}/{len(args.seeds)} seeds done "
                                                                  f"[{time.perf_counter() - started:.0f}s]", flush=True)))
    finally:
        collect_logs()

    rows = per_training_seed(results, args.seeds)
    table = format_table(summarise_over_seeds(rows, IMAGE_METRICS), results[0]["noise_floor"], IMAGE_METRICS)
    differences = "\n".join(format_differences(paired_differences(rows, key), floor=results[0]["noise_floor"])
                            for key in ("fd", "kid"))
    lines = verdict(rows)
    seconds = time.perf_counter() - started
    first = results[0]
    command = "python3 bench/evidence_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([
        f"# FM vs CAFM on digits: {device_name}, DiT-{args.preset}, {args.dtype}",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min in all). torch {torch.__version__}.",
        f"Model: {first['model']}. Batch {args.batch}. Training seeds {args.seeds} (one process each, at once); "
        f"sampling seeds {list(first['eval_seeds'])} per model, averaged within a training seed.",
        f"FM: {fm_steps} steps{_seconds(first['fm'], args.seeds[0])}; CAFM: {cafm_steps} steps, "
        f"{first['cafm']['generator_steps']} generator steps{_seconds(first['cafm'], args.seeds[0])}; "
        f"settings as the pipeline's digits defaults. "
        + (f"Checkpoints of {args.evaluate}, evaluated on {device_name}. " if args.evaluate else "")
        + f"Feature network val accuracy "
        f"{sorted({r['feature_val_accuracy'] for r in results})}.",
        "" if calibration is None else (
            f"Calibration: {calibration['fm_ms_per_step']:.1f} ms per FM step, {calibration['cafm_ms_per_step']:.1f} ms "
            f"per CAFM step (slowest of {len(args.seeds)} concurrent processes) -> steps for a {args.budget:.0f} s budget."),
        "",
        "Mean ± standard deviation over training seeds (each seed: the mean over its sampling seeds):",
        "",
        table,
        "",
        "CAFM − FM, paired by training seed:",
        "",
        differences,
        "",
        *[f"- {line}" for line in lines],
        "",
    ])
    (out / "report.md").write_text(report)
    (out / "evidence.json").write_text(json.dumps(
        {"device": device_name, "torch": torch.__version__, "args": vars(args), "fm_steps": fm_steps,
         "cafm_steps": cafm_steps, "calibration": calibration, "rows": rows, "results": results,
         "seconds": seconds}, indent=1, default=str))
    picture = work / "main" / f"seed{args.seeds[0]}" / "samples.png"
    if picture.exists():
        shutil.copy(picture, out / "samples.png")
    print("\n" + report, flush=True)
    print(f"wrote {out}/report.md, evidence.json, evidence.log, samples.png (checkpoints under {work / 'main'})")
    return 0 if all(math.isfinite(r["fd"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
