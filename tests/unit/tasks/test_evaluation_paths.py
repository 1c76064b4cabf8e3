"""One evaluation protocol, one set of numbers: a generator scored through the pipeline's
path (sample shards on storage, then the scoring stage) and through the sweep's path (in one
process) gives the same rows; a generator of other data is refused, not scored."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cafm_core.checkpoint import model_to_tensors
from cafm_core.checks import CAFMInputError
from cafm_core.evaluation import SamplerSetting
from cafm_core.models import build_generator, dit_config
from cafm_core.protocol import EvaluationProtocol, sample_count_note
from tasks.dataset_format import dataset_identity, evaluation_protocol, load_for_evaluation, read_manifest
from tasks.prepare import prepare_dataset
from tasks.sample_scoring import score_samples
from tasks.sampling import ShardSpec, generate_shard, sample_set_key
from tasks.storage import Store
from tasks.sweep import evaluate_generator


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("store")))
    prepare_dataset("digits", store, store.url("data"), feature_steps=20)
    torch.manual_seed(0)
    generator = build_generator(dit_config("tiny", image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1,
                                           num_heads=2, num_classes=10))
    manifest = read_manifest(store, store.url("data"))
    tensors, config, metadata = model_to_tensors(generator, metadata={"dataset": dataset_identity(manifest)})
    store.write_checkpoint(store.url("generator"), tensors, config, metadata)
    return store, generator, manifest


def _protocol(store: Store, **overrides):
    values = {"settings": [SamplerSetting("euler", 2), SamplerSetting("heun", 4, 1.5)], "seeds": [0, 3],
              "num_samples": 150, "shard_size": 64, **overrides}
    return evaluation_protocol(store, store.url("data"), **values)


def _pipeline_rows(store: Store, protocol) -> list[dict]:
    """The pipeline's way: one shard per draw written by the sampling stage's shard function
    (what its Ray tasks run), then the evaluation stage's scoring of those shards."""
    layout = {}
    for setting in protocol.settings:
        for seed in protocol.seeds:
            key = sample_set_key("fm", setting, seed)
            layout[key] = []
            for number, draw in enumerate(protocol.draws(setting, seed)):
                spec = ShardSpec(store.url("generator"), store.url("samples", key, f"part-{number:05d}.safetensors"),
                                 protocol.to_dict(), setting, draw)
                layout[key].append(generate_shard(store.root, spec, "cpu"))
    result = score_samples(store, protocol=protocol, sample_layout=layout, out_url=store.url("eval"))
    assert sample_count_note(protocol, 1797) in result["report"]  # the report states the count and its origin
    assert "set explicitly" in result["report"] and f"{protocol.num_samples:,} samples" in result["report"]
    return result["rows"]


def test_the_pipelines_and_the_sweeps_evaluation_give_the_same_numbers(prepared, one_torch_thread):
    store, generator, manifest = prepared
    protocol = _protocol(store)
    reference = load_for_evaluation(store, store.url("data"))
    dataset, feature_net = reference.dataset, reference.feature_net
    sweep = evaluate_generator(protocol, generator, dataset, feature_net, trained_on=dataset_identity(manifest))
    pipeline = _pipeline_rows(store, protocol)
    assert len(sweep) == len(pipeline) == 4  # 2 settings x 2 seeds
    for ours, theirs in zip(sweep, pipeline):
        assert {k: ours[k] for k in ("method", "nfe", "cfg_scale", "seed")} == \
            {k: theirs[k] for k in ("method", "nfe", "cfg_scale", "seed")}
        assert set(ours) - {"model"} == set(theirs) - {"model"}
        for key in ("fd", "kid", "precision", "recall", "class_accuracy"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
    # the numbers depend on the seed (the comparison above could fail)
    assert sweep[0]["fd"] != sweep[1]["fd"]
    assert store.read_json(store.url("eval", "metrics.json"))["protocol_id"] == protocol.id


def test_every_number_belongs_to_its_protocol(prepared):
    store, _, _ = prepared
    protocol = _protocol(store)
    assert protocol.id == _protocol(store).id  # stable
    assert protocol.id != _protocol(store, seeds=[0, 4]).id
    assert protocol.id != _protocol(store, num_samples=151).id
    assert protocol.id != _protocol(store, settings=[SamplerSetting("euler", 2)]).id
    assert replace(protocol, data_url="s3://elsewhere/copy").id == protocol.id  # where the set lives is not its identity
    assert replace(protocol, dataset="0" * 64).id != protocol.id
    assert replace(protocol, feature_net="1" * 64).id != protocol.id
    assert EvaluationProtocol.from_dict(protocol.to_dict()) == protocol


def test_a_generator_of_other_data_is_refused_not_scored(prepared):
    store, _, manifest = prepared
    protocol = _protocol(store)
    reference = load_for_evaluation(store, store.url("data"))
    dataset, feature_net = reference.dataset, reference.feature_net
    other = build_generator(dit_config("tiny", image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1,
                                       num_heads=2, num_classes=10))
    with pytest.raises(CAFMInputError, match="trained on dataset .* another lineage"):
        evaluate_generator(protocol, other, dataset, feature_net, trained_on="0" * 64)
    fewer_classes = build_generator(dit_config("tiny", image_size=8, in_channels=1, patch_size=2, hidden_size=32,
                                               depth=1, num_heads=2, num_classes=4))
    with pytest.raises(CAFMInputError, match="has 4 classes; the protocol's held set digits has 10"):
        evaluate_generator(protocol, fewer_classes, dataset, feature_net, trained_on=None)
    rgb = build_generator(dit_config("tiny", image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=1,
                                     num_heads=2, num_classes=10))
    with pytest.raises(CAFMInputError, match=r"shape \(3, 8, 8\).*\(1, 8, 8\)"):
        evaluate_generator(protocol, rgb, dataset, feature_net, trained_on=None)


def test_a_guided_evaluation_row_exists_beside_the_unguided_one_and_differs(prepared):
    from cafm_core.evaluation import format_table, summarise_over_seeds

    store, generator, manifest = prepared
    protocol = _protocol(store, settings=[SamplerSetting("euler", 2), SamplerSetting("euler", 2, 1.5)], seeds=[0])
    reference = load_for_evaluation(store, store.url("data"))
    dataset, feature_net = reference.dataset, reference.feature_net
    rows = evaluate_generator(protocol, generator, dataset, feature_net, trained_on=dataset_identity(manifest))
    unguided, guided = rows
    assert (unguided["cfg_scale"], guided["cfg_scale"]) == (1.0, 1.5)
    assert guided["fd"] != unguided["fd"] and guided["class_accuracy"] != unguided["class_accuracy"]
    table = format_table(summarise_over_seeds([{**r, "model": "FM"} for r in rows], ("fd",)), {}, ("fd",))
    assert "euler NFE 2, no CFG" in table and "euler NFE 2, CFG 1.5" in table
