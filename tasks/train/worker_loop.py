"""The loop every Ray Train worker runs, for FM and CAFM alike: restore, step, report,
checkpoint, roll back on divergence.

``train_worker`` reads top to bottom:

1. The worker checks that it runs the driver's code (every node has its own copy), then
   Accelerate adopts the process group Ray Train started (gloo on CPU, nccl on GPU) and
   wraps the networks in DDP; torch uses the CPUs the worker was given.
2. Restore: Ray's registered checkpoint or the newest verified one on storage, whichever is
   newer (``tasks.train.train_state``); else the networks start from the init checkpoint.
3. Steps: the stage's ``cafm_core`` step on this worker's batches. Every step's metrics go
   through ``cafm_core.training.DivergenceGuard`` (one all-reduced flag, so all ranks take
   the same branch): a divergence rolls every worker back to the last good state (the
   start, then each checkpoint, kept in memory) with learning rates times ``lr_factor``;
   after ``max_rollbacks`` the loop returns and the driver raises ``TrainingDiverged``.
4. Every ``log_every`` steps: metrics averaged over workers, a progress line, the optional
   diagnostic curve (rank 0); every ``checkpoint_every`` steps rank 0 attaches a training
   state to ``ray.train.report`` (a barrier: every rank reports the same number of times).

On restore each worker's noise generator is reseeded from (seed, rank, step): a resumed run
is reproducible but not bit-identical to an uninterrupted one (nor is the data order).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import tempfile
import time
from typing import Any

import ray
import torch

from cafm_core.allocator import retain_freed_memory
from cafm_core.checkpoint import unflatten_state_dicts
from cafm_core.training import DivergenceGuard
from tasks.code_version import code_identity
from tasks.train.configs import train_config
from tasks.train.shards import ShardCollate, read_rows, worker_batches
from tasks.train.stages import Stage, build_stage, copy_state
from tasks.train.train_state import RunCheckpoints, checkpoint_folder, save_train_state, verified_state

__all__ = ["progress_line", "train_worker"]

logger = logging.getLogger(__name__)


def train_worker(loop: dict) -> dict:
    """One Ray Train worker's whole run; ``loop`` is the driver's ``train_loop_config``."""
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel

    entered, entered_at = time.perf_counter(), time.time()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    here = _where_this_worker_runs(rank, loop.get("code_digest"))
    accelerator = Accelerator(cpu=not loop["use_gpu"], mixed_precision=loop["mixed_precision"])
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"Accelerate sees {accelerator.num_processes} processes but Ray Train runs {world_size} workers"
        )
    if not loop["use_gpu"]:
        # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker was given instead
        torch.set_num_threads(loop["threads"])
    retain_freed_memory()  # steps stop faulting their memory in anew (cafm_core.allocator)
    stage_name = loop["stage"]
    config = train_config(stage_name, loop["train_config"])
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)

    # -- restore: Ray's registered checkpoint, or a newer verified one on storage --
    checkpoint = ray.train.get_checkpoint()  # set after a worker failure or for an existing run dir
    restored = verified_state(checkpoint, stage_name) if checkpoint is not None else None
    newest = RunCheckpoints(loop["storage_path"], loop["run_name"]).newest_verified(config.steps)
    if newest is not None and (restored is None or int(newest[2]["step"]) > int(restored[2]["step"])):
        restored = newest
    init = ray.get(loop["init_ref"]) if restored is None and loop["init_ref"] is not None else None
    stage = build_stage(stage_name, config, accelerator, restored, init=init, model_config=loop["model_config"])
    if world_size > 1 and not isinstance(stage.generator_ddp, DistributedDataParallel):
        raise RuntimeError(f"Accelerate did not wrap the generator in DDP (got {type(stage.generator_ddp).__name__})")
    workers = _gather(here, world_size)
    if rank == 0 and world_size > 1:
        logger.info("[%s] %d workers on %d node(s): %s", stage_name, world_size, len({w["node_id"] for w in workers}),
                    ", ".join(f"rank {w['rank']} on {w['node_id'][:8]}" for w in workers))

    start, history, rollbacks = 0, [], []
    if restored is not None:
        tensors, _, metadata = restored
        stage.load_state(unflatten_state_dicts(tensors), metadata)
        start = int(metadata["step"])
        history = [row for row in metadata["history"] if row["step"] <= start]
        rollbacks = list(metadata.get("rollbacks", []))
    if rank == 0:
        where = f"restored from step {start}" if restored is not None else "starting from step 0"
        logger.info(
            "[%s] %s; accelerate: %s, %d processes, device %s, mixed precision %s",
            stage_name, where, accelerator.distributed_type, accelerator.num_processes,
            accelerator.device, accelerator.mixed_precision,
        )

    curve = _training_curve(loop["curve"], accelerator.device) if rank == 0 and loop.get("curve") else None
    if curve is not None and restored is None:
        history.append({"step": start, **curve(stage.generator, stage.ema)})  # where post-training starts

    # -- the steps --
    steps, every, log_every = config.steps, loop["checkpoint_every"], config.log_every
    guard = DivergenceGuard(**loop["divergence"])
    # the last good state (the start, then each checkpoint), kept in memory on every rank:
    # a divergence rolls back to it without reading storage
    good_step, good_state, rollbacks_since_good = start, copy_state(stage.state()), 0
    rng = torch.Generator(device=accelerator.device).manual_seed(_seed_for(config.seed, rank, start))
    collate = ShardCollate(loop["sample_shape"], loop["num_classes"])
    rows = read_rows(loop["in_memory_urls"], collate, rank, world_size) if loop["in_memory_urls"] else None
    batches = worker_batches(config.batch_size, collate, accelerator.device, rows=rows,
                             seed=_seed_for(config.seed + 1, rank, start))
    metrics: dict[str, float] = {}
    last_time, last_step = time.perf_counter(), start
    began = time.perf_counter()
    index = start
    while index < steps:
        metrics = stage.step(index, next(batches), rng)
        reason = guard.reason(metrics)
        if _any_rank(reason is not None, accelerator.device):
            reason = reason or "another worker's step diverged"
            if len(rollbacks) >= guard.max_rollbacks:
                message = (
                    f"{stage_name} training diverged at step {index + 1} ({reason}) after {len(rollbacks)} "
                    f"rollback(s) (max_rollbacks={guard.max_rollbacks}); stopped. The last good checkpoint is "
                    f"step {good_step}; no checkpoint after it was written. Lower the learning rate, or allow "
                    "more rollbacks"
                )
                if rank == 0:
                    logger.error("[%s] %s", stage_name, message)
                return {"history": history, "start_step": start, "checksums": [], "rollbacks": rollbacks,
                        "workers": workers,
                        "diverged": message}
            rollbacks_since_good += 1
            stage.load_state(*copy_state(good_state))
            stage.forget_metrics()  # a diverged G step's loss must not trip the next D step's check
            rates = stage.scale_learning_rates(guard.lr_factor ** rollbacks_since_good)
            rollbacks.append({"at_step": index + 1, "to_step": good_step, "reason": reason, "learning_rates": rates})
            history = [row for row in history if row["step"] <= good_step]
            index = good_step
            # fresh noise for the retried steps (the data iterator simply goes on)
            rng.manual_seed(_seed_for(config.seed, rank, 1_000_003 * len(rollbacks) + index))
            last_time, last_step = time.perf_counter(), index
            if rank == 0:
                logger.warning(
                    "[%s] diverged at step %d (%s): rolled back to step %d, learning rates now %s (rollback %d of %d)",
                    stage_name, rollbacks[-1]["at_step"], reason, good_step, rates, len(rollbacks), guard.max_rollbacks,
                )
            continue
        done = index + 1
        index = done
        is_checkpoint = done % every == 0 or done == steps
        if not (is_checkpoint or done % log_every == 0):
            continue

        # -- report (and checkpoint) --
        now = time.perf_counter()
        row = _all_reduce_mean(metrics, accelerator.device)
        row["samples_per_s"] = (done - last_step) * config.batch_size * world_size / max(now - last_time, 1e-9)
        row = {"step": done, **row}
        if curve is not None:
            row.update(curve(stage.generator, stage.ema))
        last_time, last_step = time.perf_counter(), done  # the next samples/s leaves the curve's time out
        history.append(row)
        if rank == 0:
            logger.info(progress_line(stage_name, row, steps, start, now - began))
        # every rank reports (report is a barrier); rank 0 alone attaches the checkpoint
        if is_checkpoint and rank == 0:
            with tempfile.TemporaryDirectory(prefix="cafm_ckpt_") as tmp:
                _save(tmp, stage, loop, done, world_size, history, rollbacks)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=checkpoint_folder(done))
        else:
            ray.train.report(row, checkpoint=None)
        if is_checkpoint:
            good_step, good_state, rollbacks_since_good = done, copy_state(stage.state()), 0

    checksums: list[str] = [stage.checksum()]
    if _distributed():
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, checksums[0])
        checksums = [str(c) for c in gathered]
    # where this worker's time went: set-up (restore, networks, DDP) and the step loop
    # (steps, reports, checkpoints), for bench/bench_pipeline.py
    timing = {"entered_at": entered_at, "setup_s": began - entered, "loop_s": time.perf_counter() - began,
              "loop_steps": steps - start}
    return {"history": history, "start_step": start, "checksums": checksums, "rollbacks": rollbacks,
            "workers": workers, "timing": timing}


def _save(directory: str, stage: Stage, loop: dict, step: int, world_size: int, history: list[dict],
          rollbacks: list[dict]) -> None:
    states, metadata = stage.state()
    save_train_state(directory, stage=stage.name, states=states, metadata=metadata,
                     model_config=stage.generator.config.to_dict(), train_config=loop["train_config"], step=step,
                     seed=stage.config.seed, world_size=world_size, history=history, rollbacks=rollbacks)


def _where_this_worker_runs(rank: int, driver_digest: str | None) -> dict:
    """This worker's rank, Ray node, host and code; refuses code other than the driver's
    (each node runs its own installed copy: two versions must never train one model)."""
    code = code_identity()
    if driver_digest is not None and code["digest"] != driver_digest:
        raise RuntimeError(
            f"training worker {rank} on host {socket.gethostname()} runs other code than the driver: {code['path']} "
            f"(digest {code['digest']}, commit {code['commit']}) vs the driver's digest {driver_digest}. Install the "
            "driver's version of cafm-pipeline on every Ray node (docs/multinode.md) and restart the node")
    return {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "code_path": code["path"], "code_digest": code["digest"]}


def _gather(item: dict, world_size: int) -> list[dict]:
    """``item`` of every rank, in rank order (one all-gather at the start of training)."""
    if not _distributed():
        return [item]
    items: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(items, item)
    return items


def _training_curve(spec: dict, device: torch.device):
    """Rank 0's diagnostic curve (``cafm_core.evaluation.TrainingCurve``) against the prepared
    data's real reference (at most 50,000 rows; FD against all rows' statistics beyond)."""
    from cafm_core.evaluation import SamplerSetting, TrainingCurve
    from tasks.dataset_format import load_for_evaluation
    from tasks.storage import Store

    reference = load_for_evaluation(Store(spec["store_root"]), spec["data_url"])
    return TrainingCurve(reference.dataset, SamplerSetting(spec["method"], spec["nfe"], 1.0),
                         feature_net=reference.feature_net, num_samples=spec["num_samples"], seed=spec["seed"],
                         device=device, real_stats=reference.stats)


def _distributed() -> bool:
    """Whether collectives are needed: a process group of more than one process (Ray Train
    starts a group for a single worker too, where a per-step collective only costs time)."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _all_reduce_mean(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    if not _distributed():
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    values /= torch.distributed.get_world_size()
    return {k: float(v) for k, v in zip(keys, values.tolist())}


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (all ranks must take the same branch)."""
    if not _distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def _seed_for(seed: int, rank: int, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def progress_line(stage: str, row: dict, steps: int, start: int, elapsed: float) -> str:
    """``[fm] [#####.....] 1000/2000 50% 2m10s<2m10s fm_loss=...``: a text progress bar
    per report (it reads the same in a terminal, a log file and the Prefect UI)."""
    done = row["step"]
    share = done / steps
    filled = int(20 * share)
    remaining = elapsed / max(done - start, 1) * (steps - done)
    parts = [f"[{stage}] [{'#' * filled}{'.' * (20 - filled)}] {done}/{steps} {100 * share:.0f}% "
             f"{_duration(elapsed)}<{_duration(remaining)}"]
    parts += [f"{k}={v:.4g}" for k, v in row.items() if k != "step"]
    return " ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
