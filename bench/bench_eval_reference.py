"""Peak memory of the evaluation's real reference against the prepared set's size.

For each size, a prepared set of ``N`` 3x32x32 uint8 images is written straight as shards
(random pixels, unlabelled: no feature network to train, so only the reading is measured),
then a fresh process reads it as the evaluation does (``tasks.dataset_format.load_for_evaluation``:
at most 50,000 rows, one shard at a time) and another as the code before the bound did (the
whole set as float32, ``load_prepared``), each reporting its peak RSS (``ru_maxrss``) and time.

    PYTHONPATH=. python bench/bench_eval_reference.py --sizes 60000 120000 --out docs/results/eval_reference.json
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

SHAPE = (3, 32, 32)
SHARD_SIZE = 1024


def _write(root: Path, count: int) -> str:
    import numpy as np

    from tasks import dataset_format
    from tasks.storage import Store

    store = Store(str(root))
    url = store.url(f"set-{count}")
    rng = np.random.default_rng(0)
    shards = []
    for number, start in enumerate(range(0, count, SHARD_SIZE)):
        rows = min(SHARD_SIZE, count - start)
        x = rng.integers(0, 256, (rows, int(np.prod(SHAPE))), dtype=np.uint8)
        shards.append(dataset_format.write_shard(store, url, number, x, None, np.arange(start, start + rows), SHAPE))
    manifest = {"format": dataset_format.MANIFEST_FORMAT, "version": dataset_format.MANIFEST_VERSION,
                "name": f"random-{count}", "kind": "image", "count": count, "sample_shape": list(SHAPE),
                "num_classes": 0, "class_names": [], "class_counts": None, "shards": shards, "feature_net": None,
                "reference_stats": None, "feature_net_skipped": "unlabelled (benchmark)"}
    dataset_format.write_manifest_and_mark_complete(store, url, manifest)
    return url


def _measure(root: str, url: str, how: str) -> dict:
    from tasks.dataset_format import load_for_evaluation, load_prepared
    from tasks.storage import Store

    store = Store(root)
    started = time.perf_counter()
    if how == "reference":
        rows = load_for_evaluation(store, url).rows
    else:
        rows = len(load_prepared(store, url)[0])
    return {"how": how, "rows_held": rows, "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60000, 120000])
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(*args.child)))
        return
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            url = _write(Path(scratch), size)
            for how in ("reference", "whole"):
                out = subprocess.run([sys.executable, __file__, "--child", scratch, url, how], check=True,
                                     capture_output=True, text=True).stdout
                row = {"size": size, **json.loads(out.strip().splitlines()[-1])}
                print(row, flush=True)
                results.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
