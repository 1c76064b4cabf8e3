"""The evaluation stage (tasks.sample_scoring) reads image samples shard by shard and gets the
same metrics as all at once."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as safetensors_save

from cafm_core.evaluation import evaluate_samples
from cafm_core.features import extract_features
from tasks.dataset_format import load_for_evaluation
from tasks.prepare import prepare_dataset
from cafm_core.protocol import PICTURED_IMAGES, SampleScorer
from tasks.sample_scoring import score_sample_set
from tasks.storage import Store


def test_streamed_image_metrics_equal_the_in_memory_ones(tmp_path):
    store = Store(str(tmp_path))
    data_url = store.url("digits")
    prepare_dataset("digits", store, data_url, feature_steps=20)
    reference = load_for_evaluation(store, data_url)
    dataset, feature_net = reference.dataset, reference.feature_net
    generator = torch.Generator().manual_seed(0)
    samples = (dataset.data[:300] + 0.3 * torch.randn(300, *dataset.data.shape[1:], generator=generator)).clamp(-1, 1)
    labels = dataset.labels[:300]
    urls = []
    for index, start in enumerate(range(0, 300, 128)):  # shards of 128, 128, 44
        url = store.url("samples", f"part-{index:05d}.safetensors")
        store.write_bytes(url, safetensors_save({"samples": samples[start : start + 128].contiguous(),
                                                 "labels": labels[start : start + 128].contiguous()}))
        urls.append(url)

    features = lambda x: extract_features(feature_net, x)  # noqa: E731
    real_features = features(dataset.data)
    scorer = score_sample_set(store, urls, SampleScorer(dataset, feature_net=feature_net, real_features=real_features))
    streamed, pictured = scorer.metrics(seed=3), scorer.first_samples()
    at_once = evaluate_samples(samples, dataset, features=features, classifier=feature_net, labels=labels,
                               real_features=real_features, seed=3)
    assert set(streamed) == set(at_once) == {"fd", "kid", "kid_std", "precision", "recall", "class_accuracy"}
    for key, value in at_once.items():
        assert streamed[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert torch.equal(pictured, samples[:PICTURED_IMAGES])
