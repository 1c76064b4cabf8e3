"""Evaluation stage (sample scoring): every generator's sample shards under one evaluation
protocol, with the noise floor.

Reads the sample shards one at a time into ``cafm_core.protocol.SampleScorer`` (the scorer
every evaluation path uses: in-domain features from the preparation stage; Inception where
a local weights file is given), and writes ``report.md``, ``metrics.json`` (with the
protocol and its id) and ``samples.png`` to storage. The real side is the prepared set's
real reference (``tasks.dataset_format.load_for_protocol``): every row of a set of up to
50,000, else a seeded sample of 50,000 rows with FD against the statistics of all rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import torch

from cafm_core.evaluation import (
    FLOOR_SPLITS,
    IMAGE_METRICS,
    POINT_METRICS,
    format_differences,
    format_table,
    noise_floor,
    paired_differences,
    summarise_over_seeds,
)
from cafm_core.features import extract_features, load_inception_features
from cafm_core.plots import image_grid, labelled_grids, scatter_panels
from cafm_core.protocol import EvaluationProtocol, SampleScorer, sample_count_note
from tasks.code_version import code_identity
from tasks.dataset_format import RealReference, dataset_identity, load_for_protocol
from tasks.sampling import read_samples, sample_set_key
from tasks.storage import Store, StorageError

logger = logging.getLogger(__name__)

FLOORS_FOLDER = "floors"

__all__ = ["floor_key", "headline", "reference_floor", "score_sample_set", "score_samples"]


def score_sample_set(store: Store, shard_urls: list[str], scorer: SampleScorer) -> SampleScorer:
    """Feed one sample set's shards to ``scorer``, one shard in memory at a time."""
    for url in shard_urls:
        samples, labels = read_samples(store, [url])
        scorer.add(samples, labels, where=f"samples in {url}")
    return scorer


def floor_key(reference: RealReference, seed: int) -> dict:
    """What a noise floor depends on: the held set's content, the reference rows (count and
    sampling seed), the floor's seed and splits, and the code that computes it (its digest:
    any change to the code computes the floor anew)."""
    return {"dataset": dataset_identity(reference.manifest), "rows": reference.rows, "reference_seed": reference.seed,
            "seed": seed, "splits": FLOOR_SPLITS, "code": code_identity()["digest"]}


def reference_floor(reference: RealReference, *, real_features: torch.Tensor | None, seed: int,
                    store: Store | None = None) -> dict:
    """The real-vs-real noise floor (``FLOOR_SPLITS`` splits) within the real reference's rows;
    each floor records ``samples`` when those rows are a sample of the set.

    With ``store`` the floor is kept beside the prepared dataset
    (``<data>/floors/<key hash>.json``, :func:`floor_key`) and read back by every later
    evaluation of the same reference (10 s of KID subsets on digits): it is a function of the
    key alone. Keeping it is best effort: a read-only or unreachable dataset folder, or an
    unreadable kept file, only means the floor is computed.
    """
    key = floor_key(reference, seed)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    kept_url = (Store.join(reference.data_url, FLOORS_FOLDER, f"{digest}.json")
                if store is not None and reference.data_url is not None else None)
    if kept_url is not None:
        try:
            kept = store.read_json(kept_url)  # one read; a missing file raises at once, unretried
            if kept.get("key") == key:
                return kept["floor"]
        except FileNotFoundError:
            pass
        except (StorageError, AttributeError, KeyError) as exc:
            logger.warning("the kept noise floor %s could not be read (%s); computing it", kept_url, exc)
    floor = noise_floor(reference.dataset, feature_net=reference.feature_net, real_features=real_features, seed=seed,
                        splits=FLOOR_SPLITS)
    if reference.sampled:
        for values in floor.values():
            values["samples"] = reference.rows
    if kept_url is not None:
        try:
            store.write_json(kept_url, {"key": key, "floor": floor})
        except StorageError as exc:
            logger.warning("the noise floor could not be kept at %s (%s); later evaluations compute it again",
                           kept_url, exc)
    return floor


