"""Ray Train stages (tasks/train/) on a 2-worker local Ray cluster (loopback, CPU, gloo DDP).

Tiny models and few steps: the checks are about the distributed plumbing (DDP sync,
checkpoints, resume, data shards), not about sample quality.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cafm_core.checkpoint import load_checkpoint, load_model, save_model, unflatten_state_dicts
from cafm_core.data import load_builtin
from cafm_core.models import MLPConfig, build_generator, dit_config
from tasks.ray_cluster import LOCAL_NODE_IP
from tasks.train.driver import TrainingDiverged, run_cafm, run_flow_matching
from tasks.train.train_state import optimizer_state_from_tensors, optimizer_state_to_tensors

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")


def write_shards(dataset, directory, num_shards: int, *, fixed_size: bool, null_labels_every: int = 0) -> list[str]:
    """Parquet shards with column x (flattened float32 sample) and label (int64, maybe null)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = dataset.data.numpy().reshape(len(dataset), -1).astype(np.float32)
    labels = dataset.labels.numpy()
    urls = []
    for index, rows in enumerate(np.array_split(np.arange(len(dataset)), num_shards)):
        flat = pa.array(data[rows].ravel(), pa.float32())
        if fixed_size:
            x = pa.FixedSizeListArray.from_arrays(flat, data.shape[1])
        else:
            x = pa.ListArray.from_arrays(pa.array(np.arange(len(rows) + 1) * data.shape[1], pa.int32()), flat)
        label_values = [
            None if null_labels_every and i % null_labels_every == 0 else int(labels[r]) for i, r in enumerate(rows)
        ]
        path = directory / f"part-{index:05d}.parquet"
        pq.write_table(pa.table({"x": x, "label": pa.array(label_values, pa.int64())}), path)
        urls.append(str(path))
    return urls


@pytest.fixture(scope="module")
def ray_cluster():
    # Test-only tuning for a 2-core machine (each Ray Train run starts ~6 fresh processes):
    # no usage stats, no preemption watcher actor (only matters on preemptible nodes), no
    # Train metrics callbacks, and the controller notices finished workers sooner.
    for key, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_TRAIN_METRICS_ENABLED": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        ray.shutdown()
    # 2 train workers x 1 CPU + 1 CPU for Ray Data's read tasks
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address=LOCAL_NODE_IP, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def gaussian_shards(tmp_path_factory):
    # 10,000 rows per worker: 60 steps of batch 64 stay inside one epoch
    dataset = load_builtin("eight_gaussians", num_samples=20000, seed=0)
    return write_shards(dataset, tmp_path_factory.mktemp("gaussians"), 2, fixed_size=True)


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    return write_shards(load_builtin("digits"), tmp_path_factory.mktemp("digits"), 3, fixed_size=False, null_labels_every=7)


def assert_history_ok(history: list[dict], required: tuple[str, ...]) -> None:
    steps = [row["step"] for row in history]
    assert steps == sorted(set(steps)), f"history steps must strictly increase without duplicates: {steps}"
    for row in history:
        for key in required:
            assert key in row, f"{key} missing from {row}"
        assert all(math.isfinite(v) for v in row.values()), row


def assert_in_sync(result: dict) -> None:
    checksums = result["worker_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], checksums


# ---- no Ray needed ----------------------------------------------------------------------


def test_optimizer_state_round_trip_without_pickle():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.0, 0.95))
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
    tensors, meta = optimizer_state_to_tensors(optimizer.state_dict())
    import json

    meta = json.loads(json.dumps(meta, allow_nan=False))  # JSON-native
    restored = optimizer_state_from_tensors(tensors, meta)
    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    fresh.load_state_dict(restored)
    original, loaded = optimizer.state_dict(), fresh.state_dict()
    assert loaded["param_groups"] == original["param_groups"]
    for key, state in original["state"].items():
        for name, value in state.items():
            assert torch.equal(loaded["state"][key][name], value)


