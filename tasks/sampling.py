"""Sampling stage: sample sets of every generator under an evaluation protocol, as shards
spread over Ray workers.

Each shard is one Ray task and one of the protocol's draws (``cafm_core.protocol``): it
loads the generator from storage, draws its samples with the draw's noise seed and the
protocol's labels, and writes ``samples`` and ``labels`` as one safetensors object. Draws
are deterministic, so a rerun reproduces them exactly, and the same generator evaluated in
one process (``cafm_core.protocol.evaluate_under``) gets the same samples.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import ray
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from tqdm.auto import tqdm

from cafm_core.checkpoint import model_from_checkpoint
from cafm_core.evaluation import SamplerSetting
from cafm_core.protocol import Draw, EvaluationProtocol, draw_samples
from tasks.storage import Store

__all__ = ["ShardSpec", "generate_sample_shards", "generate_shard", "read_samples", "sample_set_key"]


@dataclass(frozen=True)
class ShardSpec:
    """One shard: a draw of one generator's sample set at one setting."""

    checkpoint_url: str
    out_url: str
    protocol: dict  # EvaluationProtocol.to_dict()
    setting: SamplerSetting
    draw: Draw


def sample_set_key(model: str, setting: SamplerSetting, seed: int) -> str:
    """``cafm/heun-nfe8-cfg1/seed0``: where one sample set's shards live, relative to the stage."""
    return f"{model}/{setting.key}/seed{seed}"


def generate_shard(store_root: str, spec: ShardSpec, device: str) -> str:
    torch.set_num_threads(1)
    store = Store(store_root)
    if store.exists(spec.out_url):
        return spec.out_url
    protocol = EvaluationProtocol.from_dict(spec.protocol)
    tensors, config, metadata = store.read_checkpoint(spec.checkpoint_url)
    model = model_from_checkpoint(tensors, config, metadata).to(device)
    samples, labels = draw_samples(model, protocol, spec.setting, spec.draw, device=device)
    payload = {"samples": samples.contiguous()}
    if labels is not None:
        payload["labels"] = labels.contiguous()
    store.write_bytes(spec.out_url, safetensors_save(payload))
    return spec.out_url


@ray.remote(num_cpus=1)
def _remote_shard(store_root: str, spec: ShardSpec, device: str) -> tuple[str, str]:
    """:func:`generate_shard` as a Ray task; also says which node ran it."""
    return generate_shard(store_root, spec, device), ray.get_runtime_context().get_node_id()


def generate_sample_shards(
    store: Store,
    *,
    models: dict[str, str],
    out_url: str,
    protocol: EvaluationProtocol,
    use_gpu: bool = False,
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Generate every (model, setting, seed) sample set of the protocol; returns
    ``sample_set_key -> shard URLs`` and how many shards each Ray node made.

    ``models`` maps a name (``fm``, ``cafm``) to a checkpoint URL. The shards are Ray tasks
    spread over the cluster's nodes (each reads its checkpoint from and writes its shard to
    storage). Already written shards are kept (a rerun only fills in what is missing).
    """
    jobs, layout = [], {}
    for model_name, checkpoint_url in models.items():
        for setting in protocol.settings:
            for seed in protocol.seeds:
                key = sample_set_key(model_name, setting, seed)
                layout[key] = []
                for number, draw in enumerate(protocol.draws(setting, seed)):
                    spec = ShardSpec(checkpoint_url=checkpoint_url,
                                     out_url=Store.join(out_url, key, f"part-{number:05d}.safetensors"),
                                     protocol=protocol.to_dict(), setting=setting, draw=draw)
                    layout[key].append(spec.out_url)
                    jobs.append(_remote_shard.options(num_gpus=0.25 if use_gpu else 0, scheduling_strategy="SPREAD").remote(
                        store.root, spec, "cuda" if use_gpu else "cpu"))
    nodes: dict[str, int] = {}
    for _, node_id in _wait_with_progress(jobs, "sampling shards"):
        nodes[node_id] = nodes.get(node_id, 0) + 1
    return layout, nodes


def _wait_with_progress(jobs: list, description: str) -> list:
    """``ray.get`` on every job (results in completion order), drawing a bar when stderr is
    a terminal; the first failure is raised."""
    bar = tqdm(total=len(jobs), desc=description, unit="shard", disable=not sys.stderr.isatty())
    pending, results = list(jobs), []
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results += ray.get(done)
            bar.update(len(done))
    finally:
        bar.close()
    return results


def read_samples(store: Store, shard_urls: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the shards of one sample set."""
    parts = [safetensors_load(store.read_bytes(url)) for url in shard_urls]
    samples = torch.cat([p["samples"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts]) if "labels" in parts[0] else None
    return samples, labels