def score_samples(
    store: Store,
    *,
    protocol: EvaluationProtocol,
    sample_layout: dict[str, list[str]],
    out_url: str,
    inception_weights: str | None = None,
) -> dict:
    """Compute every row, write the report files; returns rows, summary, floor, the table
    and the protocol (its dict and id: every number here belongs to it).

    With ``inception_weights`` (a local TorchScript Inception-v3 file) each image row also
    gets ``fid_inception``, the standard FID feature space. Image samples are read one shard
    at a time (see ``bench/bench_memory.py`` for peak memory against the sample count); the
    real reference holds at most 50,000 rows (``tasks.dataset_format.load_for_evaluation``).
    """
    reference = load_for_protocol(store, protocol)
    dataset, manifest, feature_net = reference.dataset, reference.manifest, reference.feature_net
    image = dataset.kind == "image"
    real_features = extract_features(feature_net, dataset.data) if image and feature_net is not None else None
    inception = load_inception_features(inception_weights) if inception_weights and image else None
    real_inception = inception(dataset.data) if inception is not None else None
    models = sorted({key.split("/")[0] for key in sample_layout}, key=lambda m: (m != "fm", m))

    settings, seeds = protocol.settings, protocol.seeds
    last = settings[-1]
    pictured: dict[str, torch.Tensor] = {}  # each model at the last setting, first seed
    rows = []
    for model in models:
        for setting in settings:
            for seed in seeds:
                scorer = SampleScorer(dataset, feature_net=feature_net, real_features=real_features,
                                      inception=inception, real_inception=real_inception, real_stats=reference.stats)
                score_sample_set(store, sample_layout[sample_set_key(model, setting, seed)], scorer)
                if setting == last and seed == seeds[0]:
                    pictured[model] = scorer.first_samples()
                rows.append({"model": model.upper(), **setting.to_dict(), "seed": seed, **scorer.metrics(seed)})
    keys = IMAGE_METRICS if image else POINT_METRICS
    summary = summarise_over_seeds(rows, keys)
    floor = reference_floor(reference, real_features=real_features, seed=seeds[0], store=store)
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
        f"{len(seeds)} seed(s); the noise floor rows compare real data with real data. "
        f"Evaluation protocol `{protocol.id}` (held set {protocol.dataset_name} `{protocol.dataset[:12]}`): "
        f"numbers under another protocol id are not comparable. {sample_count_note(protocol, manifest['count'])}\n"
    )
    if reference.sampled:
        report += f"\n{reference.note()}"
        if inception is not None:
            report += " Inception FID compares with the sample's Inception features."
        report += "\n"
    if differences:
        report += f"\nPaired by seed (same noise and labels; lower is better except class_accuracy):\n\n{format_differences(differences, floor=floor)}\n"
    result = {"rows": rows, "summary": summary, "noise_floor": floor, "table": table, "differences": differences,
              "protocol_id": protocol.id, "protocol": protocol.to_dict(),
              "real_reference": {"rows": reference.rows, "of": reference.count, "sampled": reference.sampled,
                                 "seed": reference.seed, "fd_from_reference_stats": reference.stats is not None}}
    store.write_bytes(Store.join(out_url, "samples.png"), picture.getvalue())
    store.write_json(Store.join(out_url, "metrics.json"), result)
    store.write_bytes(Store.join(out_url, "report.md"), report.encode())
    result["picture_png"] = picture.getvalue()
    result["report"] = report
    return result


def headline(summary: list[dict], metric: str, model: str = "CAFM") -> float | None:
    """The metric of ``model`` at the largest NFE without guidance."""
    candidates = [r for r in summary if r["model"] == model and r["cfg_scale"] == 1.0 and metric in r]
    if not candidates:
        return None
    return max(candidates, key=lambda r: r["nfe"])[metric]
