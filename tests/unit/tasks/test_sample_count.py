"""The evaluation's sample count: min(dataset size, 50,000) for images unless set, and the report says so."""

from __future__ import annotations

import pytest

from cafm_core.evaluation import SamplerSetting
from cafm_core.protocol import DEFAULT_IMAGE_SAMPLES, sample_count_note
from tasks import dataset_format
from tasks.dataset_format import evaluation_protocol
from tasks.storage import Store

SETTINGS = [SamplerSetting("heun", 8)]


def _manifest_only(store: Store, name: str, *, kind: str, count: int) -> str:
    """A complete prepared dataset's manifest (the protocol reads no shard)."""
    url = store.url(name)
    manifest = {"format": dataset_format.MANIFEST_FORMAT, "version": dataset_format.MANIFEST_VERSION, "name": name,
                "kind": kind, "count": count, "sample_shape": [3, 32, 32] if kind == "image" else [2],
                "num_classes": 2, "class_names": ["a", "b"], "class_counts": [count // 2, count - count // 2],
                "shards": [{"path": "shards/part-00000.parquet", "sha256": "0" * 64, "rows": count, "bytes": 1}],
                "feature_net": None, "reference_stats": None}
    dataset_format.write_manifest_and_mark_complete(store, url, manifest)
    return url


@pytest.mark.parametrize(("kind", "count", "expected"), [
    ("image", 1_281_167, DEFAULT_IMAGE_SAMPLES),  # ImageNet-1k: 50,000, not 1.28M per setting
    ("image", 50_001, 50_000),
    ("image", 1_797, 1_797),  # smaller sets: every image's worth
    ("points", 1_000_000, dataset_format.POINTS_SAMPLE_COUNT),
])
def test_default_sample_count(tmp_path, kind, count, expected):
    store = Store(str(tmp_path))
    url = _manifest_only(store, "d", kind=kind, count=count)
    protocol = evaluation_protocol(store, url, settings=SETTINGS, seeds=[0])
    assert protocol.num_samples == expected
    assert evaluation_protocol(store, url, settings=SETTINGS, seeds=[0], num_samples=256).num_samples == 256


def test_the_report_sentence_says_where_the_count_comes_from(tmp_path):
    store = Store(str(tmp_path))
    url = _manifest_only(store, "big", kind="image", count=120_000)
    default = evaluation_protocol(store, url, settings=SETTINGS, seeds=[0])
    assert sample_count_note(default, 120_000) == (
        "50,000 samples per setting: the default, min(dataset size 120,000, 50,000), the usual count for "
        "FID-style metrics.")
    explicit = evaluation_protocol(store, url, settings=SETTINGS, seeds=[0], num_samples=256)
    assert sample_count_note(explicit, 120_000) == (
        "256 samples per setting, set explicitly (the default would be min(dataset size 120,000, 50,000) = 50,000).")
