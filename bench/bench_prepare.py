"""Prepare-stage throughput and peak memory against the size of an image folder.

For each size, a generated folder of small random PNGs (10 classes, sides 24-64 px, smooth
colour fields with noise, so they compress like pictures rather than like static) is
prepared at ``--resolution`` x ``--resolution`` RGB, each size in a fresh Python process so
that every peak is its own:

- ``images/s``: images written per second of the whole stage (listing, reading, decoding,
  resizing, shards, feature network, reference statistics) and of the shard phase alone;
- the driver's peak RSS (``ru_maxrss`` of the process that called ``prepare_dataset``);
- every Ray worker's peak RSS (``ru_maxrss`` reported by each task), and the Ray system
  processes' (raylet, GCS, ...) largest RSS seen by a 0.2 s poll.

``--baseline-code DIR`` runs, beside each size, the prepare stage of another checkout (e.g.
``git archive <commit> | tar -x -C DIR``: the in-memory reader before the streaming one) on
the same folder, in its own process.

    PYTHONPATH=. python bench/bench_prepare.py --sizes 5000 20000 100000 --json docs/results/prepare.json
    PYTHONPATH=. python bench/bench_prepare.py --sizes 2000 --feature-steps 50   # a quick run
    PYTHONPATH=. python bench/bench_prepare.py --sizes 20000 --cpus 1 2           # scaling with Ray workers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CLASSES = 10


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def make_folder(root: Path, size: int, seed: int = 0) -> Path:
    """``size`` PNGs in ``CLASSES`` class folders (made once; reused when complete)."""
    import numpy as np
    from PIL import Image

    folder = root / f"images-{size}"
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(seed)
    for index in range(size):
        label = index % CLASSES
        side, extra = int(rng.integers(24, 65)), int(rng.integers(0, 9))
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        base[..., label % 3] = 40 + 20 * label  # a class-dependent channel, so the feature net has something to learn
        field = np.asarray(Image.fromarray(base).resize((side + extra, side), Image.Resampling.BILINEAR), np.int16)
        pixels = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        path = folder / f"class{label:02d}" / f"{index:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    done.write_text(str(size))
    return folder


class _RayProcessPoll:
    """Largest RSS of each Ray system process (by name) seen while the stage runs."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            for process in psutil.process_iter(["name", "cmdline", "memory_info"]):
                try:
                    cmd = " ".join(process.info["cmdline"] or [])
                    if "ray" not in cmd or process.pid == os.getpid():
                        continue
                    name = (process.info["name"] or "?").split("::")[-1]
                    if "gcs_server" in cmd:
                        name = "gcs_server"
                    elif "raylet" in cmd:
                        name = "raylet"
                    elif "ray::" in (process.info["name"] or ""):
                        continue  # task workers report their own peak exactly
                    rss = process.info["memory_info"].rss / 2**20
                    self.peaks[name] = max(self.peaks.get(name, 0.0), rss)
                except (psutil.Error, TypeError):
                    continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_one(folder: Path, out: Path, args) -> dict:
    """One preparation in this (fresh) process; the numbers as a dict."""
    import torch

    from tasks.prepare import prepare_dataset
    from tasks.storage import Store

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.engine == "ray" and args.cpus:
        from tasks.ray_cluster import ensure_ray

        ensure_ray(num_cpus=args.cpus[0])
    store = Store(str(out))
    stats: dict = {}
    started = time.perf_counter()
    with _RayProcessPoll() as poll:
        manifest = prepare_dataset(str(folder), store, store.url("data"), resolution=args.resolution,
                                   channels=args.channels, feature_steps=args.feature_steps,
                                   feature_sample=args.feature_sample, shard_size=args.shard_size,
                                   max_bad_fraction=0.0, engine=args.engine, stats=stats)
    seconds = time.perf_counter() - started
    count = manifest["count"]
    workers = {pid: mb for pid, mb in stats.get("workers", {}).items() if int(pid) != os.getpid()}
    return {
        "code": "streaming", "engine": stats["engine"], "images": count, "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds, 1),
        "shard_phase_s": round(stats["shards_seconds"], 2),
        "shard_images_per_s": round(count / stats["shards_seconds"], 1),
        "ray_start_s": round(stats.get("ray_start_seconds", 0.0), 2),
        "shard_images_per_s_after_ray_start": round(count / (stats["shards_seconds"] - stats.get("ray_start_seconds", 0.0)), 1),
        "feature_net_s": round(stats.get("feature_net_seconds", 0.0), 2),
        "reference_stats_s": round(stats.get("reference_stats_seconds", 0.0), 2),
        "driver_peak_mb": round(_peak_rss_mb(), 1),
        "worker_peaks_mb": sorted(round(v, 1) for v in workers.values()),
        "ray_system_peaks_mb": {k: round(v, 1) for k, v in sorted(poll.peaks.items())},
        "shard_bytes": sum(s["bytes"] for s in manifest["shards"]),
        "cpus": args.cpus[0] if args.cpus else os.cpu_count(),
    }