def test_bad_inputs_fail_before_ray(tmp_path, gaussian_shards):
    common = dict(
        sample_shape=(2,), num_classes=8, model_config=MLPConfig(data_dim=2, num_classes=8).to_dict(),
        fm_config={"steps": 2, "batch_size": 8}, output_dir=str(tmp_path / "out"), checkpoint_every=1,
        storage_path=str(tmp_path / "ray"), run_name="bad",
    )
    with pytest.raises(ValueError, match="shard_urls is empty"):
        run_flow_matching(shard_urls=[], **common)
    with pytest.raises(ValueError, match="num_workers"):
        run_flow_matching(shard_urls=gaussian_shards, num_workers=0, **common)
    with pytest.raises(ValueError, match="'fp16'"):
        run_flow_matching(shard_urls=gaussian_shards, mixed_precision="fp16", **common)
    with pytest.raises(ValueError, match="batch_size 20000 is larger than the 10000 rows"):
        run_flow_matching(shard_urls=gaussian_shards, **{**common, "fm_config": {"steps": 2, "batch_size": 20000}})
    with pytest.raises(ValueError, match=r"sample_shape \(3,\)"):
        run_flow_matching(shard_urls=gaussian_shards, **{**common, "sample_shape": (3,)})
    three_d = MLPConfig(data_dim=3, num_classes=8).to_dict()
    with pytest.raises(ValueError, match="needs 3"):
        run_flow_matching(shard_urls=gaussian_shards, **{**common, "sample_shape": (3,), "model_config": three_d})
    four = MLPConfig(data_dim=2, num_classes=4).to_dict()
    with pytest.raises(ValueError, match=r"labels span \[0, 7\], outside \[0, 4\)"):
        run_flow_matching(shard_urls=gaussian_shards, **{**common, "num_classes": 4, "model_config": four})
    with pytest.raises(ValueError, match="fm_config.log_every must be an int >= 1, got 0"):
        run_flow_matching(shard_urls=gaussian_shards, **{**common, "fm_config": {"steps": 2, "log_every": 0}})
    with pytest.raises(ValueError, match="unknown fm_config fields"):
        run_flow_matching(shard_urls=gaussian_shards, **{**common, "fm_config": {"stepz": 2}})
    assert not (tmp_path / "ray").exists()


# ---- 2-worker Ray Train runs ------------------------------------------------------------


def test_fm_resume_then_cafm_on_gaussians(tmp_path, ray_cluster, gaussian_shards):
    model_config = MLPConfig(data_dim=2, hidden_size=32, depth=2, num_classes=8).to_dict()
    fm = dict(
        shard_urls=gaussian_shards, sample_shape=(2,), num_classes=8, model_config=model_config,
        output_dir=str(tmp_path / "fm"), num_workers=2, checkpoint_every=10,
        storage_path=str(tmp_path / "ray"), run_name="fm-gaussians",
    )
    first = run_flow_matching(fm_config={"steps": 30, "batch_size": 64, "lr": 3e-3, "log_every": 5}, **fm)
    assert first["steps"] == 30 and first["resumed_from_step"] == 0
    assert [row["step"] for row in first["history"]][-1] == 30
    assert_history_ok(first["history"], ("fm_loss", "grad_norm", "samples_per_s"))
    assert_in_sync(first)
    assert first["ray_checkpoint"].endswith("checkpoint_00000030")

    # same run_name, more steps: continues from the step-30 checkpoint, not from zero
    second = run_flow_matching(fm_config={"steps": 60, "batch_size": 64, "lr": 3e-3, "log_every": 5}, **fm)
    assert second["resumed_from_step"] == 30 and second["steps"] == 60
    assert second["history"][0]["step"] > 30
    assert second["history"][-1]["step"] == 60
    assert_history_ok(second["history"], ("fm_loss", "grad_norm"))
    assert_in_sync(second)
    assert second["final_metrics"]["fm_loss"] < first["history"][0]["fm_loss"]
    # a rerun at the same step count trains nothing (e.g. an orchestrator retry); fewer steps is an error
    again = run_flow_matching(fm_config={"steps": 60, "batch_size": 64, "lr": 3e-3, "log_every": 5}, **fm)
    assert again["steps"] == 60 and again["history"] == [] and again["resumed_from_step"] == 60
    with pytest.raises(ValueError, match="already at step 60"):
        run_flow_matching(fm_config={"steps": 40, "batch_size": 64}, **fm)
    with pytest.raises(ValueError, match="already exists"):
        run_flow_matching(fm_config={"steps": 80, "batch_size": 64}, resume=False, **fm)
    generator = load_model(second["model_dir"])
    assert generator(torch.zeros(4, 2), torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long)).shape == (4, 2)

    cafm = run_cafm(
        shard_urls=gaussian_shards, sample_shape=(2,), num_classes=8, init_checkpoint=second["model_dir"],
        cafm_config={"steps": 40, "batch_size": 64, "warmup_steps": 10, "discriminator_steps": 3, "log_every": 10},
        output_dir=str(tmp_path / "cafm"), num_workers=2, checkpoint_every=20,
        storage_path=str(tmp_path / "ray"), run_name="cafm-gaussians",
    )
    assert cafm["steps"] == 40
    assert_history_ok(cafm["history"], ("d_loss", "logit_real", "logit_fake", "d_grad_norm", "samples_per_s"))
    assert "g_loss" in cafm["final_metrics"] and "g_grad_norm" in cafm["final_metrics"]
    assert cafm["final_metrics"]["g_steps"] == 7  # (40 - 10) // (3 + 1)
    assert_in_sync(cafm)
    tuned = load_model(cafm["model_dir"])
    before, after = generator.state_dict(), tuned.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "CAFM generator steps changed nothing"
    load_model(cafm["discriminator_dir"])

    # CAFM from scratch: a freshly initialised generator, no FM checkpoint given or read
    scratch = run_cafm(
        shard_urls=gaussian_shards, sample_shape=(2,), num_classes=8, init_checkpoint=None, model_config=model_config,
        cafm_config={"steps": 40, "batch_size": 64, "warmup_steps": 10, "discriminator_steps": 3, "log_every": 10},
        output_dir=str(tmp_path / "cafm-scratch"), num_workers=2, checkpoint_every=20,
        storage_path=str(tmp_path / "ray"), run_name="cafm-scratch",
    )
    assert scratch["steps"] == 40 and scratch["final_metrics"]["g_steps"] == 7
    assert_in_sync(scratch)
    fresh = load_model(scratch["model_dir"]).state_dict()
    assert all(not torch.equal(fresh[k], before[k]) for k in before if before[k].is_floating_point() and before[k].numel() > 1)
    with pytest.raises(ValueError, match="either init_checkpoint .* or, to train from scratch, model_config"):
        run_cafm(shard_urls=gaussian_shards, sample_shape=(2,), num_classes=8, init_checkpoint=None,
                 cafm_config={"steps": 4}, output_dir=str(tmp_path / "x"), checkpoint_every=2,
                 storage_path=str(tmp_path / "ray"), run_name="neither")


