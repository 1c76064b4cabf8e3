"""The evaluation's real reference (issue 18): at most ``FLOOR_MAX_SAMPLES`` real rows, read
one shard at a time; FD against the statistics of all rows when the set is larger. A set
within the bound is evaluated exactly as before (same rows, metrics, floor and protocol id)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save

from cafm_core.checks import CAFMInputError
from cafm_core.evaluation import SamplerSetting, image_metrics, noise_floor
from cafm_core.features import extract_features
from cafm_core.metrics import frechet_distance, feature_statistics
from cafm_core.protocol import EvaluationProtocol, SampleScorer
from tasks import dataset_format, sample_scoring
from tasks.dataset_format import (
    evaluation_protocol,
    load_for_evaluation,
    load_for_protocol,
    load_prepared,
    load_reference_stats,
    sample_positions,
)
from tasks.prepare import prepare_dataset
from tasks.sample_scoring import score_sample_set, score_samples
from tasks.sampling import read_samples, sample_set_key
from tasks.storage import Store

SETTING = SamplerSetting("euler", 2)
SEEDS = (0, 3)
BOUND = 300  # the patched bound: digits' 1,797 rows are "large"
SPLITS = 2  # noise-floor splits (the pipeline's 10 cost a minute here)


@pytest.fixture(autouse=True)
def _fast(monkeypatch, one_torch_thread):
    monkeypatch.setattr(sample_scoring, "FLOOR_SPLITS", SPLITS)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Digits prepared in shards of 100 rows, and two sample sets (noisy real images) on storage."""
    store = Store(str(tmp_path_factory.mktemp("store")))
    data_url = store.url("digits")
    prepare_dataset("digits", store, data_url, feature_steps=2, shard_size=100)
    full, manifest = load_prepared(store, data_url)
    layout = {}
    for seed in SEEDS:
        generator = torch.Generator().manual_seed(seed)
        picked = torch.randperm(len(full), generator=generator)[:120]
        samples = (full.data[picked] + 0.3 * torch.randn(120, *full.sample_shape, generator=generator)).clamp(-1, 1)
        key = sample_set_key("fm", SETTING, seed)
        layout[key] = []
        for number, start in enumerate(range(0, 120, 64)):
            url = store.url("samples", key, f"part-{number:05d}.safetensors")
            store.write_bytes(url, safetensors_save({"samples": samples[start : start + 64].contiguous(),
                                                     "labels": full.labels[picked][start : start + 64].contiguous()}))
            layout[key].append(url)
    return store, data_url, full, manifest, layout


def _protocol(store: Store, data_url: str) -> EvaluationProtocol:
    return evaluation_protocol(store, data_url, settings=[SETTING], seeds=list(SEEDS), num_samples=120, shard_size=64)


def _old_rows(store: Store, layout: dict, full, feature_net, real_features) -> list[dict]:
    """The evaluation stage's rows as the code before the bound computed them: every row's features."""
    rows = []
    for seed in SEEDS:
        scorer = SampleScorer(full, feature_net=feature_net, real_features=real_features)
        score_sample_set(store, layout[sample_set_key("fm", SETTING, seed)], scorer)
        rows.append({"model": "FM", **SETTING.to_dict(), "seed": seed, **scorer.metrics(seed)})
    return rows


def test_a_set_within_the_bound_is_evaluated_exactly_as_before(digits):
    store, data_url, full, manifest, layout = digits
    reference = load_for_evaluation(store, data_url)
    # the same rows in the same order, the same labels; no statistics in place of the features
    assert not reference.sampled and reference.rows == reference.count == 1797 and reference.stats is None
    assert torch.equal(reference.dataset.data, full.data) and torch.equal(reference.dataset.labels, full.labels)
    assert reference.note() == ""

    protocol = _protocol(store, data_url)
    assert protocol.reference_rows is None and "reference_rows" not in protocol.to_dict()
    result = score_samples(store, protocol=protocol, sample_layout=layout, out_url=store.url("eval-small"))
    feature_net = reference.feature_net
    real_features = extract_features(feature_net, full.data)
    assert result["rows"] == _old_rows(store, layout, full, feature_net, real_features)  # exactly, not approximately
    assert result["noise_floor"] == noise_floor(full, feature_net=feature_net, real_features=real_features, seed=SEEDS[0],
                                                splits=SPLITS)
    assert "Real reference" not in result["report"]
    assert result["real_reference"] == {"rows": 1797, "of": 1797, "sampled": False, "seed": 0,
                                        "fd_from_reference_stats": False}


