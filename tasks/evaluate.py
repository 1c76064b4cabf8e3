"""Evaluation stage: FM vs CAFM at identical sampler settings, with the noise floor.

Reads the sample shards, computes metrics with ``cafm_core.evaluation`` (in-domain
features from the preparation stage; Inception where a local weights file is given),
and writes ``report.md``, ``metrics.json`` and ``samples.png`` to storage.
"""

from __future__ import annotations

import io
import json
import statistics

import torch

from cafm_core.evaluation import SamplerSetting, evaluate_samples, noise_floor
from cafm_core.features import extract_features
from cafm_core.plots import image_grid, labelled_grids, scatter_panels
from tasks.prepare import load_feature_net, load_prepared
from tasks.sampling import read_samples, setting_key
from tasks.storage import Store

IMAGE_METRICS = ("fd", "kid", "precision", "recall", "class_accuracy")
POINT_METRICS = ("sliced_wasserstein", "on_manifold_fraction", "off_manifold_fraction", "modes_hit")
LOWER_IS_BETTER = {"fd", "kid", "sliced_wasserstein", "off_manifold_fraction"}


def _summarise(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Mean and spread over seeds for each (model, setting)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["method"], row["nfe"], row["cfg_scale"]), []).append(row)
    summary = []
    for (model, method, nfe, cfg), members in groups.items():
        entry = {"model": model, "method": method, "nfe": nfe, "cfg_scale": cfg, "seeds": len(members)}
        for key in keys:
            values = [m[key] for m in members if key in m]
            if values:
                entry[key] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def format_table(summary: list[dict], floor: dict, keys: tuple[str, ...]) -> str:
    keys = tuple(k for k in keys if any(k in r for r in summary))
    lines = ["| model | sampler | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|"]
    for row in summary:
        cells = []
        for key in keys:
            if key not in row:
                cells.append("")
            elif row["seeds"] > 1:
                cells.append(f"{row[key]:.4g} ± {row[f'{key}_std']:.2g}")
            else:
                cells.append(f"{row[key]:.4g}")
        label = SamplerSetting(row["method"], row["nfe"], row["cfg_scale"]).label
        lines.append(f"| {row['model']} | {label} | {row['seeds']} | " + " | ".join(cells) + " |")
    for name, metrics in floor.items():
        cells = [f"{metrics[k]:.4g}" if k in metrics else "" for k in keys]
        lines.append(f"| real vs real ({name}) | noise floor | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_stage(
    store: Store,
    *,
    data_url: str,
    sample_layout: dict[str, list[str]],
    settings: list[SamplerSetting],
    seeds: list[int],
    out_url: str,
) -> dict:
    """Compute every row, write the report files; returns rows, summary, floor and the table."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dataset, manifest = load_prepared(store, data_url)
    image = dataset.kind == "image"
    feature_net = load_feature_net(store, data_url) if image and dataset.labels is not None else None
    features = (lambda x: extract_features(feature_net, x)) if feature_net is not None else None
    real_features = features(dataset.data) if features is not None else None
    models = sorted({key.split("/")[0] for key in sample_layout}, key=lambda m: (m != "fm", m))

    rows = []
    for model in models:
        for setting in settings:
            for seed in seeds:
                samples, labels = read_samples(store, sample_layout[f"{model}/{setting_key(setting)}/seed{seed}"])
                metrics = evaluate_samples(samples, dataset, features=features, classifier=feature_net,
                                           labels=labels, real_features=real_features, seed=seed)
                rows.append({"model": model.upper(), **setting.to_dict(), "seed": seed, **metrics})
    keys = IMAGE_METRICS if image else POINT_METRICS
    summary = _summarise(rows, keys)
    floor = noise_floor(dataset, feature_net=feature_net, seed=seeds[0])
    table = format_table(summary, floor, keys)

    # Picture: each model at the last setting (largest NFE listed), first seed, beside real data.
    last = settings[-1]
    picture = io.BytesIO()
    if image:
        grids = []
        for model in models:
            samples, _ = read_samples(store, sample_layout[f"{model}/{setting_key(last)}/seed{seeds[0]}"])
            grids.append((f"{model.upper()}, {last.label}", image_grid(samples[:50], columns=10, scale=4)))
        grids.append(("real", image_grid(dataset.data[:50], columns=10, scale=4)))
        labelled_grids(grids).save(picture, format="PNG")
    else:
        import tempfile

        panels = [("real", dataset.data[:5000])]
        for model in models:
            samples, _ = read_samples(store, sample_layout[f"{model}/{setting_key(last)}/seed{seeds[0]}"])
            panels.append((f"{model.upper()}, {last.label}", samples[:5000]))
        with tempfile.NamedTemporaryFile(suffix=".png") as handle:
            scatter_panels(panels, handle.name)
            picture.write(open(handle.name, "rb").read())

    report = (
        f"# FM vs CAFM on {manifest['name']}\n\n{table}\n\n"
        f"Identical sampler settings, noise and labels for every model; "
        f"{len(seeds)} seed(s); the noise floor rows compare real data with real data.\n"
    )
    result = {"rows": rows, "summary": summary, "noise_floor": floor, "table": table}
    store.write_bytes(Store.join(out_url, "samples.png"), picture.getvalue())
    store.write_json(Store.join(out_url, "metrics.json"), result)
    store.write_bytes(Store.join(out_url, "report.md"), report.encode())
    result["picture_png"] = picture.getvalue()
    result["report"] = report
    return result


def headline(summary: list[dict], metric: str, model: str = "CAFM") -> float | None:
    """The metric of ``model`` at the largest NFE without guidance (used for promotion)."""
    candidates = [r for r in summary if r["model"] == model and r["cfg_scale"] == 1.0 and metric in r]
    if not candidates:
        return None
    return max(candidates, key=lambda r: r["nfe"])[metric]


def summary_json(result: dict) -> str:
    return json.dumps({k: v for k, v in result.items() if k != "picture_png"}, indent=2, default=str)
