"""The noise floor is kept beside the prepared dataset and read back by later evaluations of
the same reference; anything else about it (another seed, other rows, other code) computes it
anew, and keeping it is best effort."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cafm_core.features import extract_features
from tasks import sample_scoring
from tasks.dataset_format import load_for_evaluation
from tasks.prepare import prepare_dataset
from tasks.sample_scoring import FLOORS_FOLDER, floor_key, reference_floor
from tasks.storage import StorageError, Store


@pytest.fixture(autouse=True)
def _fast(monkeypatch, one_torch_thread):
    monkeypatch.setattr(sample_scoring, "FLOOR_SPLITS", 2)


@pytest.fixture
def reference(tmp_path):
    store = Store(str(tmp_path))
    data_url = store.url("digits")
    prepare_dataset("digits", store, data_url, feature_steps=2)
    reference = load_for_evaluation(store, data_url)
    return store, reference, extract_features(reference.feature_net, reference.dataset.data)


def _refuse_to_compute(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the noise floor was computed")

    monkeypatch.setattr(sample_scoring, "noise_floor", refuse)


def test_a_kept_floor_is_read_back_and_equals_the_computed_one(reference, monkeypatch):
    store, ref, features = reference
    computed = reference_floor(ref, real_features=features, seed=0, store=store)
    kept = store.list(store.join(ref.data_url, FLOORS_FOLDER))
    assert len(kept) == 1 and json.loads(store.read_bytes(kept[0]))["key"] == floor_key(ref, 0)

    _refuse_to_compute(monkeypatch)
    assert reference_floor(ref, real_features=features, seed=0, store=store) == computed
    with pytest.raises(AssertionError, match="computed"):  # another seed is another floor
        reference_floor(ref, real_features=features, seed=1, store=store)
    fewer_rows = dataclasses.replace(ref, dataset=dataclasses.replace(ref.dataset, data=ref.dataset.data[:1000],
                                                                      labels=ref.dataset.labels[:1000]))
    with pytest.raises(AssertionError, match="computed"):
        reference_floor(fewer_rows, real_features=features[:1000], seed=0, store=store)
    monkeypatch.setattr(sample_scoring, "code_identity", lambda: {"digest": "other code"})
    with pytest.raises(AssertionError, match="computed"):
        reference_floor(ref, real_features=features, seed=0, store=store)


def test_a_damaged_or_unwritable_kept_floor_only_means_computing_it(reference, monkeypatch, caplog):
    store, ref, features = reference
    computed = reference_floor(ref, real_features=features, seed=0, store=store)
    [kept] = store.list(store.join(ref.data_url, FLOORS_FOLDER))
    store.write_bytes(kept, b'{"key": ')  # cut short
    assert reference_floor(ref, real_features=features, seed=0, store=store) == computed
    assert "could not be read" in caplog.text
    assert json.loads(store.read_bytes(kept))["floor"] == computed  # written again, whole

    def read_only(url, data):
        raise StorageError(f"cannot write {url}: permission denied")

    monkeypatch.setattr(store, "write_bytes", read_only)
    assert reference_floor(ref, real_features=features, seed=5, store=store)["bootstrap"]["fd"] >= 0
    assert "could not be kept" in caplog.text