def test_protocol_ids_within_the_bound_are_unchanged():
    """Pinned against the code before the bound: a protocol that compares with every row keeps its id."""
    image = EvaluationProtocol(dataset="a" * 64, dataset_name="x", kind="image", sample_shape=(1, 8, 8), num_classes=10,
                               class_counts=(5,) * 10, feature_net="b" * 64, reference_stats="c" * 64,
                               settings=(SamplerSetting("heun", 8),), num_samples=1000, seeds=(0, 1))
    points = EvaluationProtocol(dataset="a" * 64, dataset_name="pts", kind="points", sample_shape=(2,), num_classes=0,
                                class_counts=None, feature_net=None, reference_stats=None,
                                settings=(SamplerSetting("euler", 4),), num_samples=10000, seeds=(0,))
    assert (image.id, points.id) == ("ba3622164b832e84", "797bab3797f0bda1")
    sampled = dataclasses.replace(image, reference_rows=50_000)
    assert sampled.id != image.id and EvaluationProtocol.from_dict(sampled.to_dict()) == sampled
    assert "real reference: a sample of 50,000 rows" in sampled.describe()
    with pytest.raises(CAFMInputError, match="reference_rows"):
        dataclasses.replace(image, reference_rows=1)


@pytest.fixture
def small_bound(monkeypatch):
    monkeypatch.setattr(dataset_format, "FLOOR_MAX_SAMPLES", BOUND)


def _count_rows_read(monkeypatch) -> list[int]:
    """Rows kept from each shard read by the evaluation's reader (and no whole-dataset load)."""
    kept = []
    real = dataset_format.pick_rows

    def counting(item, *args, **kwargs):
        part = real(item, *args, **kwargs)
        kept.append(len(part["index"]))
        return part

    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation must not load the whole prepared dataset")

    monkeypatch.setattr(dataset_format, "pick_rows", counting)
    monkeypatch.setattr(dataset_format, "load_prepared", refuse)
    return kept


def test_a_set_above_the_bound_reads_a_seeded_sample_and_uses_all_row_stats_for_fd(digits, small_bound, monkeypatch):
    store, data_url, full, manifest, layout = digits
    kept = _count_rows_read(monkeypatch)
    reference = load_for_evaluation(store, data_url)
    assert sum(kept) == reference.rows == BOUND and len(kept) <= len(manifest["shards"])  # one shard at a time
    assert max(kept) < 100  # only the sampled rows of each shard are kept
    positions = torch.from_numpy(sample_positions(1797, BOUND, dataset_format.REFERENCE_SEED))
    assert torch.equal(reference.dataset.data, full.data[positions])
    assert torch.equal(reference.dataset.labels, full.labels[positions])
    assert reference.sampled and reference.count == 1797
    mu, sigma = load_reference_stats(store, data_url)
    assert np.array_equal(reference.stats[0], mu) and np.array_equal(reference.stats[1], sigma)
    assert reference.note().startswith("Real reference: 300 of 1,797 rows (a uniform random sample, seed 0); "
                                       "FD against the statistics of all rows")
    # deterministic for a seed; another seed, other rows
    assert torch.equal(load_for_evaluation(store, data_url).dataset.data, reference.dataset.data)
    assert not torch.equal(load_for_evaluation(store, data_url, seed=1).dataset.data, reference.dataset.data)

    protocol = _protocol(store, data_url)
    assert protocol.reference_rows == BOUND and protocol.id != dataclasses.replace(protocol, reference_rows=None).id
    kept.clear()
    result = score_samples(store, protocol=protocol, sample_layout=layout, out_url=store.url("eval-large"))
    assert sum(kept) == BOUND
    again = score_samples(store, protocol=protocol, sample_layout=layout, out_url=store.url("eval-large-2"))
    assert again["rows"] == result["rows"] and again["noise_floor"] == result["noise_floor"]
    assert "Real reference: 300 of 1,797 rows" in result["report"]
    assert result["real_reference"]["sampled"] and result["real_reference"]["fd_from_reference_stats"]
    assert all(floor["samples"] == BOUND for floor in result["noise_floor"].values())

    # FD: the generated features against all rows' statistics; KID, precision/recall: against the sample
    feature_net = reference.feature_net
    sample_features = extract_features(feature_net, reference.dataset.data)
    for row, seed in zip(result["rows"], SEEDS):
        fake = []
        for url in layout[sample_set_key("fm", SETTING, seed)]:
            samples, _ = read_samples(store, [url])
            fake.append(extract_features(feature_net, samples))
        fake = torch.cat(fake)
        assert row["fd"] == pytest.approx(frechet_distance(mu, sigma, *feature_statistics(fake)), rel=1e-12)
        against_sample = image_metrics(sample_features, fake, seed=seed)
        for key in ("kid", "kid_std", "precision", "recall"):
            assert row[key] == pytest.approx(against_sample[key], rel=1e-9, abs=1e-12), key
        assert row["fd"] != pytest.approx(against_sample["fd"], rel=1e-6)  # the sample's own FD differs


