"""The pipeline's training stages against a bare ``cafm_core`` loop, side by side in one run.

    python bench/bench_pipeline.py                                  # about 5 minutes on 2 cores
    python bench/bench_pipeline.py --json docs/results/pipeline_bench.json

Both ways run the same FM steps, then the same CAFM steps (the main job's settings for digits:
``flows.params`` defaults, same model, batch, learning rates, time sampler, EMA, N), on the
same prepared digits (the prepare stage's own shards on a local store), with the same torch
threads:

(a) bare: ``cafm_core.training.train_flow_matching`` / ``train_cafm`` over the prepared rows
    held in memory (``infinite_batches``), in this process;
(b) pipeline: ``tasks.train.driver.run_flow_matching`` / ``run_cafm``, the calls the stage
    tasks make: a Ray Train worker reads its batches with Ray Data, runs the divergence
    guard, reports every ``log_every`` steps and checkpoints to storage every
    ``checkpoint_every`` steps (the main job's cadence).

Per-step time: (a) the loop's wall time / steps, run before and again after (b) (the mean
of the two; both are printed); (b) the worker's step loop (first step to
last, reports and checkpoints included) / steps. ``ratio_fm`` and ``ratio_cafm`` = (b) / (a).
CAFM runs ``--cafm-steps`` with the main job's share of D-only warm-up (a fifth).

Fixed costs, measured in the same run: Ray's start (``ray.init`` of the local cluster), each
stage's start-up and shut-down (the driver's wall time minus the worker's step loop), and the
start of Prefect's temporary server (a trivial flow in a fresh process, minus the same
process without the flow; counted with an existing ``PREFECT_HOME``, and also reported for a
fresh one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without an install

import torch  # noqa: E402

from cafm_core.allocator import retain_freed_memory  # noqa: E402
from cafm_core.ema import EMA  # noqa: E402
from cafm_core.models import build_generator, config_from_dict, discriminator_from_generator  # noqa: E402
from cafm_core.training import infinite_batches, train_cafm, train_flow_matching  # noqa: E402
from flows.params import PipelineParams  # noqa: E402
from tasks.dataset_format import load_prepared, shard_urls  # noqa: E402
from tasks.pipeline_stages import model_config_for  # noqa: E402
from tasks.prepare import prepare_dataset  # noqa: E402
from tasks.ray_cluster import start_cluster, worker_cpus  # noqa: E402
from tasks.storage import Store  # noqa: E402
from tasks.train.configs import train_config  # noqa: E402
from tasks.train.driver import run_cafm, run_flow_matching  # noqa: E402


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def prefect_start_seconds() -> dict:
    """A fresh process running a trivial flow (Prefect's temporary server starts), against the
    same process only importing Prefect: with a fresh ``PREFECT_HOME`` (a new machine: the
    server creates its database) and again with that home (every later run)."""
    def run(code: str, home: str) -> float:
        env = {**os.environ, "PREFECT_HOME": home}
        env.pop("PREFECT_API_URL", None)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tasks.offline\n" + code], check=True, env=env,
                       capture_output=True, timeout=300, cwd=str(Path(__file__).resolve().parents[1]))
        return time.perf_counter() - started
    flow = "from prefect import flow\n@flow\ndef f():\n    return 1\nf()"
    with tempfile.TemporaryDirectory() as home:
        imports = run("import prefect", home)
        fresh = run(flow, home)
        again = run(flow, home)
    return {"import_s": imports, "fresh_home_s": fresh - imports, "server_and_flow_s": again - imports}


def bare(stage: str, dataset, model_config: dict, config, threads: int, init: torch.nn.Module | None):
    """(a): the stage's cafm_core loop in this process; returns (seconds per step, the generator)."""
    torch.set_num_threads(threads)
    retain_freed_memory()  # as the Ray Train worker loop does
    labels = dataset.labels if model_config.get("num_classes", 0) > 0 else None
    torch.manual_seed(config.seed)
    if stage == "fm":
        generator = build_generator(config_from_dict(dict(model_config)))
        ema = EMA(generator, config.ema_decay, warmup=True)
        batches = infinite_batches(dataset.data, labels, config.batch_size, seed=config.seed)
        result, seconds = _timed(lambda: train_flow_matching(generator, batches, config, ema=ema))
    else:
        generator = init
        discriminator = discriminator_from_generator(generator)
        ema = EMA(generator, config.ema_decay, warmup=config.ema_warmup)
        batches = infinite_batches(dataset.data, labels, config.batch_size, seed=config.seed + 1)
        result, seconds = _timed(lambda: train_cafm(generator, discriminator, batches, config, ema=ema))
    ema.copy_to(generator)
    return seconds / config.steps, generator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fm-steps", type=int, default=400)
    parser.add_argument("--cafm-steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: the main job's)")
    parser.add_argument("--no-prefect", action="store_true", help="skip the Prefect start measurement")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)

    params = PipelineParams()
    compute = params.compute.settings()
    if args.workers:
        compute["num_workers"] = args.workers
    threads = worker_cpus(compute["num_workers"], compute["cpus_per_worker"])
    fm_values = {**params.fm.core_config(params.seed), "steps": args.fm_steps}
    cafm_values = {**params.cafm.core_config(params.seed), "steps": args.cafm_steps,
                   "warmup_steps": args.cafm_steps // 5}
    out: dict = {"torch": torch.__version__, "cpus": os.cpu_count(), "workers": compute["num_workers"],
                 "threads_per_worker": threads, "fm_steps": args.fm_steps, "cafm_steps": args.cafm_steps,
                 "checkpoint_every": compute["checkpoint_every"]}
    with tempfile.TemporaryDirectory(prefix="cafm-bench-pipeline-") as tmp:
        store = Store(tmp)
        manifest, out["prepare_s"] = _timed(lambda: prepare_dataset(
            params.data.source, store, store.join(tmp, "data"), feature_steps=1, seed=params.seed))
        data_url = store.join(tmp, "data")
        dataset, _ = load_prepared(store, data_url)
        model_config = model_config_for(params.model.model_dump(), manifest)
        print(f"digits prepared: {tuple(dataset.data.shape)}; model {model_config['hidden_size']}x{model_config['depth']}, "
              f"{compute['num_workers']} worker(s) x {threads} thread(s); FM {args.fm_steps} steps, CAFM {args.cafm_steps} "
              f"steps ({cafm_values['warmup_steps']} D-only warm-up)", flush=True)

        fm_config, cafm_config = train_config("fm", fm_values), train_config("cafm", cafm_values)
        out["bare_fm_s_per_step"], fm_generator = bare("fm", dataset, model_config, fm_config, threads, None)
        print(f"(a) bare FM: {1e3 * out['bare_fm_s_per_step']:.1f} ms/step", flush=True)
        out["bare_cafm_s_per_step"], _ = bare("cafm", dataset, model_config, cafm_config, threads, fm_generator)
        print(f"(a) bare CAFM: {1e3 * out['bare_cafm_s_per_step']:.1f} ms/step", flush=True)

        _, out["ray_start_s"] = _timed(lambda: start_cluster(compute["num_workers"], threads, compute["use_gpu"]))
        print(f"Ray start: {out['ray_start_s']:.1f} s", flush=True)
        common = {"shard_urls": shard_urls(store, data_url), "sample_shape": tuple(manifest["sample_shape"]),
                  "num_classes": manifest["num_classes"], "storage_path": store.join(tmp, "ray"), **compute}
        fm, fm_wall = _timed(lambda: run_flow_matching(model_config=model_config, fm_config=fm_values,
                                                       output_dir=str(Path(tmp) / "fm"), run_name="bench-fm", **common))
        cafm, cafm_wall = _timed(lambda: run_cafm(init_checkpoint=fm["model_dir"], cafm_config=cafm_values,
                                                  output_dir=str(Path(tmp) / "cafm"), run_name="bench-cafm", **common))
        # (a) again after (b): the ratio uses the mean of the two, so that load drifting during
        # the run shows as a spread between them instead of biasing the ratio
        again_fm, fm_generator = bare("fm", dataset, model_config, fm_config, threads, None)
        again_cafm, _ = bare("cafm", dataset, model_config, cafm_config, threads, fm_generator)
        out["bare_fm_s_per_step_runs"] = [out["bare_fm_s_per_step"], again_fm]
        out["bare_cafm_s_per_step_runs"] = [out["bare_cafm_s_per_step"], again_cafm]
        out["bare_fm_s_per_step"] = (out["bare_fm_s_per_step"] + again_fm) / 2
        out["bare_cafm_s_per_step"] = (out["bare_cafm_s_per_step"] + again_cafm) / 2
        print(f"(a) again, with Ray's processes up: FM {1e3 * again_fm:.1f}, CAFM {1e3 * again_cafm:.1f} ms/step", flush=True)
    for name, result, wall in (("fm", fm, fm_wall), ("cafm", cafm, cafm_wall)):
        timing = result["timing"]
        per_step = timing["loop_s"] / timing["loop_steps"]
        out[f"pipeline_{name}_s_per_step"] = per_step
        out[f"ratio_{name}"] = per_step / out[f"bare_{name}_s_per_step"]
        out[f"{name}_stage_wall_s"] = wall
        out[f"{name}_worker_setup_s"] = timing["setup_s"]
        out[f"{name}_stage_fixed_s"] = wall - timing["loop_s"]
        out[f"{name}_timing"] = timing
        print(f"(b) pipeline {name.upper()}: {1e3 * per_step:.1f} ms/step -> ratio {out[f'ratio_{name}']:.3f}x; "
              f"stage {wall:.1f} s, of which {out[f'{name}_stage_fixed_s']:.1f} s outside the step loop: Ray Train's "
              f"start {timing['start_s']:.1f} s, the worker's set-up {timing['setup_s']:.1f} s, Ray Train's end "
              f"{timing['end_s']:.1f} s, the driver's checks and outputs {wall - timing['start_s'] - timing['setup_s'] - timing['loop_s'] - timing['end_s']:.1f} s", flush=True)
    if not args.no_prefect:
        out["prefect"] = prefect_start_seconds()
        print(f"Prefect: import {out['prefect']['import_s']:.1f} s; temporary server + a trivial flow "
              f"{out['prefect']['server_and_flow_s']:.1f} s ({out['prefect']['fresh_home_s']:.1f} s the first time "
              "on a machine, creating its database)", flush=True)
    out["fixed_total_s"] = (out["ray_start_s"] + out["fm_stage_fixed_s"] + out["cafm_stage_fixed_s"]
                            + out.get("prefect", {}).get("server_and_flow_s", 0.0))
    print(f"ratio_fm {out['ratio_fm']:.3f}  ratio_cafm {out['ratio_cafm']:.3f}  fixed costs (Ray start, the two "
          f"training stages' start-up, Prefect) {out['fixed_total_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
