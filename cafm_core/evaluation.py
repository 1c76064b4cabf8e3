"""Evaluate generators against their data at fixed sampler settings, with the noise floor.

Image data: Fréchet distance and KID in a feature space (the in-domain classifier's
features unless another extractor is given), k-NN precision/recall, and for conditional
models the share of samples the classifier assigns to their conditioning class.
Low-dimensional data: sliced Wasserstein distance and on/off-manifold shares.

Every comparison is made at identical sampler settings and noise seeds, so FM and CAFM
see the same initial noise and labels.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cafm_core.checks import CAFMInputError, check_choice, check_positive
from cafm_core.data import SYNTHETIC_DATASETS, Dataset
from cafm_core.ema import EMA
from cafm_core.features import class_accuracy, extract_features
from cafm_core.metrics import (
    frechet_distance,
    frechet_distance_from_features,
    feature_statistics,
    kernel_inception_distance,
    mode_coverage,
    precision_recall,
    sliced_wasserstein,
)
from cafm_core.samplers import METHODS, generate

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
Statistics = tuple  # (mu [F], sigma [F, F]) of real features: FD's reference when the real features are a sample


@dataclass(frozen=True)
class SamplerSetting:
    """One sampler configuration: integrator, number of network evaluations, CFG scale."""

    method: str = "heun"
    nfe: int = 32
    cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        check_choice("sampler method", self.method, METHODS)
        check_positive("nfe", self.nfe, integer=True)
        if self.method == "heun" and self.nfe % 2:
            raise CAFMInputError(f"heun needs an even nfe (2 evaluations per step), got nfe={self.nfe}")
        if self.cfg_scale < 0:
            raise CAFMInputError(f"cfg_scale must be >= 0, got {self.cfg_scale}")

    @property
    def key(self) -> str:
        """``heun-nfe8-cfg1``: a name for folders, seeds and metric prefixes."""
        return f"{self.method}-nfe{self.nfe}-cfg{self.cfg_scale:g}"

    @property
    def label(self) -> str:
        cfg = "no CFG" if self.cfg_scale == 1.0 else f"CFG {self.cfg_scale:g}"
        return f"{self.method} NFE {self.nfe}, {cfg}"

    def to_dict(self) -> dict:
        return asdict(self)


def _image_metrics(real_features, fake_features, *, kid_subset: int, seed: int,
                   real_stats: Statistics | None = None) -> dict[str, float]:
    kid_mean, kid_std = kernel_inception_distance(
        real_features, fake_features, subset_size=kid_subset, num_subsets=50, seed=seed
    )
    precision, recall = precision_recall(real_features, fake_features, k=3)
    if real_stats is None:
        fd = frechet_distance_from_features(real_features, fake_features)
    else:  # the real side's statistics come from more rows than ``real_features`` (all of a large set)
        fd = frechet_distance(*real_stats, *feature_statistics(fake_features))
    return {
        "fd": fd,
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }


def image_metrics(real_features: torch.Tensor, fake_features: torch.Tensor, *, seed: int = 0,
                  real_stats: Statistics | None = None) -> dict[str, float]:
    """FD, KID (subsets of up to 1000) and precision/recall between two feature sets: the
    image metrics of :func:`evaluate_samples`, for callers that extract features in batches
    (memory then grows with the feature size, not the image size).

    ``real_stats`` (``(mu, sigma)`` of the real features, e.g. a prepared dataset's reference
    statistics over all its rows) replaces the real side of FD when ``real_features`` are only
    a sample of the real data; KID and precision/recall always use ``real_features``."""
    kid_subset = min(1000, real_features.shape[0], fake_features.shape[0])
    return _image_metrics(real_features, fake_features, kid_subset=kid_subset, seed=seed, real_stats=real_stats)


def evaluate_samples(
    samples: torch.Tensor,
    dataset: Dataset,
    *,
    features: FeatureFn | None = None,
    classifier: nn.Module | None = None,
    labels: torch.Tensor | None = None,
    real_features: torch.Tensor | None = None,
    seed: int = 0,
    real_stats: Statistics | None = None,
) -> dict[str, float]:
    """Metrics of ``samples`` against ``dataset`` (see module docstring); ``real_stats``: FD's
    real statistics when ``dataset`` is a sample of the real data (:func:`image_metrics`)."""
    if samples.shape[1:] != dataset.data.shape[1:]:
        raise CAFMInputError(
            f"samples have shape {tuple(samples.shape[1:])} per item, the dataset {tuple(dataset.data.shape[1:])}"
        )
    if dataset.kind == "points":
        result = {"sliced_wasserstein": sliced_wasserstein(dataset.data, samples, seed=seed)}
        if dataset.name in SYNTHETIC_DATASETS:
            coverage = mode_coverage(dataset.name, samples)
            result.update({k: float(v) for k, v in coverage.items() if isinstance(v, (int, float))})
        return result
    if features is None:
        raise CAFMInputError("image evaluation needs a feature extractor (e.g. the in-domain feature network)")
    if real_features is None:
        real_features = features(dataset.data)
    result = image_metrics(real_features, features(samples), seed=seed, real_stats=real_stats)
    if classifier is not None and labels is not None:
        result["class_accuracy"] = class_accuracy(classifier, samples, labels)
    return result


def sample_for_evaluation(
    model: nn.Module,
    dataset: Dataset,
    setting: SamplerSetting,
    *,
    num_samples: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples (and their conditioning labels) for comparison with ``dataset``.

    Labels follow the dataset's own labels (cycled), so the class mix matches the data.
    """
    count = num_samples or dataset.data.shape[0]
    null_class = getattr(model, "null_class", None)
    labels = None
    if null_class is not None:
        if dataset.labels is None:
            raise CAFMInputError("a class-conditional model needs a labelled dataset to draw labels from")
        labels = dataset.labels[torch.arange(count) % dataset.labels.shape[0]]
    samples = generate(
        model,
        num_samples=count,
        sample_shape=tuple(dataset.data.shape[1:]),
        labels=labels,
        nfe=setting.nfe,
        method=setting.method,
        cfg_scale=setting.cfg_scale if labels is not None else 1.0,
        null_class=null_class,
        seed=seed,
        batch_size=batch_size,
        device=device,
    )
    return samples, labels


