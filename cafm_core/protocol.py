"""Evaluation protocols: what makes two evaluation numbers comparable.

A number such as "FD 0.65" means something only inside one protocol: the same held
evaluation set, the same frozen feature network and reference statistics, the same sampler
settings, sample count, seeds, labels and noise. :class:`EvaluationProtocol` is that as
data, with an ``id`` (a hash of everything that changes a number); metrics carry the id,
and numbers with different ids are never compared.

A protocol also fixes *how* samples are drawn, so that every evaluation path gives the same
numbers for the same generator: samples come in draws of ``shard_size`` (the pipeline's
sample shards, one Ray task each), each with its own noise seed (:meth:`EvaluationProtocol.draws`),
and conditional models get labels in the data's class proportions. :func:`draw_samples`
makes one draw; :class:`SampleScorer` scores one sample set draw by draw (bounded memory);
:func:`evaluate_under` does both in one process (the sweep, the registry evaluation, the
demo), and the pipeline does the same through sample shards on storage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from cafm_core.checks import CAFMInputError
from cafm_core.data import Dataset
from cafm_core.evaluation import (
    FLOOR_MAX_SAMPLES,
    SamplerSetting,
    Statistics,
    evaluate_samples,
    image_metrics,
    labels_in_proportion,
)
from cafm_core.features import class_accuracy_from_features, extract_features
from cafm_core.metrics import frechet_distance_from_features
from cafm_core.models import config_from_dict
from cafm_core.samplers import generate

__all__ = [
    "Draw",
    "EvaluationProtocol",
    "SampleScorer",
    "dataset_identity",
    "default_image_samples",
    "draw_samples",
    "evaluate_under",
    "protocol_for_dataset",
    "sample_count_note",
]

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_IMAGE_SAMPLES = FLOOR_MAX_SAMPLES
"""Most samples per setting an image protocol draws unless told otherwise (50,000): the usual
count for FID-style metrics (a dataset of a million images does not need a million samples);
the same bound as the real reference and the noise floor."""
PICTURED_IMAGES = 50  # samples kept per image sample set for its picture
PICTURED_POINTS = 5000  # points kept per low-dimensional sample set for its scatter plot


@dataclass(frozen=True)
class Draw:
    """One batch of a sample set: samples ``start .. start + count`` with their own noise seed."""

    start: int
    count: int
    noise_seed: int


def _noise_seed(seed: int, setting: SamplerSetting, start: int) -> int:
    """A stable 31-bit seed per (evaluation seed, sampler setting, draw start); the same for
    every model, so all models of a comparison start from the same noise."""
    digest = hashlib.sha256(f"{seed}:{setting.key}:{start}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class EvaluationProtocol:
    """The held evaluation set's identity, its frozen evaluation networks and how samples are drawn.

    ``dataset`` is the held set's content identity (for a prepared dataset: a hash of its
    shards' checksums); ``feature_net`` and ``reference_stats`` the hashes of the frozen
    feature network and the real data's statistics (None for low-dimensional sets).
    ``data_url`` says where the held set lives and is not part of the ``id``: a copy of the
    same set elsewhere is the same protocol.

    ``reference_rows``: None when the metrics compare with every row of the held set; N when
    the held set is larger than the evaluation's bound and they compare with a uniform random
    sample of N of its rows (``tasks.dataset_format.load_for_evaluation``), FD against the
    reference statistics of all rows. Left out of :meth:`to_dict` when None, so protocols of
    sets within the bound keep their ids.
    """

    dataset: str
    dataset_name: str
    kind: str  # "image" or "points"
    sample_shape: tuple[int, ...]
    num_classes: int
    class_counts: tuple[int, ...] | None
    feature_net: str | None
    reference_stats: str | None
    settings: tuple[SamplerSetting, ...]
    num_samples: int
    seeds: tuple[int, ...]
    shard_size: int = 1024
    data_url: str | None = field(default=None, compare=False)
    reference_rows: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("image", "points"):
            raise CAFMInputError(f"protocol kind must be 'image' or 'points', got {self.kind!r}")
        if not self.settings:
            raise CAFMInputError("an evaluation protocol needs at least one sampler setting")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CAFMInputError(f"an evaluation protocol needs distinct seeds, got {list(self.seeds)}")
        for name in ("num_samples", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CAFMInputError(f"protocol {name} must be a positive int, got {value!r}")
        rows = self.reference_rows
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 2):
            raise CAFMInputError(f"protocol reference_rows must be None or an int >= 2, got {rows!r}")
        if self.num_classes > 0 and self.class_counts is not None and len(self.class_counts) != self.num_classes:
            raise CAFMInputError(f"class_counts has {len(self.class_counts)} entries for {self.num_classes} classes")

    # ---- identity -----------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = asdict(self)
        data["settings"] = [s.to_dict() for s in self.settings]
        data["sample_shape"], data["seeds"] = list(self.sample_shape), list(self.seeds)
        data["class_counts"] = list(self.class_counts) if self.class_counts is not None else None
        if self.reference_rows is None:  # every row: the dict (and the id) of protocols before the bound
            del data["reference_rows"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> EvaluationProtocol:
        values = dict(data)
        values.pop("id", None)
        values["settings"] = tuple(SamplerSetting(**s) for s in values["settings"])
        values["sample_shape"], values["seeds"] = tuple(values["sample_shape"]), tuple(values["seeds"])
        if values.get("class_counts") is not None:
            values["class_counts"] = tuple(values["class_counts"])
        return cls(**values)

    @property
    def id(self) -> str:
        """A hash of everything that changes a number (all fields but ``data_url``)."""
        data = self.to_dict()
        data.pop("data_url")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        settings = ", ".join(s.label for s in self.settings)
        reference = "" if self.reference_rows is None else f", real reference: a sample of {self.reference_rows:,} rows"
        return (f"protocol {self.id}: held set {self.dataset_name} ({self.dataset[:12]}), {self.num_samples} samples "
                f"per setting, seeds {list(self.seeds)}, {settings}{reference}")

    # ---- how samples are drawn ----------------------------------------------------------

    def draws(self, setting: SamplerSetting, seed: int) -> list[Draw]:
        """The draws of one sample set (setting, seed): consecutive ranges of ``shard_size``."""
        return [Draw(start, min(self.shard_size, self.num_samples - start), _noise_seed(seed, setting, start))
                for start in range(0, self.num_samples, self.shard_size)]

    def labels(self) -> torch.Tensor | None:
        """The conditioning labels of every sample set (the data's class proportions), or None."""
        if self.num_classes == 0 or self.class_counts is None:
            return None
        return torch.tensor(labels_in_proportion(list(self.class_counts), self.num_samples), dtype=torch.long)

    def check_generator(self, config, *, trained_on: str | None = None, what: str = "the generator") -> None:
        """Refuse a generator this protocol cannot judge: another sample shape or class count,
        or (when its training data is recorded) another held set: a different lineage.
        ``config`` is the generator's config (``cafm_core.models``) or its dict."""
        if isinstance(config, Mapping):
            config = config_from_dict(dict(config))
        shape = tuple(config.sample_shape)
        if shape != tuple(self.sample_shape):
            raise CAFMInputError(f"{what} makes samples of shape {shape}; the protocol's held set "
                                 f"{self.dataset_name} has {tuple(self.sample_shape)}: not comparable")
        classes = int(config.num_classes)
        if classes != self.num_classes:
            raise CAFMInputError(f"{what} has {classes} classes; the protocol's held set {self.dataset_name} has "
                                 f"{self.num_classes}: not comparable")
        if trained_on is not None and trained_on != self.dataset:
            raise CAFMInputError(f"{what} was trained on dataset {trained_on[:12]}, not on the protocol's held set "
                                 f"{self.dataset_name} ({self.dataset[:12]}): models of other data are another "
                                 "lineage and are not scored under this protocol")


def default_image_samples(dataset_size: int) -> int:
    """The default sample count per setting for images: ``min(dataset size, 50,000)``."""
    return min(int(dataset_size), DEFAULT_IMAGE_SAMPLES)


def sample_count_note(protocol: EvaluationProtocol, dataset_size: int) -> str:
    """One sentence for a report: the sample count per setting and where it comes from."""
    count = f"{protocol.num_samples:,} samples per setting"
    if protocol.kind != "image":
        return f"{count}."
    default = default_image_samples(dataset_size)
    if protocol.num_samples == default:
        return (f"{count}: the default, min(dataset size {dataset_size:,}, {DEFAULT_IMAGE_SAMPLES:,}), "
                "the usual count for FID-style metrics.")
    return f"{count}, set explicitly (the default would be min(dataset size {dataset_size:,}, " \
           f"{DEFAULT_IMAGE_SAMPLES:,}) = {default:,})."


def dataset_identity(dataset: Dataset) -> str:
    """A content hash of an in-memory dataset (data, labels, kind): the identity a protocol
    records when there is no prepared dataset on storage (the demo)."""
    digest = hashlib.sha256()
    digest.update(f"{dataset.kind}:{tuple(dataset.data.shape)}:{dataset.num_classes}".encode())
    digest.update(dataset.data.detach().cpu().contiguous().float().numpy().tobytes())
    if dataset.labels is not None:
        digest.update(dataset.labels.detach().cpu().contiguous().long().numpy().tobytes())
    return digest.hexdigest()


def draw_samples(model: nn.Module, protocol: EvaluationProtocol, setting: SamplerSetting, draw: Draw, *,
                 labels: torch.Tensor | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One draw's samples (and labels) of ``model``: the same for every evaluation path.
    ``labels`` are the protocol's (``protocol.labels()``, computed once by the caller)."""
    null_class = getattr(model, "null_class", None)
    if null_class is not None and labels is None:
        labels = protocol.labels()
        if labels is None:
            raise CAFMInputError("a class-conditional model needs a protocol with class counts to draw labels from")
    draw_labels = labels[draw.start : draw.start + draw.count] if null_class is not None else None
    samples = generate(
        model,
        num_samples=draw.count,
        sample_shape=tuple(protocol.sample_shape),
        labels=draw_labels,
        nfe=setting.nfe,
        method=setting.method,
        cfg_scale=setting.cfg_scale if draw_labels is not None else 1.0,
        null_class=null_class,
        seed=draw.noise_seed,
        batch_size=batch_size,
        device=device,
    )
    return samples, draw_labels


class SampleScorer:
    """The metrics of one sample set, fed draw by draw.

    Images: only features are kept (and the first ``PICTURED_IMAGES`` for the picture), so
    memory grows with the feature size, not the image size; FD, KID, precision/recall
    against ``real_features``, the classifier's accuracy on the conditioning labels, and
    FID in Inception space when ``inception`` is given. Points: the samples are kept (a few
    floats each) and scored at the end. ``real_stats`` (``(mu, sigma)``): FD's real side when
    ``dataset`` and ``real_features`` are a sample of a larger real set (its statistics over
    all rows); KID, precision/recall and Inception FID use the sample.
    """

    def __init__(self, dataset: Dataset, *, feature_net: nn.Module | None = None,
                 real_features: torch.Tensor | None = None, inception: FeatureFn | None = None,
                 real_inception: torch.Tensor | None = None, real_stats: Statistics | None = None) -> None:
        self.dataset, self.image = dataset, dataset.kind == "image"
        if self.image and (feature_net is None or real_features is None):
            raise CAFMInputError(f"{dataset.name} has no feature network: image samples cannot be evaluated")
        self.feature_net, self.real_features, self.real_stats = feature_net, real_features, real_stats
        self.inception, self.real_inception = inception, real_inception
        self.features: list[torch.Tensor] = []
        self.inception_features: list[torch.Tensor] = []
        self.points: list[torch.Tensor] = []
        self.pictured: list[torch.Tensor] = []
        self.correct, self.labelled = 0.0, 0

    def add(self, samples: torch.Tensor, labels: torch.Tensor | None = None, *, where: str = "samples") -> None:
        if samples.shape[1:] != self.dataset.data.shape[1:]:
            raise CAFMInputError(f"{where} have shape {tuple(samples.shape[1:])} per item, the dataset "
                                 f"{tuple(self.dataset.data.shape[1:])}")
        room = (PICTURED_IMAGES if self.image else PICTURED_POINTS) - sum(len(p) for p in self.pictured)
        if room > 0:
            self.pictured.append(samples[:room].clone())
        if not self.image:
            self.points.append(samples)
            return
        features = extract_features(self.feature_net, samples)
        self.features.append(features)
        if self.inception is not None:
            self.inception_features.append(self.inception(samples))
        if labels is not None:
            self.correct += class_accuracy_from_features(self.feature_net, features, labels) * len(samples)
            self.labelled += len(samples)

    def metrics(self, seed: int) -> dict[str, float]:
        if not self.image:
            return evaluate_samples(torch.cat(self.points), self.dataset, seed=seed)
        result = image_metrics(self.real_features, torch.cat(self.features), seed=seed, real_stats=self.real_stats)
        if self.labelled:
            result["class_accuracy"] = self.correct / self.labelled
        if self.inception is not None:
            result["fid_inception"] = frechet_distance_from_features(self.real_inception, torch.cat(self.inception_features))
        return result

    def first_samples(self) -> torch.Tensor:
        return torch.cat(self.pictured)


def evaluate_under(
    protocol: EvaluationProtocol,
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    *,
    feature_net: nn.Module | None = None,
    trained_on: Mapping[str, str | None] | None = None,
    device: str | torch.device = "cpu",
    inception: FeatureFn | None = None,
    settings: Iterable[SamplerSetting] | None = None,
    real_stats: Statistics | None = None,
) -> list[dict]:
    """Every model of ``models`` (name -> generator) under ``protocol``, in this process: one
    row per (model, setting, seed) with the metrics, the same numbers the pipeline's sample
    shards give. ``trained_on`` (name -> dataset identity) lets the protocol refuse a model
    of another lineage; ``settings`` evaluates a subset of the protocol's settings;
    ``real_stats``: FD's real statistics when ``dataset`` is a sample (:class:`SampleScorer`)."""
    if tuple(dataset.data.shape[1:]) != tuple(protocol.sample_shape):
        raise CAFMInputError(f"the dataset's samples have shape {tuple(dataset.data.shape[1:])}, the protocol's "
                             f"{tuple(protocol.sample_shape)}")
    for name, model in models.items():
        protocol.check_generator(model.config, trained_on=(trained_on or {}).get(name), what=f"model {name}")
    image = dataset.kind == "image"
    real_features = extract_features(feature_net, dataset.data) if image and feature_net is not None else None
    real_inception = inception(dataset.data) if image and inception is not None else None
    labels = protocol.labels()
    rows = []
    for name, model in models.items():
        for setting in (list(settings) if settings is not None else protocol.settings):
            for seed in protocol.seeds:
                scorer = SampleScorer(dataset, feature_net=feature_net, real_features=real_features,
                                      inception=inception if image else None, real_inception=real_inception,
                                      real_stats=real_stats if image else None)
                for draw in protocol.draws(setting, seed):
                    samples, draw_labels = draw_samples(model, protocol, setting, draw, labels=labels, device=device)
                    scorer.add(samples, draw_labels)
                rows.append({"model": name, **setting.to_dict(), "seed": seed, **scorer.metrics(seed)})
    return rows


def protocol_for_dataset(dataset: Dataset, settings: Sequence[SamplerSetting], seeds: Sequence[int], *,
                         num_samples: int | None = None, feature_net: nn.Module | None = None,
                         shard_size: int = 1024) -> EvaluationProtocol:
    """A protocol for an in-memory dataset and feature network (the demo): identities are
    content hashes of the tensors."""
    def module_hash(module: nn.Module | None) -> str | None:
        if module is None:
            return None
        digest = hashlib.sha256()
        for key, value in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().float().numpy().tobytes())
        return digest.hexdigest()

    classes = dataset.num_classes if dataset.kind == "image" else 0  # point models are unconditional
    counts = None
    if dataset.labels is not None and classes > 0:
        counts = tuple(torch.bincount(dataset.labels, minlength=classes).tolist())
    return EvaluationProtocol(
        dataset=dataset_identity(dataset), dataset_name=dataset.name, kind=dataset.kind,
        sample_shape=tuple(dataset.data.shape[1:]),
        num_classes=classes, class_counts=counts, feature_net=module_hash(feature_net),
        reference_stats=None, settings=tuple(settings),
        num_samples=num_samples or (default_image_samples(dataset.data.shape[0]) if dataset.kind == "image"
                                    else dataset.data.shape[0]),
        seeds=tuple(seeds), shard_size=shard_size,
    )

