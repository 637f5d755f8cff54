"""The ADM evaluator's metrics on precomputed Inception features, in numpy/scipy only (no TensorFlow).

Numbers must match what tokenizer papers report, so each function follows OpenAI's guided-diffusion
``evaluations/evaluator.py`` arithmetic, dtypes included: statistics and the inception score stay in the
float32 the features arrive in, FID goes through ``scipy.linalg.sqrtm`` with the same fallbacks, and the
precision/recall distances are computed in float16 (falling back to float32) as the ADM TensorFlow graph does.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import scipy
from scipy import linalg

# ADM constants.
IS_SPLIT_SIZE = 5000  # the inception score is averaged over consecutive splits of this many samples
SOFTMAX_BATCH_SIZE = 512
FID_EPS = 1e-6
NHOOD_SIZES = (3,)  # k of the k-NN radius used by precision/recall
PR_BATCH_SIZE = 10000  # rows/columns per pairwise-distance block


class FIDStatistics(NamedTuple):
    mu: np.ndarray
    sigma: np.ndarray


class FIDError(ValueError):
    """Statistics or features that cannot give a score (non-finite values, a matrix square root that fails or has
    a large imaginary part); the message is one line."""


def check_finite(values: np.ndarray, what: str) -> None:
    """FIDError naming ``what`` when ``values`` hold nan or inf: no matrix function may see them (scipy's sqrtm
    can run for ever on a nan, and a nan mean silently gives ``FID: nan``)."""
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise FIDError(f"{what} holds {bad} non-finite value{'s' if bad > 1 else ''} (nan or inf) of "
                       f"{np.size(values)}: no score can be computed from it")


def compute_statistics(features: np.ndarray, what: str = "features") -> FIDStatistics:
    check_finite(features, what)
    # np.mean keeps float32 features in float32, np.cov promotes to float64: both as in ADM.
    return FIDStatistics(np.mean(features, axis=0), np.cov(features, rowvar=False))


_SCIPY_HAS_DISP = tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 16)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # ADM calls sqrtm(..., disp=False), which silences scipy's singular-matrix message. scipy >= 1.16 deprecates
    # `disp` (gone in 1.18) and warns with LinAlgWarning instead, which we silence the same way: the
    # non-finite / imaginary checks below are what decide whether the result is usable. Its inputs are finite
    # (checked first), so LAPACK's iterations are bounded; one that does not converge raises, and so do we.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        try:
            if _SCIPY_HAS_DISP:
                return linalg.sqrtm(a, disp=False)[0]
            return linalg.sqrtm(a)
        except (linalg.LinAlgError, ValueError) as e:
            raise FIDError(f"FID: the matrix square root of the covariance product failed ({e})") from None


def frechet_distance(sample: FIDStatistics, ref: FIDStatistics, eps: float = FID_EPS) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)). ADM passes the sample first; sqrtm(S1 S2) is not exactly
    symmetric in floating point, so the order is kept."""
    mu1, mu2 = np.atleast_1d(sample.mu), np.atleast_1d(ref.mu)
    sigma1, sigma2 = np.atleast_2d(sample.sigma), np.atleast_2d(ref.sigma)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in size: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    for values, what in ((mu1, "the sample mean"), (sigma1, "the sample covariance"), (mu2, "the reference mean"),
                         (sigma2, "the reference covariance")):
        check_finite(values, what)
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # Near-singular product (e.g. fewer samples than dimensions): regularise both covariances and retry.
        warnings.warn(f"FID: singular covariance product, adding {eps} to the diagonals", RuntimeWarning)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
        check_finite(covmean, "FID: the square root of the regularised covariance product")
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; only a large one on the diagonal means something is wrong.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def softmax_probabilities(pool: np.ndarray, weights: np.ndarray, batch_size: int = SOFTMAX_BATCH_SIZE) -> np.ndarray:
    """Class probabilities from pool_3 features. ADM multiplies by the weights of the graph's
    ``softmax/logits/MatMul`` and applies softmax, leaving out the graph's logits bias; we do the same."""
    out = []
    for start in range(0, len(pool), batch_size):
        logits = pool[start:start + batch_size].astype(np.float32) @ weights.astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        out.append(e / e.sum(axis=1, keepdims=True))
    return np.concatenate(out, axis=0)


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """exp(E_x KL(p(y|x) || p(y))) per split of ``split_size`` consecutive rows, averaged over splits
    (improved-GAN / ADM; with 50,000 samples that is 10 splits). The last split may be shorter. As in ADM, a
    probability of exactly 0 makes the score nan (0 * log 0); softmax outputs only reach 0 by float32 underflow."""
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        kl = part * (np.log(part) - np.log(marginal))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def _squared_distances(u: np.ndarray, v: np.ndarray, dtype: type) -> np.ndarray:
    """max(|u|^2 - 2 u.v^T + |v|^2, 0) with the operands and every intermediate rounded to ``dtype``.

    numpy evaluates float16 elementwise ops in float32 and rounds each result, which is what TensorFlow's float16
    kernels do; the matmul and the norm sums accumulate in float32 and round once (TF's accumulation order
    differs, so individual float16 values can be off by an ulp)."""
    with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow is expected; the caller checks
        u, v = u.astype(dtype), v.astype(dtype)
        norm_u = np.square(u).sum(axis=1, dtype=np.float32).astype(dtype)
        norm_v = np.square(v).sum(axis=1, dtype=np.float32).astype(dtype)
        d = (u.astype(np.float32) @ v.astype(np.float32).T).astype(dtype)
        d *= 2
        np.subtract(norm_u[:, None], d, out=d)
        d += norm_v[None, :]
        return np.maximum(d, 0, out=d)