FLOOR_SPLITS = 10
"""Random splits the pipeline's noise floor is averaged over (its spread is their std)."""
FLOOR_MAX_SAMPLES = 50_000
"""The most real samples an evaluation works from: the noise floor here (a random sample of
larger sets), the real reference of a prepared dataset (``tasks.dataset_format.load_for_evaluation``)
and the default sample count of an image evaluation (``cafm_core.protocol.DEFAULT_IMAGE_SAMPLES``),
so that sizes match."""


def noise_floor(
    dataset: Dataset,
    *,
    feature_net: nn.Module | None = None,
    real_features: torch.Tensor | None = None,
    seed: int = 0,
    splits: int = 1,
    max_samples: int | None = FLOOR_MAX_SAMPLES,
) -> dict[str, dict[str, float]]:
    """The same metrics between real data and real data, as a floor for reading differences.

    ``halves``: two disjoint random halves of the data against each other (the sample-size
    bias a generator evaluated on n/2 samples would also carry). ``bootstrap``: a resample
    with replacement against the full set (the same sizes as n generated samples against
    the data). Image data needs ``real_features`` (the dataset's features, when the caller
    already has them) or ``feature_net``.

    With ``splits`` > 1 each floor is the mean over that many random splits (seeds ``seed``,
    ``seed + 1``, ...) and ``<metric>_std`` is their standard deviation: the floor's
    spread, the size of a difference that sampling alone produces at this data size.

    A dataset larger than ``max_samples`` (None: no bound) is first reduced to a uniform
    random sample of that many (drawn with ``seed``); each floor then records ``samples``.
    Smaller sets are used whole, exactly as before.
    """
    check_positive("splits", splits, integer=True)
    if max_samples is not None:
        check_positive("max_samples", max_samples, integer=True)
    n = dataset.data.shape[0]
    sampled = max_samples is not None and n > max_samples
    if sampled:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values
        dataset = Dataset(dataset.data[keep], None if dataset.labels is None else dataset.labels[keep],
                          dataset.num_classes, dataset.kind, list(dataset.class_names), dataset.name)
        real_features = None if real_features is None else real_features[keep]
    if dataset.kind == "image" and real_features is None:
        if feature_net is None:
            raise CAFMInputError("the image noise floor needs the feature network")
        real_features = extract_features(feature_net, dataset.data)
    per_split = [_one_floor(dataset, real_features, seed + index) for index in range(splits)]
    if splits == 1:
        result = per_split[0]
    else:
        result = {}
        for name in per_split[0]:
            values = {key: [floor[name][key] for floor in per_split] for key in per_split[0][name]}
            result[name] = {key: statistics.fmean(v) for key, v in values.items()}
            result[name].update({f"{key}_std": statistics.stdev(v) for key, v in values.items()})
            result[name]["splits"] = splits
    if sampled:
        for floor in result.values():
            floor["samples"] = int(max_samples)
    return result


