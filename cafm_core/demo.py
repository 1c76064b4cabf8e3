"""Core demo: FM-pretrain, then CAFM-post-train, on a built-in set; print FM vs CAFM.

    cafm-demo                              # digits, tiny DiT, about 7 minutes on 2 CPU cores
    cafm-demo --profile smoke              # same stages, few steps (about 1 minute)
    cafm-demo --dataset eight_gaussians    # low-dim set with a small MLP

Both generators are evaluated at identical sampler settings (same noise seeds and labels,
guidance-free), next to the noise floor of the metric. Writes checkpoints, ``metrics.json``,
``report.md`` and a sample picture under ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from cafm_core.checkpoint import load_model, save_model
from cafm_core.checks import CAFMInputError
from cafm_core.data import BUILTIN_DATASETS, load_builtin
from cafm_core.ema import EMA
from cafm_core.evaluation import (
    IMAGE_METRICS,
    POINT_METRICS,
    SamplerSetting,
    format_table,
    FLOOR_SPLITS,
    noise_floor,
    sample_for_evaluation,
    summarise_over_seeds,
)
from cafm_core.features import train_feature_network
from cafm_core.logits import LOGIT_MODES
from cafm_core.models import DIT_PRESETS, MLPConfig, build_generator, discriminator_from_generator, dit_config
from cafm_core.plots import image_grid, labelled_grids, scatter_panels
from cafm_core.protocol import evaluate_under, protocol_for_dataset
from cafm_core.training import CAFMConfig, FlowMatchingConfig, infinite_batches, train_cafm, train_flow_matching


@dataclass(frozen=True)
class DemoProfile:
    fm_steps: int
    cafm_steps: int
    warmup_steps: int
    eval_samples: int | None  # None: as many as the dataset (images) / 10,000 (points)
    feature_steps: int


PROFILES = {
    "default": DemoProfile(fm_steps=2000, cafm_steps=1000, warmup_steps=200, eval_samples=None, feature_steps=400),
    "smoke": DemoProfile(fm_steps=150, cafm_steps=60, warmup_steps=20, eval_samples=256, feature_steps=100),
}


TRAIN_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def _progress(stage: str, total: int):
    start = time.perf_counter()

    def report(step: int, row: dict) -> None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step")
        elapsed = time.perf_counter() - start
        print(f"  [{stage}] step {step + 1:>5}/{total} ({elapsed:5.0f}s)  {shown}", flush=True)

    return report


def run_demo(
    dataset_name: str = "digits",
    *,
    profile: str = "default",
    output: str | Path = "outputs/demo",
    logit_mode: str = "reverse",
    nfes: tuple[int, ...] = (8, 32),
    seed: int = 0,
    device: str = "cpu",
    fm_steps: int | None = None,
    cafm_steps: int | None = None,
    preset: str = "tiny",
    batch_size: int | None = None,
    dtype: str = "float32",
    fm_overrides: dict | None = None,
    cafm_overrides: dict | None = None,
    eval_seeds: tuple[int, ...] | None = None,
    feature_seed: int | None = None,
    trained: str | Path | None = None,
) -> dict:
    """Run the whole demo and return the metrics (also written to ``output``).

    ``preset`` (DiT size), ``batch_size`` (both stages), ``fm_overrides`` / ``cafm_overrides``
    (``FlowMatchingConfig`` / ``CAFMConfig`` fields) and ``dtype`` (``"bfloat16"``: training
    under ``torch.autocast``; sampling and evaluation stay in float32) scale the demo up, e.g.
    on a GPU (``bench/evidence_gpu.py``). ``eval_seeds`` are the sampling seeds (default:
    ``seed``); ``feature_seed`` seeds the feature network (default: ``seed``), so that runs of
    several training seeds can share one metric. ``trained``: a folder holding ``fm/`` and
    ``cafm/`` checkpoints of an earlier run (trained elsewhere, e.g. on a GPU); both stages are
    then loaded instead of trained, and only the evaluation runs here.
    """
    if dataset_name not in BUILTIN_DATASETS:
        raise CAFMInputError(f"unknown dataset {dataset_name!r}; expected one of {list(BUILTIN_DATASETS)}")
    if profile not in PROFILES:
        raise CAFMInputError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    if logit_mode not in LOGIT_MODES:
        raise CAFMInputError(f"unknown logit mode {logit_mode!r}; expected one of {list(LOGIT_MODES)}")
    if dtype not in TRAIN_DTYPES:
        raise CAFMInputError(f"unknown dtype {dtype!r}; expected one of {list(TRAIN_DTYPES)}")
    settings = [SamplerSetting("heun", nfe, 1.0) for nfe in nfes]  # validates the NFEs before any compute
    eval_seeds = tuple(eval_seeds) if eval_seeds is not None else (seed,)
    feature_seed = seed if feature_seed is None else feature_seed
    chosen = PROFILES[profile]
    chosen = replace(chosen, fm_steps=fm_steps or chosen.fm_steps, cafm_steps=cafm_steps or chosen.cafm_steps)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    started = time.perf_counter()

    dataset = load_builtin(dataset_name, num_samples=20000, seed=seed)
    image = dataset.kind == "image"
    print(f"dataset {dataset_name}: {tuple(dataset.data.shape)}, {dataset.num_classes} classes", flush=True)
    if image:
        model_config = dit_config(preset, image_size=dataset.data.shape[-1], in_channels=dataset.data.shape[1],
                                  num_classes=dataset.num_classes)
        fm_config = FlowMatchingConfig(steps=chosen.fm_steps, batch_size=128, lr=1e-3, seed=seed, log_every=max(1, chosen.fm_steps // 10))
        cafm_config = CAFMConfig(steps=chosen.cafm_steps, batch_size=128, generator_lr=1e-5, discriminator_lr=1e-4,
                                 discriminator_steps=8, warmup_steps=chosen.warmup_steps, logit_mode=logit_mode,
                                 seed=seed, log_every=max(1, chosen.cafm_steps // 10))
    else:
        # unconditional: for low-dim sets the question is whether the flow stays on the data
        model_config = MLPConfig(data_dim=dataset.data.shape[1], hidden_size=64, depth=3, num_classes=0)
        fm_config = FlowMatchingConfig(steps=chosen.fm_steps, batch_size=256, lr=2e-3, seed=seed, log_every=max(1, chosen.fm_steps // 10))
        cafm_config = CAFMConfig(steps=chosen.cafm_steps, batch_size=256, generator_lr=1e-4, discriminator_lr=1e-3,
                                 discriminator_steps=4, warmup_steps=chosen.warmup_steps, logit_mode=logit_mode,
                                 seed=seed, log_every=max(1, chosen.cafm_steps // 10))
    for name, config, overrides in (("fm", fm_config, fm_overrides), ("cafm", cafm_config, cafm_overrides)):
        unknown = sorted(set(overrides or {}) - {f.name for f in fields(config)})
        if unknown:
            raise CAFMInputError(f"unknown {name} config fields {unknown}; expected fields of {type(config).__name__}")
    scale = {"batch_size": batch_size} if batch_size else {}
    fm_config = replace(fm_config, **{**scale, **(fm_overrides or {})})
    cafm_config = replace(cafm_config, **{**scale, **(cafm_overrides or {})})

    feature_net = None
    if image:
        print("in-domain feature network (classifier on the real data)", flush=True)
        feature_net, feature_report = train_feature_network(dataset, steps=chosen.feature_steps, seed=feature_seed)
        print(f"  val accuracy {feature_report['val_accuracy']:.3f}", flush=True)

    if trained is not None:
        trained = Path(trained)
        print(f"loading the FM and CAFM checkpoints of {trained} (no training here)", flush=True)
        fm_model, generator = load_model(trained / "fm").to(device), load_model(trained / "cafm").to(device)
        fm_result = cafm_result = None
    else:
        train_labels = dataset.labels if model_config.num_classes > 0 else None
        batches = infinite_batches(dataset.data, train_labels, fm_config.batch_size, seed=seed)
        generator = build_generator(model_config).to(device)
        fm_ema = EMA(generator, decay=fm_config.ema_decay, warmup=True)
        print(f"FM pretraining: {fm_config.steps} steps", flush=True)
        fm_result = train_flow_matching(generator, batches, fm_config, ema=fm_ema, device=device,
                                        callback=_progress("FM", fm_config.steps), autocast_dtype=TRAIN_DTYPES[dtype])
        fm_ema.copy_to(generator)  # the pretrained generator is the EMA
        save_model(output / "fm", generator, metadata={"stage": "fm", **fm_config.to_dict()})
        fm_model = copy.deepcopy(generator)

        discriminator = discriminator_from_generator(generator)
        cafm_ema = EMA(generator, decay=cafm_config.ema_decay, warmup=cafm_config.ema_warmup)
        print(f"CAFM post-training: {cafm_config.steps} steps ({cafm_config.warmup_steps} D-only warmup, "
              f"N={cafm_config.discriminator_steps}, {cafm_config.num_generator_steps} G steps, {logit_mode} logits)", flush=True)
        cafm_batches = infinite_batches(dataset.data, train_labels, cafm_config.batch_size, seed=seed + 1)
        cafm_result = train_cafm(generator, discriminator, cafm_batches, cafm_config, ema=cafm_ema, device=device,
                                 callback=_progress("CAFM", cafm_config.steps), autocast_dtype=TRAIN_DTYPES[dtype])
        cafm_ema.copy_to(generator)
        save_model(output / "cafm", generator, metadata={"stage": "cafm", **cafm_config.to_dict()})

    print("evaluation at identical sampler settings (guidance-free)", flush=True)
    eval_samples = chosen.eval_samples or (None if image else 10000)
    protocol = protocol_for_dataset(dataset, settings, eval_seeds, num_samples=eval_samples, feature_net=feature_net)
    rows = evaluate_under(protocol, {"FM": fm_model, "CAFM": generator}, dataset, feature_net=feature_net, device=device)
    floor = noise_floor(dataset, feature_net=feature_net, seed=feature_seed, splits=FLOOR_SPLITS)
    keys = IMAGE_METRICS if image else POINT_METRICS
    table = format_table(summarise_over_seeds(rows, keys), floor, keys)

    picture = output / "samples.png"
    last = settings[-1]
    if image:
        count = 50
        grids = []
        for name, model in (("FM", fm_model), ("CAFM", generator)):
            samples, _ = sample_for_evaluation(model, dataset, last, num_samples=count, seed=seed, device=device)
            grids.append((f"{name}, {last.label}", image_grid(samples, columns=10, scale=4)))
        grids.append(("real", image_grid(dataset.data[:count], columns=10, scale=4)))
        labelled_grids(grids).save(picture)
    else:
        panels = [("real", dataset.data[:5000])]
        for name, model in (("FM", fm_model), ("CAFM", generator)):
            samples, _ = sample_for_evaluation(model, dataset, last, num_samples=5000, seed=seed, device=device)
            panels.append((f"{name}, {last.label}", samples))
        scatter_panels(panels, str(picture))

    seconds = time.perf_counter() - started
    result = {
        "dataset": dataset_name,
        "profile": profile,
        "model": model_config.to_dict(),
        "device": str(device),
        "dtype": dtype,
        "eval_seeds": list(eval_seeds),
        "protocol_id": protocol.id,
        "feature_seed": feature_seed,
        "feature_val_accuracy": feature_report["val_accuracy"] if feature_net is not None else None,
        "fm": {"config": fm_config.to_dict(), "seconds": fm_result and fm_result.seconds,
               "final": fm_result and fm_result.history[-1]},
        "cafm": {"config": cafm_config.to_dict(), "seconds": cafm_result and cafm_result.seconds,
                 "final": cafm_result and cafm_result.history[-1], "generator_steps": cafm_config.num_generator_steps},
        "trained": None if trained is None else str(trained),
        "rows": rows,
        "noise_floor": floor,
        "seconds": seconds,
    }
    (output / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    trained_line = (f"FM {fm_config.steps} steps ({fm_result.seconds:.0f}s); CAFM {cafm_config.steps} steps, "
                    f"{cafm_config.num_generator_steps} generator steps ({cafm_result.seconds:.0f}s)"
                    if trained is None else f"checkpoints of {trained}, evaluated here")
    report = f"# FM vs CAFM on {dataset_name} ({profile} profile)\n\n{table}\n\n{trained_line}; total {seconds:.0f}s.\n"
    (output / "report.md").write_text(report)
    print("\n" + table)
    print(f"\nwrote {output}/: fm/, cafm/ (checkpoints), samples.png, metrics.json, report.md  [{seconds:.0f}s]")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help=f"one of {', '.join(BUILTIN_DATASETS)}")
    parser.add_argument("--profile", default="default", choices=sorted(PROFILES))
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("--logit-mode", default="reverse", choices=LOGIT_MODES)
    parser.add_argument("--nfe", type=int, nargs="+", default=[8, 32], help="Heun NFEs to evaluate (even)")
    parser.add_argument("--fm-steps", type=int)
    parser.add_argument("--cafm-steps", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny", choices=sorted(DIT_PRESETS), help="DiT size (image sets)")
    parser.add_argument("--batch", type=int, help="batch size of both stages (default: the profile's)")
    parser.add_argument("--dtype", default="float32", choices=sorted(TRAIN_DTYPES), help="training precision (autocast)")
    args = parser.parse_args(argv)
    try:
        run_demo(args.dataset, profile=args.profile, output=args.output, logit_mode=args.logit_mode,
                 nfes=tuple(args.nfe), seed=args.seed, device=args.device,
                 fm_steps=args.fm_steps, cafm_steps=args.cafm_steps, preset=args.preset,
                 batch_size=args.batch, dtype=args.dtype)
    except CAFMInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