def test_a_protocol_that_does_not_match_the_reference_is_refused(digits, small_bound):
    store, data_url, _, _, _ = digits
    protocol = _protocol(store, data_url)
    with pytest.raises(CAFMInputError, match="compares with all real rows of digits; the evaluation reads 300 of 1,797"):
        load_for_protocol(store, dataclasses.replace(protocol, reference_rows=None))
    assert load_for_protocol(store, protocol).rows == BOUND
    assert load_for_protocol(store, dataclasses.replace(protocol, reference_rows=200)).rows == 200


def test_the_sample_is_the_same_whatever_order_the_shards_arrive_in(digits):
    """The prepare stage reads the feature network's sample with Ray tasks (completion order)."""
    store, data_url, full, manifest, _ = digits
    shape = tuple(manifest["sample_shape"])

    def reversed_parts(items):
        return [dataset_format.pick_rows(item, store, data_url, shape, raw=True) for item in reversed(items)]

    in_order = dataset_format.read_sample(store, data_url, manifest, size=BOUND, seed=5, raw=True)
    shuffled = dataset_format.read_sample(store, data_url, manifest, size=BOUND, seed=5, raw=True, parts=reversed_parts)
    assert in_order[0].dtype == np.uint8
    for ours, theirs in zip(in_order, shuffled):
        assert np.array_equal(ours, theirs)
    assert np.array_equal(in_order[2], sample_positions(1797, BOUND, 5))  # digits' index is its position


def test_a_points_set_above_the_bound_is_a_sample_without_statistics(tmp_path, small_bound):
    store = Store(str(tmp_path))
    prepare_dataset("two_moons", store, store.url("moons"), num_samples=400, shard_size=128)
    reference = load_for_evaluation(store, store.url("moons"))
    assert reference.rows == BOUND and reference.count == 400 and reference.stats is None
    assert reference.feature_net is None and reference.dataset.kind == "points"
    assert reference.note().endswith("every metric from the sample.")
    assert evaluation_protocol(store, store.url("moons"), settings=[SETTING], seeds=[0]).reference_rows == BOUND


def test_the_finite_check_looks_at_every_chunk(monkeypatch):
    from cafm_core import checks

    monkeypatch.setattr(checks, "_FINITE_CHUNK", 7)
    values = torch.zeros(5, 1, 3, 3)
    checks.check_tensor("x", values)
    values[4, 0, 2, 2] = float("nan")  # in the last chunk
    with pytest.raises(CAFMInputError, match="contains 1 NaN/inf values"):
        checks.check_tensor("x", values)
