"""Checkpoint format: exact round trips, completeness marker, checksums, no unpickling, checked loading."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch
from torch import nn

from cafm_core.checkpoint import (
    checkpoint_from_bytes,
    checkpoint_to_bytes,
    flatten_state_dicts,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
    unflatten_state_dicts,
)
from cafm_core.checks import CAFMInputError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "w": torch.randn(3, 5, generator=g),
        "transposed": base.t(),  # non-contiguous
        "view_of_base": base[1],  # shares storage with "transposed"
        "half": torch.randn(7, generator=g).to(torch.bfloat16),
        "count": torch.tensor(12, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
    }


CONFIG = {"dim": 32, "depth": 2, "patch": [2, 2], "name": "tiny", "lr": 1e-4, "nested": {"a": None}}
META = {"step": 100, "stage": "fm", "metrics": {"loss": 0.25}}


def _assert_same(tensors, loaded):
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_round_trip_directory(tmp_path):
    tensors = _tensors()
    out = save_checkpoint(tmp_path / "ckpt", tensors, CONFIG, META)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.json", "config.json", "model.safetensors"]
    loaded, config, meta = load_checkpoint(out)
    _assert_same(tensors, loaded)
    assert config == CONFIG and meta == META


def test_round_trip_bytes():
    tensors = _tensors()
    files = checkpoint_to_bytes(tensors, CONFIG, META)
    assert set(files) == {"model.safetensors", "config.json", "checkpoint.json"}
    loaded, config, meta = checkpoint_from_bytes(files)
    _assert_same(tensors, loaded)
    assert config == CONFIG and meta == META
    _, _, meta_default = checkpoint_from_bytes(checkpoint_to_bytes(tensors, CONFIG))
    assert meta_default == {}


def test_overwrite_keeps_complete_checkpoint(tmp_path):
    save_checkpoint(tmp_path, {"a": torch.zeros(2)}, {"v": 1})
    save_checkpoint(tmp_path, {"a": torch.ones(3)}, {"v": 2})
    tensors, config, _ = load_checkpoint(tmp_path)
    assert torch.equal(tensors["a"], torch.ones(3)) and config == {"v": 2}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_state_dict_flattening():
    sd1, sd2 = {"w": torch.ones(2), "b.c": torch.zeros(1)}, {"w": torch.full((2,), 3.0)}
    flat = flatten_state_dicts({"generator": sd1, "ema": sd2})
    assert set(flat) == {"generator/w", "generator/b.c", "ema/w"}
    back = unflatten_state_dicts(flat)
    assert set(back) == {"generator", "ema"} and back["generator"]["b.c"] is sd1["b.c"]
    with pytest.raises(CAFMInputError, match="prefix"):
        unflatten_state_dicts({"w": torch.ones(1)})
    with pytest.raises(CAFMInputError, match="name"):
        flatten_state_dicts({"a/b": sd1})


def test_marker_missing(tmp_path):
    save_checkpoint(tmp_path, _tensors(), CONFIG)
    (tmp_path / "checkpoint.json").unlink()
    with pytest.raises(CAFMInputError, match="incomplete checkpoint, marker missing"):
        load_checkpoint(tmp_path)
    files = checkpoint_to_bytes(_tensors(), CONFIG)
    del files["checkpoint.json"]
    with pytest.raises(CAFMInputError, match="marker missing"):
        checkpoint_from_bytes(files)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_weights_fail_checksum(tmp_path, damage):
    save_checkpoint(tmp_path, _tensors(), CONFIG)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CAFMInputError, match="checksum mismatch for model.safetensors"):
        load_checkpoint(tmp_path)


def test_corrupted_config_fails_checksum(tmp_path):
    save_checkpoint(tmp_path, _tensors(), CONFIG)
    (tmp_path / "config.json").write_text(json.dumps({"config": {"dim": 64}, "metadata": {}}))
    with pytest.raises(CAFMInputError, match="config.json"):
        load_checkpoint(tmp_path)


class _SideEffect:
    """Unpickling this object opens (creates) a file: proof of code execution."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_is_never_loaded(tmp_path):
    # The payload really executes when unpickled (control file) ...
    control = tmp_path / "control_side_effect"
    buf = io.BytesIO()
    torch.save({"w": _SideEffect(str(control))}, buf)
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False).get("w").close()
    assert control.exists()

    # ... but not through load_checkpoint, even with checksums that match it.
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, {"w": torch.ones(2)}, CONFIG)
    target = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"w": _SideEffect(str(target))}, buf)
    payload = buf.getvalue()
    (ckpt / "model.safetensors").write_bytes(payload)
    marker = json.loads((ckpt / "checkpoint.json").read_text())
    marker["files"]["model.safetensors"] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    (ckpt / "checkpoint.json").write_text(json.dumps(marker))
    with pytest.raises(CAFMInputError, match="not a valid safetensors file"):
        load_checkpoint(ckpt)
    assert not target.exists()


