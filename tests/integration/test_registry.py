"""The model registry on a real MLflow store (SQLite, local artifacts): one lineage per
registered model, evaluations tagged with their protocol and found again, the one promotion
rule, and generating from the registry without running any code logged with a model."""

from __future__ import annotations

import pytest
import torch

from cafm_core.checkpoint import load_checkpoint, model_to_tensors, save_checkpoint
from cafm_core.evaluation import SamplerSetting
from cafm_core.models import build_generator, dit_config
from flows.cli import main as cli
from tasks.dataset_format import dataset_identity, evaluation_protocol, read_manifest
from tasks.prepare import prepare_dataset
from tasks.promotion import PromotionRule, promote
from tasks.registry_evaluation import alias_versions, evaluate_version, load_registered_generator
from tasks.storage import Store
from tasks.tracking import PROTOCOL_TAG, Tracker

pytestmark = pytest.mark.integration

NAME = "cafm-generator"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    store = Store(str(root / "store"))
    prepare_dataset("digits", store, store.url("data"), feature_steps=20)
    dataset = dataset_identity(read_manifest(store, store.url("data")))
    tracker = Tracker(f"sqlite:///{root}/mlflow.db", "registry-test")
    torch.manual_seed(0)
    generator = build_generator(dit_config("tiny", image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1,
                                           num_heads=2, num_classes=10))
    save_checkpoint(root / "v1", *model_to_tensors(generator, metadata={"dataset": dataset}))
    with tracker.run("register"):
        version, refused = tracker.register_generator(str(root / "v1"), NAME, dataset=dataset)
    assert (version, refused) == ("1", None)
    protocol = evaluation_protocol(store, store.url("data"), settings=[SamplerSetting("euler", 2)], seeds=[0],
                                   num_samples=128, shard_size=64)
    return {"root": root, "store": store, "tracker": tracker, "dataset": dataset, "protocol": protocol}


def test_a_registered_model_holds_one_lineage(registry):
    tracker, root = registry["tracker"], registry["root"]
    with tracker.run("register-other-data"):
        version, refused = tracker.register_generator(str(root / "v1"), NAME, dataset="0" * 64)
    assert version is None and "another lineage" in refused and "registered_model" in refused
    assert sorted(str(v.version) for v in tracker.client.search_model_versions(f"name='{NAME}'")) == ["1"]
    assert tracker.client.get_registered_model(NAME).tags["cafm.dataset"] == registry["dataset"]
    with tracker.run("register-the-same-weights-again"):  # e.g. a sampler-only variant of a run
        assert tracker.register_generator(str(root / "v1"), NAME, dataset=registry["dataset"]) == ("1", None)
    assert sorted(str(v.version) for v in tracker.client.search_model_versions(f"name='{NAME}'")) == ["1"]


def test_loading_a_registered_generator_runs_no_code_logged_with_it(registry):
    tracker, root = registry["tracker"], registry["root"]
    logged = [p for p in (root / "mlartifacts").rglob("*.py")]
    assert logged, "the model's code file should be among the artifacts"
    marker = root / "code-ran"
    for path in logged:  # what a crafted registry entry could hold
        path.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    model, trained_on = load_registered_generator(tracker.client, NAME, "1")
    assert not marker.exists()
    assert trained_on == registry["dataset"] and tuple(model.config.sample_shape) == (1, 8, 8)


def test_evaluations_carry_their_protocol_and_are_found_again(registry):
    tracker, protocol = registry["tracker"], registry["protocol"]
    first = evaluate_version(tracker, protocol, NAME, "1")
    again = evaluate_version(tracker, protocol, NAME, "1")
    assert not first.reused and again.reused and again.run_id == first.run_id
    assert again.headline == pytest.approx(first.headline)
    assert tracker.client.get_run(first.run_id).data.tags[PROTOCOL_TAG] == protocol.id
    other = evaluation_protocol(registry["store"], registry["store"].url("data"), settings=[SamplerSetting("euler", 2)],
                                seeds=[1], num_samples=128, shard_size=64)
    assert not evaluate_version(tracker, other, NAME, "1").reused  # another protocol: another series


def test_one_promotion_rule_keeps_a_regressing_candidate_out(registry, tmp_path):
    tracker, protocol, root = registry["tracker"], registry["protocol"], registry["root"]
    outcome = promote(tracker, NAME, alias_versions(tracker, NAME), {}, PromotionRule())
    assert outcome.promoted and outcome.decision is None  # no champion yet: the first candidate takes the title
    tensors, config, metadata = load_checkpoint(root / "v1")
    noise = torch.Generator().manual_seed(1)
    save_checkpoint(tmp_path / "v2", {k: torch.randn(v.shape, generator=noise) * 3 for k, v in tensors.items()}, config,
                    metadata)
    with tracker.run("register-degraded"):
        version, _ = tracker.register_generator(str(tmp_path / "v2"), NAME, dataset=registry["dataset"])
    roles = alias_versions(tracker, NAME)
    assert roles == {"champion": "1", "candidate": version}
    headlines = {v: evaluate_version(tracker, protocol, NAME, v).headline for v in set(roles.values())}
    outcome = promote(tracker, NAME, roles, headlines, PromotionRule())
    assert not outcome.promoted and outcome.decision.regressions
    assert "Regression" in outcome.describe() and outcome.rule.primary == "fd"
    assert alias_versions(tracker, NAME)["champion"] == "1"


def test_generate_writes_images_from_the_champion(registry, tmp_path, capsys):
    uri = registry["tracker"].tracking_uri
    out = tmp_path / "images"
    assert cli(["generate", "--model", f"{NAME}@champion", "--num", "12", "--nfe", "4", "--cfg", "1.5", "--out",
                str(out), "--tracking-uri", uri]) == 0
    assert sorted(p.name for p in out.glob("sample-*.png")) == [f"sample-{i:04d}.png" for i in range(12)]
    assert (out / "grid.png").stat().st_size > 0 and (out / "generation.json").exists()
    assert cli(["generate", "--model", f"{NAME}@nobody", "--num", "2", "--out", str(out), "--tracking-uri", uri]) == 2
    assert "has the alias 'nobody'" in capsys.readouterr().err
    assert cli(["generate", "--model", NAME, "--num", "2", "--nfe", "3", "--out", str(out), "--tracking-uri", uri]) == 2
    assert "even nfe" in capsys.readouterr().err


def test_the_registered_generator_is_served_over_rest_on_loopback(registry, tmp_path):
    """``mlflow models serve`` answers an invocation with images (the model's signature
    declares the table, the params and the flattened image shape)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    tracker, root = registry["tracker"], registry["root"]
    with tracker.run("register-for-serving"):
        version, _ = tracker.register_generator(str(root / "v1"), "served-generator", dataset=registry["dataset"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = subprocess.Popen([mlflow_bin, "models", "serve", "-m", f"models:/served-generator/{version}",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              # the server starts uvicorn from PATH: this environment's
                              env={**os.environ, "MLFLOW_TRACKING_URI": tracker.tracking_uri,
                                   "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"},
                              cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with opener.open(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "the model server did not come up"
                time.sleep(1)
        body = {"dataframe_split": {"columns": ["label", "seed"], "data": [[3, 0], [7, 0], [1, 0]]},
                "params": {"nfe": 4, "method": "euler"}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with opener.open(request, timeout=60) as response:
            images = json.loads(response.read())["predictions"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert len(images) == 3 and all(len(image) == 64 for image in images)  # three flattened 1x8x8 images
    pixels = torch.tensor(images)
    assert torch.isfinite(pixels).all() and pixels.std() > 0