def _one_floor(dataset: Dataset, real_features: torch.Tensor | None, seed: int) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(seed)
    n = dataset.data.shape[0]
    order = torch.randperm(n, generator=generator)
    first, second = order[: n // 2], order[n // 2 : 2 * (n // 2)]
    resample = torch.randint(0, n, (n,), generator=generator)
    pairs = {"halves": (first, second), "bootstrap": (torch.arange(n), resample)}
    result = {}
    for name, (reference, other) in pairs.items():
        if dataset.kind == "points":
            sub = Dataset(dataset.data[reference], None, 0, "points", name=dataset.name)
            result[name] = evaluate_samples(dataset.data[other], sub, seed=seed)
        else:
            result[name] = _image_metrics(
                real_features[reference], real_features[other],
                kid_subset=min(1000, len(reference), len(other)), seed=seed,
            )
    return result


class TrainingCurve:
    """A diagnostic curve: the metric of a generator and of its EMA at points during training.

    Every call draws the same noise and labels (``seed``), so successive points differ only
    by the weights. The metric is the in-domain Fréchet distance for images (``fd``) and the
    sliced Wasserstein distance for points; ``num_samples`` is kept small (a few hundred) so
    that a point costs seconds. Its values carry the small-sample bias of that count: compare
    points of one curve with each other, not with the final evaluation's numbers. With
    ``real_stats`` (``dataset`` a sample of a larger set) FD's real side is those statistics.
    """

    def __init__(
        self,
        dataset: Dataset,
        setting: SamplerSetting,
        *,
        feature_net: nn.Module | None = None,
        num_samples: int = 512,
        seed: int = 0,
        device: str | torch.device = "cpu",
        real_stats: Statistics | None = None,
    ) -> None:
        if not isinstance(num_samples, int) or num_samples < 16:
            raise CAFMInputError(f"curve num_samples must be an int >= 16, got {num_samples!r}")
        if dataset.kind == "image" and feature_net is None:
            raise CAFMInputError("an image training curve needs the feature network")
        self.dataset, self.setting, self.num_samples, self.seed, self.device = dataset, setting, num_samples, seed, device
        self.metric = "fd" if dataset.kind == "image" else "sliced_wasserstein"
        self._features = (lambda x: extract_features(feature_net, x)) if feature_net is not None else None
        # the dataset's features, computed once (callers may reuse them, e.g. for the noise floor)
        self.real_features = self._features(dataset.data) if self._features is not None and dataset.kind == "image" else None
        self.real_stats = real_stats  # FD's real statistics when ``dataset`` is a sample of the real data
        self._ema_model: nn.Module | None = None

    def _value(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            samples, _ = sample_for_evaluation(
                model, self.dataset, self.setting, num_samples=self.num_samples, seed=self.seed, device=self.device
            )
        finally:
            model.train(was_training)
        metrics = evaluate_samples(samples, self.dataset, features=self._features, real_features=self.real_features,
                                   seed=self.seed, real_stats=self.real_stats)
        return float(metrics[self.metric])

    def __call__(self, model: nn.Module, ema: EMA | None = None) -> dict[str, float]:
        """``{"<metric>_model": ..., "<metric>_ema": ...}`` (the second only with ``ema``)."""
        point = {f"{self.metric}_model": self._value(model)}
        if ema is not None:
            if self._ema_model is None:
                self._ema_model = copy.deepcopy(model)
            ema.copy_to(self._ema_model)
            point[f"{self.metric}_ema"] = self._value(self._ema_model)
        return point


IMAGE_METRICS = ("fd", "kid", "precision", "recall", "class_accuracy", "fid_inception")
POINT_METRICS = ("sliced_wasserstein", "on_manifold_fraction", "off_manifold_fraction", "modes_hit")


def summarise_over_seeds(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Mean and spread over seeds for each (model, setting) of ``rows`` (each with a ``model``)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["method"], row["nfe"], row["cfg_scale"]), []).append(row)
    summary = []
    for (model, method, nfe, cfg), members in groups.items():
        entry = {"model": model, "method": method, "nfe": nfe, "cfg_scale": cfg, "seeds": len(members)}
        for key in keys:
            values = [m[key] for m in members if key in m]
            if values:
                entry[key] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def paired_differences(rows: list[dict], metric: str, *, base: str = "FM", other: str = "CAFM") -> list[dict]:
    """``other - base`` of ``metric`` per setting, paired by seed (same noise and labels, or
    the same training seed): the per-seed differences, their mean and standard deviation.
    Pairing removes the sampling noise both models share, which the spread of either
    model's own mean over seeds includes."""
    by_key: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["model"] in (base, other) and metric in row:
            by_key.setdefault((row["method"], row["nfe"], row["cfg_scale"], row["seed"]), {})[row["model"]] = row[metric]
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for (method, nfe, cfg, seed), values in by_key.items():
        if base in values and other in values:
            groups.setdefault((method, nfe, cfg), []).append((seed, values[other] - values[base]))
    result = []
    for (method, nfe, cfg), pairs in groups.items():
        diffs = [d for _, d in sorted(pairs)]
        result.append({"method": method, "nfe": nfe, "cfg_scale": cfg, "metric": metric, "diffs": diffs,
                       "mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0})
    return result


def labels_in_proportion(class_counts: list[int], count: int) -> list[int]:
    """``count`` conditioning labels in the data's class proportions (largest remainder),
    classes interleaved so that any prefix is mixed; from the manifest's counts alone."""
    total = sum(class_counts)
    quotas = [count * n // total for n in class_counts]
    by_remainder = sorted(range(len(class_counts)), key=lambda c: (-(count * class_counts[c] % total), c))
    for c in by_remainder[: count - sum(quotas)]:
        quotas[c] += 1
    order = sorted((j / q, c) for c, q in enumerate(quotas) for j in range(q))
    return [c for _, c in order]


def rank_models(summary: list[dict], metric: str) -> list[tuple[str, float]]:
    """Models (FM and trials) by their metric averaged over the guidance-free settings, best first."""
    by_model: dict[str, list[float]] = {}
    for row in summary:
        if row["cfg_scale"] == 1.0 and metric in row:
            by_model.setdefault(row["model"], []).append(row[metric])
    return sorted(((m, statistics.fmean(v)) for m, v in by_model.items()), key=lambda item: item[1])


def format_differences(differences: list[dict], *, base: str = "FM", other: str = "CAFM",
                       floor: dict | None = None) -> str:
    """One markdown line per setting: ``other - base`` per seed, mean ± std; with a ``floor``
    measured over several splits, also whether the mean is beyond the floor's spread
    (:func:`beyond_floor`)."""
    lines = []
    for d in differences:
        label = SamplerSetting(d["method"], d["nfe"], d["cfg_scale"]).label
        per_seed = ", ".join(f"{x:+.4g}" for x in d["diffs"])
        line = f"- {other} − {base}, {d['metric']}, {label}: {per_seed} (mean {d['mean']:+.4g} ± {d['std']:.2g})"
        verdict = beyond_floor(d, floor) if floor else None
        if verdict is not None:
            line += (f"; noise floor spread ±{verdict['spread']:.2g} ({verdict['floor']}, {verdict['splits']} splits): "
                     f"**{verdict['verdict']}**")
        lines.append(line)
    return "\n".join(lines)


def beyond_floor(difference: dict, floor: dict, reference: str = "bootstrap") -> dict | None:
    """Whether a paired difference (:func:`paired_differences`) exceeds the noise floor's
    spread: ``|mean|`` larger than the standard deviation of the real-vs-real ``reference``
    floor over its splits (``bootstrap`` by default: n samples against the n real ones, the
    sizes of a generated set against the data). None when the floor has no spread for the
    metric (one split, or a metric it lacks)."""
    metric = difference["metric"]
    spread = floor.get(reference, {}).get(f"{metric}_std")
    if spread is None:
        return None
    better = difference["mean"] > 0 if metric in HIGHER_IS_BETTER else difference["mean"] < 0
    if abs(difference["mean"]) <= spread:
        verdict = "within the floor's spread"
    else:
        verdict = "better beyond the floor's spread" if better else "worse beyond the floor's spread"
    return {"metric": metric, "spread": spread, "floor": reference, "splits": int(floor[reference]["splits"]),
            "beyond": abs(difference["mean"]) > spread, "better": better, "verdict": verdict}


def format_table(summary: list[dict], floor: dict, keys: tuple[str, ...]) -> str:
    """A markdown table: one row per (model, setting), mean ± std over seeds, then the noise floor."""
    keys = tuple(k for k in keys if any(k in r for r in summary))
    lines = ["| model | sampler | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|"]
    for row in summary:
        cells = []
        for key in keys:
            if key not in row:
                cells.append("")
            elif row["seeds"] > 1:
                cells.append(f"{row[key]:.4g} ± {row[f'{key}_std']:.2g}")
            else:
                cells.append(f"{row[key]:.4g}")
        label = SamplerSetting(row["method"], row["nfe"], row["cfg_scale"]).label
        lines.append(f"| {row['model']} | {label} | {row['seeds']} | " + " | ".join(cells) + " |")
    for name, metrics in floor.items():
        cells = [("" if k not in metrics else f"{metrics[k]:.4g} ± {metrics[f'{k}_std']:.2g}" if f"{k}_std" in metrics
                  else f"{metrics[k]:.4g}") for k in keys]
        splits = f" {int(metrics['splits'])} splits " if "splits" in metrics else " "
        lines.append(f"| real vs real ({name}) | noise floor |{splits}| " + " | ".join(cells) + " |")
    return "\n".join(lines)


HIGHER_IS_BETTER = frozenset({"precision", "recall", "class_accuracy", "on_manifold_fraction", "modes_hit"})
"""Metrics where a larger value is better; every other metric is a distance (smaller is better)."""


def relative_worsening(metric: str, reference: float, value: float) -> float:
    """How much worse ``value`` is than ``reference`` as a fraction of ``|reference|``
    (negative: better). A zero reference counts any worsening as infinite."""
    worse = (reference - value) if metric in HIGHER_IS_BETTER else (value - reference)
    if reference == 0:
        return 0.0 if worse == 0 else (float("inf") if worse > 0 else float("-inf"))
    return worse / abs(reference)


@dataclass(frozen=True)
class ChampionDecision:
    """The outcome of comparing a candidate generator with the champion on one evaluation set."""

    promote: bool
    regressions: tuple[dict, ...]  # {"metric", "champion", "candidate", "worsening"} past the threshold
    changes: tuple[dict, ...]  # the same for every watched metric

    def describe(self, threshold: float) -> str:
        lines = [f"{c['metric']}: champion {c['champion']:.4g}, candidate {c['candidate']:.4g} "
                 f"({c['worsening']:+.1%} worse)" for c in self.regressions]
        return f"candidate regresses past the threshold of {threshold:.1%}: " + "; ".join(lines)


def decide_promotion(
    champion: dict[str, float], candidate: dict[str, float], *, primary: str, watched: Sequence[str], max_regression: float
) -> ChampionDecision:
    """Promote the candidate when it is strictly better on ``primary`` and no ``watched``
    metric is worse than the champion's by more than ``max_regression`` (relative)."""
    if max_regression < 0:
        raise CAFMInputError(f"max_regression must be >= 0, got {max_regression}")
    missing = [m for m in (primary, *watched) if m not in champion or m not in candidate]
    if missing:
        raise CAFMInputError(f"metrics {sorted(set(missing))} are missing from the evaluation (have {sorted(candidate)})")
    changes = tuple({"metric": m, "champion": champion[m], "candidate": candidate[m],
                     "worsening": relative_worsening(m, champion[m], candidate[m])} for m in watched)
    regressions = tuple(c for c in changes if c["worsening"] > max_regression)
    better = relative_worsening(primary, champion[primary], candidate[primary]) < 0
    return ChampionDecision(promote=better and not regressions, regressions=regressions, changes=changes)