def test_cafm_on_digits_with_tiny_dit_bf16(tmp_path, ray_cluster, digit_shards):
    # a tiny FM generator made in-process (the Ray FM path is covered above)
    config = dit_config("tiny", hidden_size=32, depth=1, num_heads=2, num_classes=10)
    generator = build_generator(config)
    init = save_model(tmp_path / "fm", generator, metadata={"stage": "fm"})
    result = run_cafm(
        shard_urls=digit_shards, sample_shape=(1, 8, 8), num_classes=10, init_checkpoint=str(init),
        cafm_config={"steps": 8, "batch_size": 32, "warmup_steps": 2, "discriminator_steps": 2, "log_every": 4},
        output_dir=str(tmp_path / "cafm"), num_workers=2, mixed_precision="bf16", checkpoint_every=4,
        storage_path=str(tmp_path / "ray"), run_name="cafm-digits",
    )
    assert result["steps"] == 8 and [row["step"] for row in result["history"]] == [4, 8]
    assert_history_ok(result["history"], ("d_loss", "logit_real", "logit_fake"))
    assert "g_loss" in result["final_metrics"]
    assert_in_sync(result)
    model = load_model(result["model_dir"])
    assert model(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([1, 10])).shape == (2, 1, 8, 8)


# ---- divergence: rollback with a lower learning rate, or a clear stop -------------------


def _finite_checkpoints(storage: Path) -> list[str]:
    """Every Ray checkpoint under ``storage``, each checked to hold only finite tensors."""
    names = []
    for directory in sorted(p for p in storage.rglob("checkpoint_0*") if p.is_dir()):
        tensors, _, _ = load_checkpoint(directory)
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), directory
        names.append(directory.name)
    return names


