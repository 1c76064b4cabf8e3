"""Sample-quality metrics: Fréchet distance, KID, k-NN precision/recall, sliced Wasserstein,
and mode coverage for the synthetic sets.

Features are ``[N, F]`` tensors or arrays (any feature network's output); low-dim points are
``[N, D]``. Everything is computed here in numpy/torch (no scipy) so results do not depend on
a scipy version.
"""

from __future__ import annotations

import numpy as np
import torch

from cafm_core.checks import CAFMInputError, check_positive
from cafm_core.data import MIXTURE_DATASETS, SYNTHETIC_DATASETS, mode_centres, nearest_mode, on_manifold

ArrayLike = torch.Tensor | np.ndarray


def _as_features(name: str, value: object, *, min_samples: int = 1) -> np.ndarray:
    """Return ``value`` as a finite float64 ``[N, F]`` array with at least ``min_samples`` rows."""
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().double().numpy()
    elif isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise CAFMInputError(f"{name} must be a numeric array, got dtype {value.dtype}")
        array = value.astype(np.float64, copy=False)
    else:
        raise CAFMInputError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    if array.ndim != 2:
        raise CAFMInputError(f"{name} must be 2-D [num_samples, feature_dim], got shape {array.shape}")
    if array.shape[1] == 0:
        raise CAFMInputError(f"{name} has feature_dim 0, got shape {array.shape}")
    if array.shape[0] < min_samples:
        raise CAFMInputError(f"{name} needs at least {min_samples} samples, got {array.shape[0]}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise CAFMInputError(f"{name} contains {bad} NaN/inf values; expected finite features")
    return array


def _check_same_dim(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("real", "fake")) -> None:
    if a.shape[1] != b.shape[1]:
        raise CAFMInputError(
            f"{names[0]} and {names[1]} must have the same feature dim, got {a.shape[1]} and {b.shape[1]}"
        )


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and (unbiased) covariance ``[F, F]`` of ``[N, F]`` features, in float64."""
    array = _as_features("features", features, min_samples=2)
    mu = array.mean(axis=0)
    sigma = np.atleast_2d(np.cov(array, rowvar=False))
    return mu, sigma


class FeatureMoments:
    """Mean and covariance of features seen in batches, never holding them all: a running
    count, sum of ``x`` and sum of ``x x^T`` in float64. :meth:`statistics` gives what
    :func:`feature_statistics` gives for all the rows at once (unbiased covariance); moments
    of disjoint parts :meth:`merge` (e.g. one per shard, computed on different workers)."""

    def __init__(self, dim: int) -> None:
        check_positive("dim", dim, integer=True)
        self.count = 0
        self.total = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    def add(self, features: ArrayLike) -> FeatureMoments:
        array = _as_features("features", features)
        if array.shape[1] != self.total.shape[0]:
            raise CAFMInputError(f"features have dim {array.shape[1]}, these moments {self.total.shape[0]}")
        self.count += array.shape[0]
        self.total += array.sum(axis=0)
        self.outer += array.T @ array
        return self

    def merge(self, other: FeatureMoments) -> FeatureMoments:
        if other.total.shape != self.total.shape:
            raise CAFMInputError(f"cannot merge moments of dim {other.total.shape[0]} into dim {self.total.shape[0]}")
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        return self

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean ``[F]`` and unbiased covariance ``[F, F]`` (float64) of every row added."""
        if self.count < 2:
            raise CAFMInputError(f"feature statistics need at least 2 samples, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via eigendecomposition (tiny negative eigenvalues -> 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    root = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return (eigenvectors * root) @ eigenvectors.T


def _check_statistics(name: str, mu: object, sigma: object) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu.detach().cpu() if isinstance(mu, torch.Tensor) else mu, dtype=np.float64)
    sigma = np.asarray(sigma.detach().cpu() if isinstance(sigma, torch.Tensor) else sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise CAFMInputError(f"mu{name} must be 1-D [F], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise CAFMInputError(
            f"sigma{name} must have shape ({mu.shape[0]}, {mu.shape[0]}) to match mu{name}, got {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise CAFMInputError(f"mu{name}/sigma{name} contain NaN/inf values; expected finite statistics")
    return mu, sigma


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, where the last trace is the
    sum of square roots of the eigenvalues of the symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)``
    (same spectrum as ``S1 S2``), computed in float64 without scipy.
    """
    mu1, sigma1 = _check_statistics("1", mu1, sigma1)
    mu2, sigma2 = _check_statistics("2", mu2, sigma2)
    if mu1.shape != mu2.shape:
        raise CAFMInputError(f"mu1 and mu2 must have the same feature dim, got {mu1.shape} and {mu2.shape}")
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    sqrt_sigma1 = _symmetric_sqrt(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    product = (product + product.T) / 2
    trace_sqrt_product = np.sqrt(np.clip(np.linalg.eigvalsh(product), 0.0, None)).sum()
    difference = mu1 - mu2
    distance = difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product
    return float(max(distance, 0.0))


def frechet_distance_from_features(real: ArrayLike, fake: ArrayLike) -> float:
    """Fréchet distance between Gaussian fits of two ``[N, F]`` feature sets."""
    real_array = _as_features("real features", real, min_samples=2)
    fake_array = _as_features("fake features", fake, min_samples=2)
    _check_same_dim(real_array, fake_array)
    return frechet_distance(*feature_statistics(real_array), *feature_statistics(fake_array))


# ---------------------------------------------------------------------------------------------
# Kernel Inception Distance


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's cubic kernel ``(x . y / d + 1)^3`` (cubed by multiplication, in place: numpy's
    float power is 4x slower than the matrix product here)."""
    gram = x @ y.T
    gram /= x.shape[1]
    gram += 1.0
    return gram * gram * gram


def kernel_inception_distance(
    real: ArrayLike,
    fake: ArrayLike,
    *,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets.

    Each subset draws ``m = min(subset_size, N_real, N_fake)`` samples without replacement
    from each set. Near 0 (possibly slightly negative) when both come from one distribution.

    Two exact ways to get every subset's kernel sums, the cheaper for the sizes is taken
    (:func:`kid_subset_sums`): per subset (three ``m x m`` kernels each), or, when the sets
    are small against ``num_subsets x m^2``, each kernel over the whole sets once, tile by
    tile, summed for all subsets at once through their indicator vectors (digits: 1,797 rows
    against 100 subsets of 898-1,000, about ten times less arithmetic).
    """
    real_array = _as_features("real features", real, min_samples=2)
    fake_array = _as_features("fake features", fake, min_samples=2)
    _check_same_dim(real_array, fake_array)
    check_positive("subset_size", subset_size, integer=True)
    check_positive("num_subsets", num_subsets, integer=True)
    size = min(subset_size, real_array.shape[0], fake_array.shape[0])
    if size < 2:
        raise CAFMInputError(f"subset_size must be >= 2 for the unbiased MMD estimate, got {subset_size}")
    rng = np.random.default_rng(seed)
    subsets = [(rng.choice(real_array.shape[0], size, replace=False), rng.choice(fake_array.shape[0], size, replace=False))
               for _ in range(num_subsets)]
    sum_xx, trace_xx, sum_yy, trace_yy, sum_xy = kid_subset_sums(real_array, fake_array, subsets)
    estimates = (sum_xx - trace_xx + sum_yy - trace_yy) / (size * (size - 1)) - 2.0 * sum_xy / (size * size)
    return float(estimates.mean()), float(estimates.std())


# Rows of a whole-set kernel computed at once (bounds memory: tile rows x N x 8 bytes).
_KID_TILE_ENTRIES = 2**22


def kid_sum_method(n_x: int, n_y: int, size: int, dim: int, count: int) -> str:
    """``"whole"`` where the whole-set kernels need less arithmetic than ``count`` subsets'."""
    per_subset = count * 3 * size * size * (dim + 3)
    whole = (n_x * n_x + n_y * n_y + n_x * n_y) * (dim + 3 + count)
    return "whole" if whole < per_subset else "subsets"


def kid_subset_sums(x: np.ndarray, y: np.ndarray, subsets: list[tuple[np.ndarray, np.ndarray]],
                     method: str | None = None) -> tuple[np.ndarray, ...]:
    """For every subset ``(a, b)`` of rows: ``sum k(x_a, x_a)``, its trace, ``sum k(y_b, y_b)``,
    its trace and ``sum k(x_a, y_b)``, as arrays over subsets.

    ``method`` ``"subsets"`` forms each subset's kernels; ``"whole"`` forms each kernel over the
    whole sets once and reduces it with the subsets' indicator matrices ``A`` (``A k B^T``'s
    diagonal); None picks the one with less arithmetic. The two agree to rounding.
    """
    count, size, dim = len(subsets), len(subsets[0][0]), x.shape[1]
    n_x, n_y = x.shape[0], y.shape[0]
    method = method or kid_sum_method(n_x, n_y, size, dim, count)
    if method == "subsets":
        sums = np.empty((5, count))
        for index, (a, b) in enumerate(subsets):
            xa, yb = x[a], y[b]
            kernel_xx, kernel_yy = _polynomial_kernel(xa, xa), _polynomial_kernel(yb, yb)
            sums[:, index] = (kernel_xx.sum(), np.trace(kernel_xx), kernel_yy.sum(), np.trace(kernel_yy),
                              _polynomial_kernel(xa, yb).sum())
        return tuple(sums)
    indicator_x, indicator_y = np.zeros((count, n_x)), np.zeros((count, n_y))
    for index, (a, b) in enumerate(subsets):
        indicator_x[index, a] = 1.0
        indicator_y[index, b] = 1.0

    def reduced(left: np.ndarray, right: np.ndarray, left_rows: np.ndarray, right_rows: np.ndarray) -> np.ndarray:
        total = np.zeros(count)
        tile = max(1, _KID_TILE_ENTRIES // right.shape[0])
        for start in range(0, left.shape[0], tile):
            kernel = _polynomial_kernel(left[start:start + tile], right)
            total += np.einsum("sj,sj->s", left_rows[:, start:start + tile] @ kernel, right_rows)
        return total

    def diagonal(points: np.ndarray) -> np.ndarray:
        return (np.einsum("ij,ij->i", points, points) / dim + 1.0) ** 3

    return (reduced(x, x, indicator_x, indicator_x), indicator_x @ diagonal(x),
            reduced(y, y, indicator_y, indicator_y), indicator_y @ diagonal(y),
            reduced(x, y, indicator_x, indicator_y))


# ---------------------------------------------------------------------------------------------
# Precision / recall (Kynkäänniemi et al. 2019)

# Distances are computed tile by tile (rows x columns) and reduced at once, so memory is
# bounded by one tile (1,024 x 8,192 float64 = 64 MiB) whatever the number of samples.
_ROW_TILE = 1024
_COLUMN_TILE = 8192


def _tiles(count: int, size: int):
    return ((start, min(start + size, count)) for start in range(0, count, size))


def knn_radii(points: torch.Tensor, k: int, *, rows: int = _ROW_TILE, columns: int = _COLUMN_TILE) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = torch.empty(points.shape[0], dtype=points.dtype)
    for row_start, row_end in _tiles(points.shape[0], rows):
        nearest = None  # the k + 1 smallest distances so far (the point itself at 0 among them)
        for column_start, column_end in _tiles(points.shape[0], columns):
            distances = torch.cdist(points[row_start:row_end], points[column_start:column_end])
            if nearest is not None:
                distances = torch.cat([nearest, distances], dim=1)
            nearest = distances.topk(min(k + 1, distances.shape[1]), dim=1, largest=False).values
        radii[row_start:row_end] = nearest[:, k]
    return radii


def within_manifold(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, *,
                     rows: int = _ROW_TILE, columns: int = _COLUMN_TILE) -> torch.Tensor:
    """Whether each query lies inside at least one ball (support point, its radius)."""
    inside = torch.zeros(queries.shape[0], dtype=torch.bool)
    for row_start, row_end in _tiles(queries.shape[0], rows):
        for column_start, column_end in _tiles(support.shape[0], columns):
            distances = torch.cdist(queries[row_start:row_end], support[column_start:column_end])
            inside[row_start:row_end] |= (distances <= radii[column_start:column_end].unsqueeze(0)).any(dim=1)
    return inside


def precision_recall(real: ArrayLike, fake: ArrayLike, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall with k-NN manifold estimates.

    Precision: share of fake samples inside the k-NN ball of some real sample (quality).
    Recall: share of real samples inside the k-NN ball of some fake sample (coverage).
    """
    check_positive("k", k, integer=True)
    real_array = _as_features("real features", real, min_samples=k + 1)
    fake_array = _as_features("fake features", fake, min_samples=k + 1)
    _check_same_dim(real_array, fake_array)
    real_points = torch.from_numpy(real_array)
    fake_points = torch.from_numpy(fake_array)
    real_radii = knn_radii(real_points, k)
    fake_radii = knn_radii(fake_points, k)
    precision = within_manifold(fake_points, real_points, real_radii).double().mean()
    recall = within_manifold(real_points, fake_points, fake_radii).double().mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------
# Sliced Wasserstein distance


def _wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact W1 between empirical distributions, batched: ``a`` [P, Na], ``b`` [P, Nb] -> [P].

    W1 = integral of |F_a(x) - F_b(x)| dx. One sort of the merged points, each carrying
    ``+1/Na`` (from ``a``) or ``-1/Nb`` (from ``b``): the running sum of those weights is
    ``F_a - F_b`` on the gap to the next point. Exact for unequal sample counts; ties give
    zero-width gaps, so their order does not matter.
    """
    merged, order = torch.cat([a, b], dim=1).sort(dim=1)
    weights = torch.cat([a.new_full((a.shape[1],), 1.0 / a.shape[1]), b.new_full((b.shape[1],), -1.0 / b.shape[1])])
    cdf_difference = weights[order[:, :-1]].cumsum(dim=1)
    gaps = merged[:, 1:] - merged[:, :-1]
    return (cdf_difference.abs() * gaps).sum(dim=1)


def sliced_wasserstein(a: ArrayLike, b: ArrayLike, *, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance: W1 of 1-D projections, averaged over random directions.

    For 1-D data every direction is +-1, so this equals W1 exactly (a shift s gives s).
    """
    check_positive("num_projections", num_projections, integer=True)
    a_array = _as_features("a", a, min_samples=1)
    b_array = _as_features("b", b, min_samples=1)
    _check_same_dim(a_array, b_array, ("a", "b"))
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_projections, a_array.shape[1], generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    projected_a = directions @ torch.from_numpy(a_array).T  # [P, Na]
    projected_b = directions @ torch.from_numpy(b_array).T  # [P, Nb]
    return float(_wasserstein_1d(projected_a, projected_b).mean())


# ---------------------------------------------------------------------------------------------
# Mode coverage on the synthetic sets


def mode_coverage(name: str, points: torch.Tensor) -> dict:
    """On/off-manifold shares of ``points`` for synthetic set ``name``; for mixtures also modes hit.

    Mixtures add ``num_modes``, ``modes_hit`` (modes with at least one on-manifold point) and
    ``mode_shares`` (share of all points that are on-manifold at each mode).
    """
    if name not in SYNTHETIC_DATASETS:
        raise CAFMInputError(f"unknown synthetic dataset {name!r}; expected one of {sorted(SYNTHETIC_DATASETS)}")
    if not isinstance(points, torch.Tensor):
        raise CAFMInputError(f"points must be a torch.Tensor, got {type(points).__name__}")
    if points.ndim != 2 or points.shape[0] == 0:
        raise CAFMInputError(f"points must be a non-empty [N, D] tensor, got shape {tuple(points.shape)}")
    on = on_manifold(name, points)
    on_fraction = float(on.double().mean())
    result: dict = {"on_manifold_fraction": on_fraction, "off_manifold_fraction": 1.0 - on_fraction}
    if name in MIXTURE_DATASETS:
        num_modes = mode_centres(name).shape[0]
        modes = nearest_mode(name, points)[on]
        counts = torch.bincount(modes, minlength=num_modes)
        result["num_modes"] = num_modes
        result["modes_hit"] = int((counts > 0).sum())
        result["mode_shares"] = (counts.double() / points.shape[0]).tolist()
    return result
