"""Images from a registered generator: ``cafm-pipeline generate --model NAME@ALIAS ...``.

The weights come from the safetensors checkpoint logged with the registered version
(``tasks.registry_evaluation.load_registered_generator``); no code logged with a model is
executed. Writes one PNG per sample (``sample-0000.png`` ...), ``grid.png`` and
``generation.json`` (what was drawn, from which version, with which settings).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from mlflow import MlflowClient

from cafm_core.checks import CAFMInputError
from cafm_core.evaluation import SamplerSetting
from cafm_core.plots import image_grid
from cafm_core.samplers import generate
from tasks.registry_evaluation import load_registered_generator, resolve_version

__all__ = ["generate_from_registry"]


def generate_from_registry(tracking_uri: str, reference: str, out_dir: str, *, num: int, nfe: int, cfg: float = 1.0,
                           method: str = "heun", seed: int = 0, label: int | None = None) -> dict:
    """Draw ``num`` images from the registered generator ``reference`` (``name@alias``,
    ``name/version`` or ``name`` for its champion) and write them under ``out_dir``.
    Class-conditional generators cycle through the classes unless ``label`` is given."""
    setting = SamplerSetting(method, nfe, cfg)  # a clear error for a bad sampler before anything loads
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise CAFMInputError(f"--num must be a positive int, got {num!r}")
    client = MlflowClient(tracking_uri)
    name, version = resolve_version(client, reference)
    model, trained_on = load_registered_generator(client, name, version)
    shape = tuple(model.config.sample_shape)
    if len(shape) != 3:
        raise CAFMInputError(f"{name} version {version} makes samples of shape {shape}, not images")
    null_class = getattr(model, "null_class", None)
    labels = None
    if null_class is not None:
        classes = model.config.num_classes
        if label is not None and not 0 <= label < classes:
            raise CAFMInputError(f"--label must be in [0, {classes}), got {label}")
        labels = torch.full((num,), label) if label is not None else torch.arange(num) % classes
    elif label is not None:
        raise CAFMInputError(f"{name} version {version} is unconditional: --label does not apply")
    if cfg != 1.0 and null_class is None:
        raise CAFMInputError(f"{name} version {version} is unconditional: guidance (--cfg) needs class labels")
    samples = generate(model, num_samples=num, sample_shape=shape, labels=labels, nfe=setting.nfe,
                       method=setting.method, cfg_scale=setting.cfg_scale, null_class=null_class, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(num):
        image_grid(samples[index : index + 1], columns=1, scale=1, padding=0).save(out / f"sample-{index:04d}.png")
    image_grid(samples, columns=min(num, 10), scale=4).save(out / "grid.png")
    record = {"model": name, "version": version, "trained_on": trained_on, "num": num, "seed": seed,
              "labels": None if labels is None else labels.tolist(), **setting.to_dict(),
              "files": [f"sample-{i:04d}.png" for i in range(num)] + ["grid.png"]}
    (out / "generation.json").write_text(json.dumps(record, indent=2))
    return record