def test_diverging_cafm_rolls_back_to_the_last_checkpoint_with_lower_learning_rates(tmp_path, ray_cluster, gaussian_shards):
    # generator lr 10: the first generator steps after warmup blow the losses/logits past 1e4
    init = save_model(tmp_path / "fm", build_generator(MLPConfig(data_dim=2, hidden_size=32, depth=2, num_classes=8)))
    result = run_cafm(
        shard_urls=gaussian_shards, sample_shape=(2,), num_classes=8, init_checkpoint=str(init),
        cafm_config={"steps": 30, "batch_size": 64, "warmup_steps": 10, "discriminator_steps": 1, "log_every": 5,
                     "generator_lr": 10.0, "discriminator_lr": 1e-3},
        divergence={"lr_factor": 1e-3, "max_rollbacks": 2},
        output_dir=str(tmp_path / "cafm"), num_workers=2, checkpoint_every=10,
        storage_path=str(tmp_path / "ray"), run_name="cafm-diverges",
    )
    assert result["steps"] == 30
    rollbacks = result["rollbacks"]
    assert len(rollbacks) == 1, rollbacks
    assert rollbacks[0]["to_step"] == 10 and 10 < rollbacks[0]["at_step"] <= 20
    assert "max_abs" in rollbacks[0]["reason"] or "non-finite" in rollbacks[0]["reason"]
    assert rollbacks[0]["learning_rates"] == pytest.approx([10.0 * 1e-3, 1e-3 * 1e-3])
    assert_history_ok(result["history"], ("d_loss", "logit_real"))  # no step twice, all finite
    assert [row["step"] for row in result["history"]] == [5, 10, 15, 20, 25, 30]
    assert_in_sync(result)
    # the lowered rate is part of the saved optimiser state (a restart keeps it)
    tensors, _, metadata = load_checkpoint(result["ray_checkpoint"])
    states = unflatten_state_dicts(tensors)
    saved = optimizer_state_from_tensors(states["generator_opt"], metadata["optimizers"]["generator"])
    assert saved["param_groups"][0]["lr"] == pytest.approx(1e-2)
    assert metadata["rollbacks"] == rollbacks
    assert _finite_checkpoints(tmp_path / "ray") == ["checkpoint_00000020", "checkpoint_00000030"]


def test_divergence_beyond_the_allowed_rollbacks_stops_with_a_clear_message(tmp_path, ray_cluster, gaussian_shards):
    fm = dict(
        shard_urls=gaussian_shards, sample_shape=(2,), num_classes=8,
        model_config=MLPConfig(data_dim=2, hidden_size=32, depth=2, num_classes=8).to_dict(),
        output_dir=str(tmp_path / "fm"), num_workers=1, checkpoint_every=5,
        storage_path=str(tmp_path / "ray"), run_name="fm-diverges",
    )
    with pytest.raises(TrainingDiverged, match=r"fm training diverged at step 2 \(\|fm_loss\|=.* > max_abs 10000\) "
                       r"after 1 rollback\(s\).*last good checkpoint is step 0.*Last good checkpoint: none"):
        run_flow_matching(fm_config={"steps": 20, "batch_size": 64, "lr": 10.0}, divergence={"max_rollbacks": 1}, **fm)
    assert _finite_checkpoints(tmp_path / "ray") == []  # nothing written of the diverged state
    assert not (tmp_path / "fm").exists()


# ---- a worker process killed mid-training -----------------------------------------------


def _kill_a_train_worker_after(checkpoint: Path, killed: list[int], stop: threading.Event) -> None:
    """Once ``checkpoint`` exists, SIGKILL one Ray Train worker of *this* test's cluster
    (a descendant of this process; other Ray clusters on the machine are left alone)."""
    import psutil

    while not stop.is_set() and not killed:
        if checkpoint.is_dir():
            for process in psutil.Process(os.getpid()).children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(process.cmdline()):
                        process.send_signal(signal.SIGKILL)
                        killed.append(process.pid)
                        return
                except psutil.Error:
                    continue
        time.sleep(0.02)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_resumes_from_the_latest_checkpoint(tmp_path, ray_cluster, gaussian_shards):
    fm = dict(
        shard_urls=gaussian_shards, sample_shape=(2,), num_classes=8,
        model_config=MLPConfig(data_dim=2, hidden_size=32, depth=2, num_classes=8).to_dict(),
        output_dir=str(tmp_path / "fm"), num_workers=2, checkpoint_every=20,
        storage_path=str(tmp_path / "ray"), run_name="fm-killed",
    )
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_a_train_worker_after, args=(tmp_path / "ray" / "fm-killed" / "checkpoint_00000040", killed, stop)
    )
    killer.start()
    try:
        result = run_flow_matching(fm_config={"steps": 160, "batch_size": 64, "lr": 3e-3, "log_every": 20}, **fm)
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray Train worker was killed (did training end before the first checkpoint?)"
    assert result["steps"] == 160
    # the restarted workers began at a checkpoint, not at zero ...
    assert 20 <= result["restored_from_step"] < 160 and result["restored_from_step"] % 20 == 0
    # ... every reported step appears exactly once, none missing
    assert [row["step"] for row in result["history"]] == list(range(20, 161, 20))
    assert_history_ok(result["history"], ("fm_loss",))
    assert_in_sync(result)
    # optimiser and EMA state were restored, not reset: their step counts are the run's
    tensors, _, metadata = load_checkpoint(result["ray_checkpoint"])
    states = unflatten_state_dicts(tensors)
    adam = optimizer_state_from_tensors(states["generator_opt"], metadata["optimizers"]["generator"])
    assert {int(s["step"]) for s in adam["state"].values()} == {160}
    assert metadata["ema"]["num_updates"] == 160


