"""Sampling stage: generate images from checkpoints in shards spread over Ray workers.

Each shard is one Ray task: it loads the generator from storage, draws its samples with a
seed derived from (run seed, shard index), and writes ``samples`` and ``labels`` as one
safetensors object. Shards are deterministic, so a rerun reproduces them exactly.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import ray
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from tqdm.auto import tqdm

from cafm_core.checkpoint import model_from_checkpoint
from cafm_core.evaluation import SamplerSetting
from cafm_core.samplers import generate
from tasks.storage import Store


@dataclass(frozen=True)
class ShardSpec:
    checkpoint_url: str
    out_url: str
    setting: SamplerSetting
    start: int
    count: int
    seed: int


def shard_seed(seed: int, key: str, start: int) -> int:
    """A stable 31-bit seed per (seed, model/setting key, shard start)."""
    digest = hashlib.sha256(f"{seed}:{key}:{start}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def generate_shard(store_root: str, spec: ShardSpec, labels: list[int] | None, device: str) -> str:
    torch.set_num_threads(1)
    store = Store(store_root)
    if store.exists(spec.out_url):
        return spec.out_url
    tensors, config, metadata = store.read_checkpoint(spec.checkpoint_url)
    model = model_from_checkpoint(tensors, config, metadata).to(device)
    label_tensor = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    samples = generate(
        model,
        num_samples=spec.count,
        sample_shape=tuple(model.config.sample_shape),
        labels=label_tensor,
        nfe=spec.setting.nfe,
        method=spec.setting.method,
        cfg_scale=spec.setting.cfg_scale if label_tensor is not None else 1.0,
        null_class=getattr(model, "null_class", None),
        seed=spec.seed,
        device=device,
    )
    payload = {"samples": samples.contiguous()}
    if label_tensor is not None:
        payload["labels"] = label_tensor
    store.write_bytes(spec.out_url, safetensors_save(payload))
    return spec.out_url


_remote_shard = ray.remote(num_cpus=1)(generate_shard)


def setting_key(setting: SamplerSetting) -> str:
    return f"{setting.method}-nfe{setting.nfe}-cfg{setting.cfg_scale:g}"


def generate_sample_shards(
    store: Store,
    *,
    models: dict[str, str],
    out_url: str,
    settings: list[SamplerSetting],
    num_samples: int,
    labels: list[int] | None,
    seeds: list[int],
    shard_size: int,
    use_gpu: bool = False,
) -> dict[str, list[str]]:
    """Generate every (model, setting, seed) sample set; returns ``key -> shard URLs``.

    ``models`` maps a name (``fm``, ``cafm``) to a checkpoint URL. Already written shards are
    kept (a rerun only fills in what is missing).
    """
    jobs, layout = [], {}
    for model_name, checkpoint_url in models.items():
        for setting in settings:
            for seed in seeds:
                key = f"{model_name}/{setting_key(setting)}/seed{seed}"
                layout[key] = []
                for start in range(0, num_samples, shard_size):
                    count = min(shard_size, num_samples - start)
                    spec = ShardSpec(
                        checkpoint_url=checkpoint_url,
                        out_url=Store.join(out_url, key, f"part-{start // shard_size:05d}.safetensors"),
                        setting=setting,
                        start=start,
                        count=count,
                        seed=shard_seed(seed, f"{setting_key(setting)}", start),
                    )
                    shard_labels = labels[start : start + count] if labels is not None else None
                    layout[key].append(spec.out_url)
                    jobs.append(
                        _remote_shard.options(num_gpus=0.25 if use_gpu else 0).remote(
                            store.root, spec, shard_labels, "cuda" if use_gpu else "cpu"
                        )
                    )
    _wait_with_progress(jobs, "sampling shards")
    return layout


def _wait_with_progress(jobs: list, description: str) -> None:
    """``ray.get`` on every job, drawing a bar when stderr is a terminal; the first
    failure is raised."""
    bar = tqdm(total=len(jobs), desc=description, unit="shard", disable=not sys.stderr.isatty())
    pending = list(jobs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
            bar.update(len(done))
    finally:
        bar.close()


def read_samples(store: Store, shard_urls: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the shards of one sample set."""
    parts = [safetensors_load(store.read_bytes(url)) for url in shard_urls]
    samples = torch.cat([p["samples"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts]) if "labels" in parts[0] else None
    return samples, labels
