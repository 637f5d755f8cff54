"""The five ADM numbers from Inception features, and the cache of reference-batch statistics: one code path for
``evaluator.py`` (sample features read back from an npz) and for the samplers' ``--fid-ref`` (sample features taken
in-process while the images are made), so both give the same numbers for the same images.

Reference statistics (pool/spatial mean and covariance, or the ``mu``/``sigma``/``mu_s``/``sigma_s`` the file
carries, plus the pool features precision/recall needs) are cached beside the Inception graph's weight cache
(``${XDG_CACHE_HOME:-~/.cache}/fqgan/``) as ``inception-ref-<sha of the file>-<backend>-<sha of the graph>.npz``:
a changed reference file or another graph gets a new entry, so an entry is never stale.
"""
from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

import numpy as np

from evaluations import metrics
from evaluations.errors import EvaluatorInputError
from evaluations.inception import InceptionBackend, cache_dir, file_sha256, warn
from evaluations.npz_stream import ImageArrayInfo, iter_batches, num_batches, read_precomputed_statistics

REF_CACHE_FORMAT = 1  # bump when what an entry holds changes


class EvalResult(NamedTuple):
    inception_score: float
    fid: float
    sfid: float
    precision: float
    recall: float

    def lines(self) -> list[str]:
        # ADM's labels and `print(label, value)` formatting, so existing log parsers keep working.
        return [f"Inception Score: {self.inception_score}", f"FID: {self.fid}", f"sFID: {self.sfid}",
                f"Precision: {self.precision}", f"Recall: {self.recall}"]


class ReferenceStats(NamedTuple):
    pool: metrics.FIDStatistics     # for FID
    spatial: metrics.FIDStatistics  # for sFID
    features: np.ndarray            # pool_3 features [N, D], for precision/recall


def check_stored(path: str, stored: dict, dims: tuple[int, int]) -> None:
    """Stored ``mu``/``sigma``/``mu_s``/``sigma_s`` (finite: ``read_precomputed_statistics``) must have the shapes
    of this graph's (pool, spatial) features."""
    for key, dim in zip(("mu", "mu_s"), dims):
        sigma = "sigma" + key[2:]
        if stored[key].shape != (dim,) or stored[sigma].shape != (dim, dim):
            raise EvaluatorInputError(
                f"{path}: stored {key}/{sigma} have shapes {stored[key].shape}/{stored[sigma].shape}, "
                f"but this Inception graph gives {dim}-d features")


def statistics(path: str, stored: dict | None, pool: np.ndarray, spatial: np.ndarray, what: str = "sample"
               ) -> tuple[metrics.FIDStatistics, metrics.FIDStatistics]:
    """(pool, spatial) statistics of a batch: the ones its file carries (as ADM), else computed from features."""
    if stored is None:
        return (metrics.compute_statistics(pool, f"the {what} batch's pool_3 features"),
                metrics.compute_statistics(spatial, f"the {what} batch's spatial features"))
    check_stored(path, stored, (pool.shape[1], spatial.shape[1]))
    print(f"using the statistics stored in {path}")
    return (metrics.FIDStatistics(stored["mu"], stored["sigma"]),
            metrics.FIDStatistics(stored["mu_s"], stored["sigma_s"]))


def score(pool: np.ndarray, spatial: np.ndarray, ref: ReferenceStats, net: InceptionBackend,
          sample_path: str = "", sample_stored: dict | None = None) -> EvalResult:
    """The five numbers for a sample batch's features (pool_3 [N, D] and spatial [N, S] float32, in sample
    order; the class logits are pool_3 times the graph's softmax weights) against a reference batch. Features
    that are not finite are refused (FIDError) before any statistic."""
    metrics.check_finite(pool, "the sample batch's pool_3 features")
    probs = metrics.softmax_probabilities(pool, net.softmax_weights)
    sample_stats, sample_stats_s = statistics(sample_path, sample_stored, pool, spatial)
    estimator = metrics.ManifoldEstimator(distance_fn=net.pairwise_distances)
    precision, recall = metrics.precision_recall(ref.features, pool, estimator)
    return EvalResult(
        inception_score=metrics.inception_score(probs),
        fid=metrics.frechet_distance(sample_stats, ref.pool),
        sfid=metrics.frechet_distance(sample_stats_s, ref.spatial),
        precision=precision, recall=recall)


def reference_cache_path(ref_path: str | os.PathLike, net: InceptionBackend, graph_sha: str,
                         cache: str | os.PathLike | None = None) -> Path:
    """Keyed by the reference file's content, the backend (TensorFlow and torch features differ by float32
    rounding) and the graph file's content."""
    folder = Path(cache if cache is not None else cache_dir())
    return folder / f"inception-ref-{file_sha256(ref_path)[:16]}-{net.name}-{graph_sha[:16]}.npz"


def reference_statistics(info: ImageArrayInfo, net: InceptionBackend, graph_sha: str,
                         cache: str | os.PathLike | None = None) -> ReferenceStats:
    """The reference batch's statistics: from the cache when this file was seen with this graph and backend,
    else computed (Inception over every image) and cached (a read-only cache only costs a warning)."""
    path = reference_cache_path(info.path, net, graph_sha, cache)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if int(f["format"]) == REF_CACHE_FORMAT:
                    entry = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool")}
                    for k, v in entry.items():
                        metrics.check_finite(v, f"cached '{k}'")
                    print(f"using the cached reference statistics {path}")
                    return ReferenceStats(metrics.FIDStatistics(entry["mu"], entry["sigma"]),
                                          metrics.FIDStatistics(entry["mu_s"], entry["sigma_s"]), entry["pool"])
        except Exception as e:  # a truncated, foreign or non-finite entry: compute again and overwrite it
            warn(f"{path}: unreadable reference cache entry ({type(e).__name__}), computing it again")
    h, w = info.image_size
    print(f"computing reference batch activations ({info.num_images} images, {h}x{w})...")
    pool, spatial = net.activations(iter_batches(info.path, net.batch_size),
                                    total=num_batches(info.num_images, net.batch_size), desc="reference")
    metrics.check_finite(pool, f"{info.path}: the reference batch's pool_3 features")
    stats, stats_s = statistics(info.path, read_precomputed_statistics(info.path), pool, spatial, "reference")
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, format=REF_CACHE_FORMAT, mu=stats.mu, sigma=stats.sigma, mu_s=stats_s.mu,
                 sigma_s=stats_s.sigma, pool=pool, reference=str(Path(info.path).resolve()))
        os.replace(tmp, path)  # atomic: a concurrent evaluation never reads half an entry
        print(f"cached the reference statistics at {path}")
    except OSError as e:
        with suppress(OSError):
            tmp.unlink()
        warn(f"cannot cache the reference statistics at {path} ({e.strerror or e}); they will be computed again")
    return ReferenceStats(stats, stats_s, pool)