def test_a_final_checkpoint_ray_never_registered_is_the_result(tmp_path, ray_cluster, gaussian_shards):
    """Killed after the final checkpoint was written but before Ray registered it: the rerun
    must return that checkpoint (and train nothing), not Ray's older registered one."""
    from cafm_core.checkpoint import save_checkpoint

    fm = dict(
        shard_urls=gaussian_shards, sample_shape=(2,), num_classes=8,
        model_config=MLPConfig(data_dim=2, hidden_size=32, depth=2, num_classes=8).to_dict(),
        output_dir=str(tmp_path / "fm"), num_workers=2, checkpoint_every=10,
        storage_path=str(tmp_path / "ray"), run_name="fm-unregistered",
    )
    first = run_flow_matching(fm_config={"steps": 30, "batch_size": 64, "lr": 3e-3, "log_every": 10}, **fm)
    assert first["steps"] == 30
    # the step-40 folder as a killed run would leave it: complete and verified, unknown to Ray
    tensors, config, metadata = load_checkpoint(tmp_path / "ray" / "fm-unregistered" / "checkpoint_00000030")
    states = unflatten_state_dicts(tensors)
    final_ema = {k: v + 0.25 for k, v in states["ema"].items()}  # distinguishable from step 30's
    tensors = {**tensors, **{f"ema/{k}": v for k, v in final_ema.items()}}
    save_checkpoint(tmp_path / "ray" / "fm-unregistered" / "checkpoint_00000040", tensors, config,
                    {**metadata, "step": 40, "history": metadata["history"] + [{"step": 40, "fm_loss": 0.5}]})

    again = run_flow_matching(fm_config={"steps": 40, "batch_size": 64, "lr": 3e-3, "log_every": 10}, **fm)
    assert again["steps"] == 40 and again["history"] == [] and again["seconds"] == 0.0  # nothing trained
    assert again["ray_checkpoint"].endswith("checkpoint_00000040")
    _, _, saved = load_checkpoint(again["model_dir"])
    generator = load_model(again["model_dir"])
    for name, value in generator.state_dict().items():
        torch.testing.assert_close(value, final_ema[name])
    assert saved["steps"] == 40


def test_newest_verified_checkpoint_on_storage_skips_unfinished_folders(tmp_path):
    from cafm_core.checkpoint import save_checkpoint
    from tasks.train.train_state import TRAIN_STATE_FORMAT, RunCheckpoints

    run = tmp_path / "ray" / "run"
    for step in (20, 40, 60):
        save_checkpoint(run / f"checkpoint_{step:08d}", {"w": torch.full((3,), float(step))},
                        {"format": TRAIN_STATE_FORMAT}, {"step": step})
    (run / "checkpoint_00000060" / "checkpoint.json").unlink()  # being written when the worker died
    weights = run / "checkpoint_00000040" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # cut off
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own files are ignored
    tensors, _, metadata = RunCheckpoints(str(tmp_path / "ray"), "run").newest_verified(max_step=100)
    assert metadata["step"] == 20 and torch.equal(tensors["w"], torch.full((3,), 20.0))
    assert RunCheckpoints(str(tmp_path / "ray"), "run").newest_verified(max_step=10) is None
    assert RunCheckpoints(str(tmp_path / "ray"), "missing").newest_verified(max_step=100) is None
