"""In-domain feature network and the local-weights Inception loader."""

from __future__ import annotations

import pytest
import torch

from cafm_core.checks import CAFMInputError
from cafm_core.data import Dataset, load_builtin
from cafm_core.features import (
    DigitFeatureNet,
    FeatureNetConfig,
    class_accuracy,
    extract_features,
    load_inception_features,
    train_feature_network,
)


@pytest.fixture(scope="module")
def digits():
    return load_builtin("digits")


@pytest.fixture(scope="module")
def trained(digits):
    # A tiny CNN gains nothing from intra-op threads, and they slow it badly when the
    # 2 cores are shared with other processes; restore the setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    logged = []
    model, report = train_feature_network(
        digits,
        steps=150,
        batch_size=64,
        width=16,
        seed=0,
        log_every=50,
        callback=lambda step, metrics: logged.append(step),
    )
    torch.set_num_threads(threads)
    return model, report, logged


def test_feature_network_trained_on_digits_generalises(trained):
    model, report, logged = trained
    assert report["val_accuracy"] >= 0.9
    assert report["train_accuracy"] >= 0.9
    assert report["num_train"] + report["num_val"] == 1797
    assert logged == [50, 100, 150]
    assert not model.training


def test_features_have_configured_shape_and_do_not_depend_on_batch(trained, digits):
    model, _, _ = trained
    features = extract_features(model, digits.data[:100], batch_size=32)
    assert features.shape == (100, 64) and features.dtype == torch.float32
    assert torch.allclose(features[:10], extract_features(model, digits.data[:10]), atol=1e-5)


def test_class_accuracy_high_for_true_labels_and_chance_for_shuffled(trained, digits):
    model, _, _ = trained
    torch.manual_seed(0)
    assert class_accuracy(model, digits.data, digits.labels) >= 0.95
    shuffled = digits.labels[torch.randperm(len(digits.labels))]
    assert class_accuracy(model, digits.data, shuffled) < 0.2


def test_feature_network_rebuilds_from_its_config(trained, digits):
    model, _, _ = trained
    rebuilt = DigitFeatureNet.from_config(dict(model.config)).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(digits.data[:5]), model(digits.data[:5]))
    assert FeatureNetConfig.from_dict(model.config).to_dict() == model.config


def test_feature_network_handles_rgb_and_larger_resolutions():
    torch.manual_seed(0)
    for channels, resolution in [(3, 8), (1, 28), (3, 32)]:
        net = DigitFeatureNet(FeatureNetConfig(in_channels=channels, resolution=resolution, num_classes=5))
        images = torch.rand(2, channels, resolution, resolution) * 2 - 1
        assert net(images).shape == (2, 5) and net.features(images).shape == (2, 64)


def test_feature_network_errors():
    unlabelled = Dataset(data=torch.zeros(10, 1, 8, 8), labels=None, num_classes=0, kind="image")
    with pytest.raises(CAFMInputError, match="needs class labels"):
        train_feature_network(unlabelled, steps=1)
    with pytest.raises(CAFMInputError, match="image dataset"):
        train_feature_network(load_builtin("two_moons", num_samples=50), steps=1)
    with pytest.raises(CAFMInputError, match="resolution"):
        FeatureNetConfig(in_channels=1, resolution=4, num_classes=10)
    with pytest.raises(CAFMInputError, match="in_channels"):
        FeatureNetConfig(in_channels=2, resolution=8, num_classes=10)
    net = DigitFeatureNet(FeatureNetConfig(in_channels=1, resolution=8, num_classes=10))
    with pytest.raises(CAFMInputError, match="shape"):
        extract_features(net, torch.zeros(2, 3, 8, 8))
    with pytest.raises(CAFMInputError, match=r"\[0, 10\)"):
        class_accuracy(net, torch.zeros(2, 1, 8, 8), torch.tensor([0, 10]))


@pytest.mark.parametrize("path", [None, "", "/nonexistent/inception-2015-12-05.pt"])
def test_inception_without_local_weights_says_how_to_get_fid(path):
    with pytest.raises(CAFMInputError) as error:
        load_inception_features(path)
    message = str(error.value)
    assert "local weights" in message and "TorchScript" in message and "in-domain" in message


class _FakeInceptionWithFlag(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        height = torch.full((x.shape[0], 1), float(x.shape[2]))
        width = torch.full((x.shape[0], 1), float(x.shape[3]))
        value_range = torch.stack([x.min(), x.max()]).expand(x.shape[0], 2)
        size = torch.cat([height, width, value_range], dim=1)
        if return_features:
            return torch.cat([size, x.mean(dim=(2, 3))], dim=1)
        return torch.zeros(x.shape[0], 1008)


class _FakeInceptionPlain(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).unsqueeze(-1).unsqueeze(-1)


def test_inception_loader_calls_torchscript_module_at_299_in_pixel_range(tmp_path):
    path = tmp_path / "fake_inception.pt"
    torch.jit.script(_FakeInceptionWithFlag()).save(str(path))
    extractor = load_inception_features(str(path), batch_size=2)
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    images[0, 0, 0, 0], images[0, 0, 0, 1] = -1.0, 1.0
    features = extractor(images)
    assert features.shape == (3, 7)
    assert torch.all(features[:, 0] == 299) and torch.all(features[:, 1] == 299)
    assert features[0, 2] >= 0 and features[0, 3] <= 255 and features[0, 3] > 200
    assert torch.allclose(features[:, 4], features[:, 5])  # grayscale repeated to 3 channels

    plain_path = tmp_path / "plain.pt"
    torch.jit.script(_FakeInceptionPlain()).save(str(plain_path))
    assert load_inception_features(str(plain_path))(torch.zeros(2, 3, 8, 8)).shape == (2, 3)


def test_inception_loader_rejects_a_file_that_is_not_torchscript(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not a model")
    with pytest.raises(CAFMInputError, match="TorchScript"):
        load_inception_features(str(path))