def numpy_pairwise_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float32 [len(u), len(v)] squared distances as ADM's DistanceBlock computes them: in float16 (for speed on
    GPUs, in the original), the whole block redone in float32 if any entry overflowed to inf/nan."""
    d = _squared_distances(u, v, np.float16)
    if np.isfinite(d).all():
        return d.astype(np.float32)
    return _squared_distances(u, v, np.float32)


class ManifoldEstimator:
    """k-NN manifolds of feature sets (Kynkäänniemi et al. 2019, improved precision and recall) with ADM's defaults.

    Distances are squared Euclidean, evaluated in blocks of ``row_batch_size`` x ``col_batch_size`` by
    ``distance_fn`` (default: numpy_pairwise_distances; the evaluator passes ADM's own TensorFlow version)."""

    def __init__(self, row_batch_size: int = PR_BATCH_SIZE, col_batch_size: int = PR_BATCH_SIZE,
                 nhood_sizes: Sequence[int] = NHOOD_SIZES, clamp_to_percentile: float | None = None,
                 distance_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None):
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = list(nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.pairwise_distances = distance_fn or numpy_pairwise_distances

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        """[N, len(nhood_sizes)] float32: for each point, the squared distance to its k-th nearest neighbour.
        The point itself (distance ~0) counts as neighbour 0, so k=3 means the third *other* point."""
        n, kmax = len(features), max(self.nhood_sizes)
        if n <= kmax:
            raise ValueError(f"need more than {kmax} feature vectors for {kmax}-NN radii, got {n}")
        radii = np.zeros([n, len(self.nhood_sizes)], dtype=np.float32)
        for r0 in range(0, n, self.row_batch_size):
            rows = features[r0:r0 + self.row_batch_size]
            # Keep only the kmax+1 smallest distances seen so far per row, so memory stays at one block instead of
            # ADM's full [row_batch, N] strip; the k-th smallest of the union is unchanged.
            best = None
            for c0 in range(0, n, self.col_batch_size):
                block = self.pairwise_distances(rows, features[c0:c0 + self.col_batch_size])
                pool = block if best is None else np.concatenate([best, block], axis=1)
                m = min(kmax + 1, pool.shape[1])
                best = np.partition(pool, m - 1, axis=1)[:, :m]
            radii[r0:r0 + len(rows)] = np.sort(best, axis=1)[:, self.nhood_sizes]
        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def evaluate_pr(self, features_1: np.ndarray, radii_1: np.ndarray,
                    features_2: np.ndarray, radii_2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fraction of set 2 inside manifold 1, fraction of set 1 inside manifold 2), one entry per k.
        With set 1 = reference and set 2 = samples these are (precision, recall)."""
        in_2 = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)  # set-1 points covered by manifold 2
        in_1 = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)  # set-2 points covered by manifold 1
        for b1 in range(0, len(features_1), self.row_batch_size):
            e1 = b1 + self.row_batch_size
            for b2 in range(0, len(features_2), self.col_batch_size):
                e2 = b2 + self.col_batch_size
                d = self.pairwise_distances(features_1[b1:e1], features_2[b2:e2])[..., None]
                in_2[b1:e1] |= np.any(d <= radii_2[b2:e2][None], axis=1)
                in_1[b2:e2] |= np.any(d <= radii_1[b1:e1][:, None], axis=0)
        return in_1.mean(axis=0, dtype=np.float64), in_2.mean(axis=0, dtype=np.float64)


def precision_recall(ref: np.ndarray, sample: np.ndarray,
                     estimator: ManifoldEstimator | None = None) -> tuple[float, float]:
    """Precision: share of samples inside the reference manifold. Recall: share of references inside the
    sample manifold. Both with k=3 (ADM)."""
    est = estimator or ManifoldEstimator()
    precision, recall = est.evaluate_pr(ref, est.manifold_radii(ref), sample, est.manifold_radii(sample))
    return float(precision[0]), float(recall[0])
