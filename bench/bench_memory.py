"""Peak memory of sampling and evaluation against the number of samples.

For each count, two fresh Python processes (so each peak is its own, ``ru_maxrss``):

1. ``sample``: the sampling stage's shard function (``tasks.sampling.generate_shard``, what
   each Ray task runs) for every shard of the count, one after another, into a local store;
2. ``evaluate``: ``tasks.sample_scoring.score_samples`` on those shards (image features are
   extracted shard by shard; only features are kept).

The data are 3x32x32 RGB images (a synthetic image folder prepared by ``tasks.prepare``), so
that the samples themselves are large: 50,000 of them are 614 MB as float32. The generator is
an untrained tiny DiT (memory does not depend on its weights), sampled with Euler, NFE 2.

    PYTHONPATH=. python bench/bench_memory.py --counts 1000 10000 50000 --out docs/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD_SIZE = 1024
SETTING = ("euler", 2, 1.0)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _setup(work: Path) -> None:
    """The image folder, its prepared form and a generator checkpoint, under ``work``."""
    import numpy as np
    import torch
    from PIL import Image

    from cafm_core.checkpoint import model_to_tensors
    from cafm_core.models import build_generator, dit_config
    from tasks.prepare import prepare_dataset
    from tasks.storage import Store

    rng = np.random.default_rng(0)
    for index, name in enumerate(["red", "blue"]):
        folder = work / "raw" / name
        folder.mkdir(parents=True)
        for i in range(64):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            pixels[..., 2 * index] = 255
            Image.fromarray(pixels).save(folder / f"{i}.png")
    store = Store(str(work / "store"))
    prepare_dataset(str(work / "raw"), store, store.url("data"), resolution=32, channels=3, feature_steps=20)
    torch.manual_seed(0)
    generator = build_generator(dit_config("tiny", image_size=32, in_channels=3, patch_size=4, hidden_size=32,
                                           depth=1, num_heads=2, num_classes=2))
    store.write_checkpoint(store.url("generator"), *model_to_tensors(generator))


def _protocol(work: Path, count: int):
    from cafm_core.evaluation import SamplerSetting
    from tasks.dataset_format import evaluation_protocol
    from tasks.storage import Store

    store = Store(str(work / "store"))
    return evaluation_protocol(store, store.url("data"), settings=[SamplerSetting(*SETTING)], seeds=[0],
                               num_samples=count, shard_size=SHARD_SIZE)


def _sample(work: Path, count: int) -> dict:
    from tasks.sampling import ShardSpec, generate_shard, sample_set_key
    from tasks.storage import Store

    store = Store(str(work / "store"))
    protocol = _protocol(work, count)
    (setting,) = protocol.settings
    key = sample_set_key("fm", setting, 0)
    draws = protocol.draws(setting, 0)
    for index, draw in enumerate(draws):
        spec = ShardSpec(checkpoint_url=store.url("generator"),
                         out_url=store.url(f"samples-{count}", key, f"part-{index:05d}.safetensors"),
                         protocol=protocol.to_dict(), setting=setting, draw=draw)
        generate_shard(store.root, spec, "cpu")
    return {"shards": len(draws)}


def _evaluate(work: Path, count: int) -> dict:
    from tasks.sample_scoring import score_samples
    from tasks.sampling import sample_set_key
    from tasks.storage import Store

    store = Store(str(work / "store"))
    protocol = _protocol(work, count)
    (setting,) = protocol.settings
    key = sample_set_key("fm", setting, 0)
    layout = {key: [store.url(f"samples-{count}", key, f"part-{i:05d}.safetensors")
                    for i in range(len(protocol.draws(setting, 0)))]}
    result = score_samples(store, protocol=protocol, sample_layout=layout, out_url=store.url(f"eval-{count}"))
    return {"fd": result["rows"][0]["fd"], "class_accuracy": result["rows"][0].get("class_accuracy")}


def _child(mode: str, work: Path, count: int) -> None:
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    info = {"setup": _setup, "sample": _sample, "evaluate": _evaluate}[mode](work, count) if mode != "setup" else _setup(work)
    print(json.dumps({"mode": mode, "count": count, "seconds": round(time.perf_counter() - started, 1),
                      "peak_rss_mb": round(_peak_rss_mb(), 1), **(info or {})}))


def _run_child(mode: str, work: Path, count: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work), "--counts", str(count)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--child", choices=["setup", "sample", "evaluate"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, Path(args.work), args.counts[0])
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="cafm-bench-memory-") as scratch:
        work = Path(scratch)
        _run_child("setup", work, 0)
        for count in args.counts:
            sampled, evaluated = _run_child("sample", work, count), _run_child("evaluate", work, count)
            row = {"count": count, "samples_mb": round(count * 3 * 32 * 32 * 4 / 2**20, 1),
                   "sample_peak_rss_mb": sampled["peak_rss_mb"], "sample_seconds": sampled["seconds"],
                   "evaluate_peak_rss_mb": evaluated["peak_rss_mb"], "evaluate_seconds": evaluated["seconds"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"setting": {"image": [3, 32, 32], "shard_size": SHARD_SIZE,
                                                          "sampler": SETTING, "torch_threads": 1}, "rows": rows},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