def run_baseline(folder: Path, out: Path, args) -> dict:
    """The prepare stage of the checkout on ``sys.path`` (``--baseline-code``), timed by phase."""
    import torch

    import tasks.prepare as old
    from tasks.storage import Store

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    phases = {}
    real_features = old._write_feature_net_and_stats

    def timed_features(*a, **k):
        started = time.perf_counter()
        try:
            return real_features(*a, **k)
        finally:
            phases["feature"] = time.perf_counter() - started

    old._write_feature_net_and_stats = timed_features
    store = Store(str(out))
    started = time.perf_counter()
    kwargs = {"resolution": args.resolution, "channels": args.channels, "feature_steps": args.feature_steps,
              "shard_size": args.shard_size}
    manifest = old.prepare_dataset(str(folder), store, store.url("data"), **kwargs)
    seconds = time.perf_counter() - started
    count = manifest["count"]
    shard_phase = seconds - phases.get("feature", 0.0)
    return {
        "code": "baseline", "engine": "in-memory", "images": count, "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds, 1), "shard_phase_s": round(shard_phase, 2),
        "shard_images_per_s": round(count / shard_phase, 1), "feature_and_stats_s": round(phases.get("feature", 0), 2),
        "driver_peak_mb": round(_peak_rss_mb(), 1), "worker_peaks_mb": [],
        "shard_bytes": sum(s["bytes"] for s in manifest["shards"]), "cpus": os.cpu_count(),
    }


def _child(args, size: int, baseline: bool, cpus: int | None = None) -> dict:
    folder = make_folder(Path(args.work), size)
    env = dict(os.environ)
    code_root = args.baseline_code if baseline else str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = code_root
    with tempfile.TemporaryDirectory(dir=args.work) as out:
        command = [sys.executable, str(Path(__file__).resolve()), "--one", str(size), "--out", out,
                   *(["--as-baseline"] if baseline else []), *(["--cpus", str(cpus)] if cpus else []),
                   *args.passthrough]
        done = subprocess.run(command, env=env, cwd=code_root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"size {size} ({'baseline' if baseline else 'streaming'}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 100000])
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "cafm-bench-prepare"),
                        help="where the generated folders are kept (reused between runs)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--engine", choices=["auto", "local", "ray"], default="ray")
    parser.add_argument("--cpus", type=int, nargs="+", default=None,
                        help="CPUs of the local Ray, one run each (default: all cores): the scaling with workers")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--feature-steps", type=int, default=100)
    parser.add_argument("--feature-sample", type=int, default=50_000)
    parser.add_argument("--baseline-code", help="a checkout of the code to compare with (its prepare stage)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--as-baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one is not None:  # a child: one size, numbers on the last line of stdout
        folder = make_folder(Path(args.work), args.one)
        result = (run_baseline if args.as_baseline else run_one)(folder, Path(args.out), args)
        print(json.dumps(result))
        return

    args.passthrough = ["--work", args.work, "--engine", args.engine, "--resolution", str(args.resolution),
                        "--channels", str(args.channels), "--shard-size", str(args.shard_size),
                        "--feature-steps", str(args.feature_steps), "--feature-sample", str(args.feature_sample)]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        started = time.perf_counter()
        make_folder(Path(args.work), size)
        print(f"folder of {size:,} images ready ({time.perf_counter() - started:.0f} s)", flush=True)
        runs = [(False, cpus) for cpus in (args.cpus or [None])] + ([(True, None)] if args.baseline_code else [])
        for baseline, cpus in runs:
            row = {"size": size, **_child(args, size, baseline, cpus)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    header = (f"{'size':>8} {'code':>9} {'engine':>9} {'cpus':>4} {'img/s':>7} {'shard img/s':>11} {'total s':>8} "
              f"{'driver MB':>9} {'workers MB (each)':>24}")
    print("\n" + header)
    for row in rows:
        workers = ", ".join(f"{v:.0f}" for v in row["worker_peaks_mb"]) or "-"
        print(f"{row['size']:>8,} {row['code']:>9} {row['engine']:>9} {row['cpus']:>4} {row['images_per_s']:>7.0f} "
              f"{row['shard_images_per_s']:>11.0f} {row['seconds']:>8.1f} {row['driver_peak_mb']:>9.0f} {workers:>24}")
    if args.json:
        payload = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "rows": rows,
                   "settings": {k: v for k, v in vars(args).items() if k not in ("one", "out", "as_baseline", "passthrough")}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
