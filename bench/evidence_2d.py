"""FM vs CAFM on the 2-D sets with a low-capacity MLP, over several training seeds.

    .venv/bin/python bench/evidence_2d.py                      # eight_gaussians + checkerboard, seeds 0 1 2
    .venv/bin/python bench/evidence_2d.py --datasets checkerboard --seeds 0 1 2 3 4

Each (dataset, seed) is one full `cafm-demo` run (FM pretraining, CAFM post-training from
it, evaluation at Heun NFE 8 and 32 on 10,000 samples), so the spread below is over
training seeds, not only sampling noise. Prints one markdown table per dataset: mean ± std
over seeds of the sliced Wasserstein distance and the off-manifold fraction, the per-seed
CAFM - FM differences, and the real-vs-real noise floor; scatter plots are each run's
`samples.png` under --output. A run whose `metrics.json` exists is reused (--fresh redoes it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cafm_core.demo import run_demo
from cafm_core.evaluation import POINT_METRICS, format_differences, format_table, paired_differences, summarise_over_seeds


def _run(dataset: str, seed: int, output: Path, fresh: bool) -> dict:
    target = output / f"{dataset}-seed{seed}"
    if not fresh and (target / "metrics.json").exists():
        return json.loads((target / "metrics.json").read_text())
    return json.loads(json.dumps(run_demo(dataset, output=target, seed=seed), default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["eight_gaussians", "checkerboard"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default="outputs/demo2d")
    parser.add_argument("--fresh", action="store_true", help="rerun even where metrics.json exists")
    args = parser.parse_args(argv)
    output = Path(args.output)
    for dataset in args.datasets:
        results = [_run(dataset, seed, output, args.fresh) for seed in args.seeds]
        # one row per (model, setting, training seed): the seed column is the training seed
        rows = [{**row, "seed": result_seed} for result_seed, result in zip(args.seeds, results) for row in result["rows"]]
        table = format_table(summarise_over_seeds(rows, POINT_METRICS), results[0]["noise_floor"], POINT_METRICS)
        print(f"\n## {dataset}: {len(args.seeds)} training seeds ({', '.join(map(str, args.seeds))})\n\n{table}\n")
        for key in ("sliced_wasserstein", "off_manifold_fraction"):
            print(format_differences(paired_differences(rows, key), floor=results[0]["noise_floor"]))  # paired by training seed
        seconds = sum(r["seconds"] for r in results)
        print(f"\n{len(results)} runs, {seconds:.0f} s of compute in all; pictures: {output}/{dataset}-seed*/samples.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
