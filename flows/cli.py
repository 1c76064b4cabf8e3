"""``cafm-pipeline``: run the whole pipeline (or one stage) from the command line.

    cafm-pipeline run                              # digits, embedded defaults (the main job)
    cafm-pipeline run --profile smoke              # same stages, few steps
    cafm-pipeline run --set fm.steps=500 --set storage_root=s3://bucket/runs
    cafm-pipeline run --params my_params.json --stage evaluate
    cafm-pipeline sweep --set space.generator_lr=[1e-5,3e-5]   # CAFM sweep on Ray Tune
    cafm-pipeline replay-tracking --set run_name=digits   # send what MLflow missed (it was down)
    cafm-pipeline generate --model cafm-generator@champion --num 64 --nfe 32 --out samples/
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
    show = sub.add_parser("params", help="print the parameters a run would use, as JSON")
    show.add_argument("--profile", choices=sorted(PROFILES), default="default")
    show.add_argument("--params")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--sweep", action="store_true", help="the parameters of a sweep instead")
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)

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
    from tasks.stage_ledger import StageMismatch
    from tasks.storage import StorageError
    from tasks.tracking import TrackingError

    if args.command == "replay-tracking":
        try:
            result = pipeline_module.preflight(params)  # reachable, then replayed
        except (StorageError, TrackingError) as exc:
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
    except (StorageError, TrackingError, StageMismatch, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


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