def test_nan_refused_and_nothing_written(tmp_path):
    tensors = _tensors()
    tensors["bad"] = torch.tensor([1.0, float("nan")])
    target = tmp_path / "ckpt"
    with pytest.raises(CAFMInputError, match="'bad'"):
        save_checkpoint(target, tensors, CONFIG)
    assert not target.exists()
    # an existing complete checkpoint is left untouched by a refused save
    save_checkpoint(target, {"a": torch.ones(1)}, CONFIG)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(CAFMInputError, match="inf|NaN"):
        save_checkpoint(target, {"a": torch.tensor([float("inf")])}, CONFIG)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_bad_config_refused(tmp_path):
    with pytest.raises(CAFMInputError, match="config"):
        save_checkpoint(tmp_path / "x", {"a": torch.ones(1)}, {"obj": object()})
    with pytest.raises(CAFMInputError, match="config"):
        save_checkpoint(tmp_path / "x", {"a": torch.ones(1)}, {1: "int key"})
    assert not (tmp_path / "x").exists()


# ---- load_state_dict_checked ------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, dim: int = 8, head: bool = False, final: bool = True):
        super().__init__()
        self.body = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        if final:
            self.final = nn.Linear(dim, dim)
        if head:
            self.token = nn.Parameter(torch.zeros(1, dim))
            self.head = nn.Linear(dim, 1)


def test_load_checked_ok_and_dtype_cast():
    src, dst = Net(), Net().to(torch.bfloat16)
    sd = src.state_dict()
    load_state_dict_checked(dst, sd)
    assert dst.body.weight.dtype == torch.bfloat16
    assert torch.equal(dst.body.weight, sd["body.weight"].to(torch.bfloat16))


def test_load_checked_shape_mismatch():
    dst = Net(dim=8)
    before = dst.body.weight.clone()
    with pytest.raises(CAFMInputError, match=r"shape mismatches.*body\.weight: expected \(8, 8\) got \(16, 16\)"):
        load_state_dict_checked(dst, Net(dim=16).state_dict())
    assert torch.equal(dst.body.weight, before)  # nothing loaded


def test_load_checked_missing_and_unexpected():
    gen_sd = Net().state_dict()
    disc = Net(head=True, final=False)
    with pytest.raises(CAFMInputError) as info:
        load_state_dict_checked(disc, gen_sd)
    msg = str(info.value)
    assert "missing keys (3)" in msg and "head.weight" in msg and "token" in msg
    assert "unexpected keys (2)" in msg and "final.weight" in msg
    # strict=False alone does not silence anything
    with pytest.raises(CAFMInputError, match="missing keys"):
        load_state_dict_checked(disc, gen_sd, strict=False, ignore_unexpected=["final."])
    with pytest.raises(CAFMInputError, match="unexpected keys"):
        load_state_dict_checked(disc, gen_sd, strict=False, allow_missing=["head.", "token"])
    with pytest.raises(CAFMInputError, match="strict=False"):
        load_state_dict_checked(disc, gen_sd, allow_missing=["head."])
    head_before = disc.head.weight.clone()
    load_state_dict_checked(
        disc, gen_sd, strict=False, allow_missing=["head.", "token"], ignore_unexpected=["final."]
    )
    assert torch.equal(disc.body.weight, gen_sd["body.weight"])
    assert torch.equal(disc.head.weight, head_before)


def test_load_checked_ddp_hint():
    sd = {f"module.{k}": v for k, v in Net().state_dict().items()}
    with pytest.raises(CAFMInputError, match="module\\."):
        load_state_dict_checked(Net(), sd)
