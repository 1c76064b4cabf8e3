"""Evaluation stage (sample scoring): FM vs CAFM at identical sampler settings, with the noise floor.

Reads the sample shards, computes metrics with ``cafm_core.evaluation`` (in-domain
features from the preparation stage; Inception where a local weights file is given),
and writes ``report.md``, ``metrics.json`` and ``samples.png`` to storage.
"""

from __future__ import annotations

import io

import torch

from cafm_core.evaluation import (
    IMAGE_METRICS,
    image_metrics,
    POINT_METRICS,
    SamplerSetting,
    evaluate_samples,
    format_differences,
    format_table,
    FLOOR_SPLITS,
    noise_floor,
    paired_differences,
    summarise_over_seeds,
)
from cafm_core.checks import CAFMInputError
from cafm_core.features import class_accuracy_from_features, extract_features, load_inception_features
from cafm_core.metrics import frechet_distance_from_features
from cafm_core.plots import image_grid, labelled_grids, scatter_panels
from tasks.dataset_format import load_for_evaluation
from tasks.sampling import read_samples, setting_key
from tasks.storage import Store

PICTURED_PER_MODEL = 50  # images per model in samples.png


def streamed_image_metrics(store: Store, shard_urls: list[str], dataset, *, features, classifier, real_features,
                            inception, real_inception, seed: int) -> tuple[dict, torch.Tensor]:
    """Image metrics of one sample set read shard by shard: only features (and the first
    images for the picture) are kept, so memory is bounded by the shard and feature sizes,
    not by the number of samples. Returns ``(metrics, first images)``."""
    fake, fake_inception, pictured = [], [], []
    correct, labelled = 0.0, 0
    for url in shard_urls:
        samples, labels = read_samples(store, [url])
        if samples.shape[1:] != dataset.data.shape[1:]:
            raise CAFMInputError(f"samples in {url} have shape {tuple(samples.shape[1:])} per item, the dataset "
                                 f"{tuple(dataset.data.shape[1:])}")
        shard_features = features(samples)
        fake.append(shard_features)
        if inception is not None:
            fake_inception.append(inception(samples))
        if classifier is not None and labels is not None:
            correct += class_accuracy_from_features(classifier, shard_features, labels) * len(samples)
            labelled += len(samples)
        if sum(len(p) for p in pictured) < PICTURED_PER_MODEL:
            pictured.append(samples[: PICTURED_PER_MODEL - sum(len(p) for p in pictured)].clone())
        del samples, labels
    metrics = image_metrics(real_features, torch.cat(fake), seed=seed)
    if labelled:
        metrics["class_accuracy"] = correct / labelled
    if inception is not None:
        metrics["fid_inception"] = frechet_distance_from_features(real_inception, torch.cat(fake_inception))
    return metrics, torch.cat(pictured)


def score_samples(
    store: Store,
    *,
    data_url: str,
    sample_layout: dict[str, list[str]],
    settings: list[SamplerSetting],
    seeds: list[int],
    out_url: str,
    inception_weights: str | None = None,
) -> dict:
    """Compute every row, write the report files; returns rows, summary, floor and the table.

    With ``inception_weights`` (a local TorchScript Inception-v3 file) each image row also
    gets ``fid_inception``, the standard FID feature space. Image samples are read one shard
    at a time (see ``bench/bench_memory.py`` for peak memory against the sample count).
    """
    dataset, manifest, feature_net = load_for_evaluation(store, data_url)
    image = dataset.kind == "image"
    features = (lambda x: extract_features(feature_net, x)) if feature_net is not None else None
    real_features = features(dataset.data) if features is not None else None
    inception = load_inception_features(inception_weights) if inception_weights and image else None
    real_inception = inception(dataset.data) if inception is not None else None
    models = sorted({key.split("/")[0] for key in sample_layout}, key=lambda m: (m != "fm", m))

    last = settings[-1]
    pictured: dict[str, torch.Tensor] = {}  # each model at the last setting, first seed
    rows = []
    for model in models:
        for setting in settings:
            for seed in seeds:
                urls = sample_layout[f"{model}/{setting_key(setting)}/seed{seed}"]
                if image:
                    if features is None:
                        raise CAFMInputError(f"{data_url} has no feature network: image samples cannot be evaluated")
                    metrics, first = streamed_image_metrics(
                        store, urls, dataset, features=features, classifier=feature_net, real_features=real_features,
                        inception=inception, real_inception=real_inception, seed=seed)
                else:  # points: a few floats per sample, read at once
                    first, labels = read_samples(store, urls)
                    metrics = evaluate_samples(first, dataset, labels=labels, seed=seed)
                if setting == last and seed == seeds[0]:
                    pictured[model] = first[:5000]
                rows.append({"model": model.upper(), **setting.to_dict(), "seed": seed, **metrics})
    keys = IMAGE_METRICS if image else POINT_METRICS
    summary = summarise_over_seeds(rows, keys)
    floor = noise_floor(dataset, feature_net=feature_net, real_features=real_features, seed=seeds[0], splits=FLOOR_SPLITS)
    table = format_table(summary, floor, keys)
    headline_keys = ("fd", "kid", "class_accuracy") if image else ("sliced_wasserstein", "off_manifold_fraction")
    differences = [d for key in headline_keys for d in paired_differences(rows, key)] if "cafm" in models else []

    # Picture: each model at the last setting (largest NFE listed), first seed, beside real data.
    picture = io.BytesIO()
    if image:
        grids = [(f"{m.upper()}, {last.label}", image_grid(pictured[m][:50], columns=10, scale=4)) for m in models]
        grids.append(("real", image_grid(dataset.data[:50], columns=10, scale=4)))
        labelled_grids(grids).save(picture, format="PNG")
    else:
        panels = [("real", dataset.data[:5000])] + [(f"{m.upper()}, {last.label}", pictured[m]) for m in models]
        scatter_panels(panels, picture)

    report = (
        f"# FM vs CAFM on {manifest['name']}\n\n{table}\n\n"
        f"Identical sampler settings, noise and labels for every model; "
        f"{len(seeds)} seed(s); the noise floor rows compare real data with real data.\n"
    )
    if differences:
        report += f"\nPaired by seed (same noise and labels; lower is better except class_accuracy):\n\n{format_differences(differences, floor=floor)}\n"
    result = {"rows": rows, "summary": summary, "noise_floor": floor, "table": table, "differences": differences}
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
