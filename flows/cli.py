"""``cafm-pipeline``: run the whole pipeline (or one stage) from the command line.

    cafm-pipeline run                              # digits, embedded defaults (the main job)
    cafm-pipeline run --profile smoke              # same stages, few steps
    cafm-pipeline run --set fm.steps=500 --set storage_root=s3://bucket/runs
    cafm-pipeline run --params my_params.json --stage evaluate
    cafm-pipeline sweep --set space.generator_lr=[1e-5,3e-5]   # CAFM sweep on Ray Tune
    cafm-pipeline replay-tracking --set run_name=digits   # send what MLflow missed (it was down)
    cafm-pipeline generate --model cafm-generator@champion --num 64 --nfe 32 --out samples/
    cafm-pipeline list --run digits                        # the run's variants, newest first
    cafm-pipeline remove --run digits --variant 1a2b3c4d5e6f7a8b   # delete one (shared stages stay)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pydantic import ValidationError

from flows.params import PROFILES, SWEEP_PROFILES


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_params(profile: str, params_file: str | None, overrides: list[str], *, sweep: bool = False):
    """Profile defaults, then a JSON file, then ``--set a.b=value`` overrides; validated once.
    ``sweep``: SweepParams (keys like ``space.generator_lr``, ``pipeline.cafm.steps``)."""
    data = (SWEEP_PROFILES if sweep else PROFILES)[profile]().model_dump()
    if params_file:
        with open(params_file) as handle:
            _merge(data, json.load(handle))
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"error: --set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        if key.strip() == "space":  # a whole grid replaces the profile's; space.<field>=... adds to it
            data["space"] = _parse_value(value)
            continue
        patch: dict = {}
        cursor = patch
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = _parse_value(value)
        _merge(data, patch)
    from flows.params import PipelineParams, SweepParams

    return (SweepParams if sweep else PipelineParams).model_validate(data)


def _merge(base: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cafm-pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (or one stage)")
    run.add_argument("--profile", choices=sorted(PROFILES), default="default")
    run.add_argument("--params", help="JSON file with parameters (merged over the profile)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter, e.g. fm.steps=500")
    run.add_argument("--stage", choices=["all", "prepare", "pretrain", "posttrain", "sample", "evaluate"], default="all")
    sweep = sub.add_parser("sweep", help="CAFM sweep over a grid of settings (Ray Tune), from one FM generator")
    sweep.add_argument("--profile", choices=sorted(SWEEP_PROFILES), default="default")
    sweep.add_argument("--params", help="JSON file with sweep parameters (merged over the profile)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="e.g. space.ema_decay=[0.99,0.999] (adds to the grid), "
                            "space='{\"generator_lr\": [1e-5, 3e-5]}' (replaces it), pipeline.cafm.steps=600")
    replay = sub.add_parser("replay-tracking", help="send to MLflow what a run could not log (tracking_unlogged.json) "
                                                    "and end the MLflow runs a killed attempt left RUNNING")
    replay.add_argument("--profile", choices=sorted(PROFILES), default="default")
    replay.add_argument("--params", help="JSON file with the run's parameters (run_name, storage_root, tracking_uri)")
    replay.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    gen = sub.add_parser("generate", help="images from a registered generator (weights only: no logged code runs)")
    gen.add_argument("--model", required=True, help="NAME@ALIAS, NAME/VERSION, or NAME (its champion)")
    gen.add_argument("--num", type=int, default=64, help="how many images (default 64)")
    gen.add_argument("--nfe", type=int, default=32, help="network evaluations (default 32)")
    gen.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1.0: none)")
    gen.add_argument("--method", choices=["euler", "heun"], default="heun")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--label", type=int, help="one class for every image (default: cycle through the classes)")
    gen.add_argument("--out", required=True, help="folder for the PNGs, grid.png and generation.json")
    gen.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else outputs/mlflow.db)")
    listing = sub.add_parser("list", help="the variants of a run (or of every run): settings that differ, stage "
                                          "status, headline metrics, newest first")
    listing.add_argument("--run", help="run name (default: every run under storage_root)")
    listing.add_argument("--storage-root", default=None, help="default: the profile's (outputs/runs)")
    removal = sub.add_parser("remove", help="delete one variant of a run; stages another variant uses are kept")
    removal.add_argument("--run", required=True)
    removal.add_argument("--variant", required=True, help="a variant id from `cafm-pipeline list`")
    removal.add_argument("--storage-root", default=None)
    removal.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    show = sub.add_parser("params", help="print the parameters a run would use, as JSON")
    show.add_argument("--profile", choices=sorted(PROFILES), default="default")
    show.add_argument("--params")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--sweep", action="store_true", help="the parameters of a sweep instead")
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command in ("list", "remove"):
        return _variants(args)

    try:
        params = build_params(args.profile, args.params, args.set,
                              sweep=args.command == "sweep" or getattr(args, "sweep", False))
    except ValidationError as exc:
        print(f"error: invalid parameters:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "params":
        print(params.model_dump_json(indent=2))
        return 0

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    from flows import pipeline as pipeline_module
    from tasks.run_lease import RunLeaseHeld
    from tasks.stage_ledger import StageMismatch
    from tasks.storage import StorageError
    from tasks.tracking import TrackingError

    if args.command == "replay-tracking":
        try:
            with pipeline_module.holding_run(params) as result:  # reachable, the run's lease, then replayed
                pass
        except (StorageError, TrackingError, RunLeaseHeld) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not result["found"]:
            print(f"nothing to replay: no {result['record']}")
        elif result["left"]:
            print(f"{result['left']} item(s) still not logged; kept in {result['record']}", file=sys.stderr)
        else:
            print(f"sent {result['replayed']} item(s) from {result['record']} to MLflow; the file is removed")
        if result["ended_runs"]:
            print(f"ended {len(result['ended_runs'])} run(s) a stopped process left RUNNING: {', '.join(result['ended_runs'])}")
        return 1 if result["left"] else 0
    if args.command == "sweep":
        from flows.sweep import sweep_flow

        chosen = sweep_flow
    else:
        chosen = {
            "all": pipeline_module.pipeline,
            "prepare": pipeline_module.prepare_flow,
            "pretrain": pipeline_module.pretrain_flow,
            "posttrain": pipeline_module.posttrain_flow,
            "sample": pipeline_module.sample_flow,
            "evaluate": pipeline_module.evaluate_flow,
        }[args.stage]
    try:
        chosen(params)
    except (StorageError, TrackingError, StageMismatch, RunLeaseHeld, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _variants(args) -> int:
    from flows.params import PipelineParams
    from tasks.run_lease import RunLease, RunLeaseHeld
    from tasks.run_variants import list_variants, remove_variant
    from tasks.storage import StorageError, Store

    store = Store(args.storage_root or PipelineParams().storage_root)
    try:
        if args.command == "remove":
            if args.dry_run or not store.exists(store.url(args.run)):  # nothing to guard: the error says so
                removed = remove_variant(store, store.url(args.run), args.run, args.variant, dry_run=args.dry_run)
            else:  # never while a run of this name works in those folders
                with RunLease(store, store.url(args.run), run_name=args.run):
                    removed = remove_variant(store, store.url(args.run), args.run, args.variant, dry_run=False)
            verb = "would delete" if args.dry_run else "deleted"
            print(f"{verb} {len(removed)} item(s) of variant {args.variant}:")
            for url in removed:
                print(f"  {url}")
            return 0
        runs = [args.run] if args.run else [url.rstrip("/").rsplit("/", 1)[-1] for url in store.list(store.root)]
        shown = 0
        for run in runs:
            variants = list_variants(store, store.url(run))
            if not variants:
                continue
            first = variants[-1]
            print(f"run {run!r} ({store.url(run)}): {len(variants)} variant(s), newest first")
            for record in variants:
                shown += 1
                _print_variant(store, run, record, first)
        if not shown:
            print(f"no recorded variants under {store.url(args.run) if args.run else store.root}")
        return 0
    except (StorageError, RunLeaseHeld, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _print_variant(store, run: str, record: dict, first: dict) -> None:
    from tasks.run_variants import differences, stage_status

    run_url = store.url(run)
    changes = differences(record["params"], first["params"])
    status = {stage: stage_status(store, run_url, run, stage, fp) for stage, fp in record["stages"].items()}
    print(f"  {record['variant']}  {record['created_at'][:19]}  "
          + ("first variant" if record is first or not changes else ", ".join(f"{k}={v}" for k, v in changes.items())))
    print("      stages: " + ", ".join(f"{stage} {state}" for stage, state in status.items()))
    if status.get("eval") == "complete":
        from tasks.stage_ledger import StageFolder

        outputs = StageFolder(store.root, run_url, run, "eval", record["stages"]["eval"]).completed() or {}
        rows = [r for r in outputs.get("summary", []) if r.get("cfg_scale") == 1.0]
        if rows:
            largest = max(r["nfe"] for r in rows)
            metric = "fd" if "fd" in rows[0] else "sliced_wasserstein"
            values = ", ".join(f"{r['model']} {r[metric]:.4g}" for r in rows if r["nfe"] == largest)
            print(f"      {metric} at NFE {largest}: {values}")


def _generate(args) -> int:
    from cafm_core.checks import CAFMInputError
    from tasks.generation import generate_from_registry
    from tasks.tracking import TrackingError, default_tracking_uri

    try:
        record = generate_from_registry(args.tracking_uri or default_tracking_uri(), args.model, args.out,
                                        num=args.num, nfe=args.nfe, cfg=args.cfg, method=args.method, seed=args.seed,
                                        label=args.label)
    except (CAFMInputError, TrackingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {record['num']} images of {record['model']} version {record['version']} "
          f"({record['method']}, NFE {record['nfe']}, CFG {record['cfg_scale']:g}) to {args.out} (grid.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
