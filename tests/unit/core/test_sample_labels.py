"""Conditioning labels for sampling follow the class counts (the manifest's), nothing else."""

from collections import Counter

import pytest

from cafm_core.evaluation import labels_in_proportion


@pytest.mark.parametrize("count", [7, 100, 1797, 5000])
def test_labels_follow_the_class_proportions(count):
    counts = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    labels = labels_in_proportion(counts, count)
    assert len(labels) == count
    observed = Counter(labels)
    for cls, n in enumerate(counts):
        assert abs(observed[cls] - count * n / sum(counts)) <= 1.0 + 0.01 * count


def test_prefix_is_mixed_and_empty_classes_never_appear():
    labels = labels_in_proportion([50, 0, 50, 50], 300)
    assert 1 not in labels
    assert set(labels[:3]) == {0, 2, 3}
    assert labels_in_proportion([4, 4], 8) == labels_in_proportion([4, 4], 8)  # deterministic
