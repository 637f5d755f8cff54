"""Inception Score, FID, sFID, precision and recall of a sample batch against a reference batch, as computed by
OpenAI's ADM evaluator (guided-diffusion ``evaluations/evaluator.py``), the numbers tokenizer papers report.

    python evaluations/evaluator.py reconstructions/val_imagenet.npz reconstructions/FQGAN_Dual_DS16.npz

Both files are ``.npz`` with ``arr_0`` an N x H x W x 3 uint8 image batch. Statistics ``mu``/``sigma``/``mu_s``/
``sigma_s`` stored in either file are used instead of computing them (ADM reference batches carry them); the
images are still needed for precision/recall. The five numbers are printed and written beside the sample batch
(``X.npz`` -> ``X.txt``), as the FQGAN evaluator does. Needs TensorFlow and ``classify_image_graph_def.pb``.

Reference and sample images must have the same size: the Inception graph resizes everything to 299x299, so a
mismatch would run, but it almost always means the wrong pair of files (a 256 reference for 512 samples).
``--allow-size-mismatch`` evaluates anyway.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

if __name__ == "__main__":
    # Run as a script: put the repo root, not evaluations/, on sys.path so `evaluations.*` imports work and our
    # module names (metrics, inception) cannot shadow anything TensorFlow imports.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from evaluations import metrics
from evaluations.inception import BATCH_SIZE, find_inception_graph
from evaluations.npz_stream import (EvaluatorInputError, ImageArrayInfo, iter_batches, num_batches,
                                    read_precomputed_statistics, validate_images)


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


def result_path(sample_path: str | os.PathLike) -> Path:
    """X.npz -> X.txt. (The original does str.replace('.npz', '.txt'), which rewrites every '.npz' in the path
    and would overwrite the npz itself if the name lacked the suffix; we only touch the suffix.)"""
    p = Path(sample_path)
    return p.with_suffix(".txt") if p.suffix == ".npz" else p.with_name(p.name + ".txt")


def check_inputs(ref_path: str, sample_path: str, allow_size_mismatch: bool = False
                 ) -> tuple[ImageArrayInfo, ImageArrayInfo]:
    ref, sample = validate_images(ref_path), validate_images(sample_path)
    if ref.image_size != sample.image_size and not allow_size_mismatch:
        (rh, rw), (sh, sw) = ref.image_size, sample.image_size
        raise EvaluatorInputError(
            f"{sample_path}: images are {sh}x{sw} but the reference {ref_path} has {rh}x{rw}; "
            "this usually means the wrong reference batch (pass --allow-size-mismatch to evaluate anyway)")
    return ref, sample


def _statistics(path: str, stored: dict | None, pool: np.ndarray, spatial: np.ndarray
                ) -> tuple[metrics.FIDStatistics, metrics.FIDStatistics]:
    if stored is None:
        return metrics.compute_statistics(pool), metrics.compute_statistics(spatial)
    for key, dim in (("mu", pool.shape[1]), ("mu_s", spatial.shape[1])):
        sigma = "sigma" + key[2:]
        if stored[key].shape != (dim,) or stored[sigma].shape != (dim, dim):
            raise EvaluatorInputError(
                f"{path}: stored {key}/{sigma} have shapes {stored[key].shape}/{stored[sigma].shape}, "
                f"but this Inception graph gives {dim}-d features")
    print(f"using the statistics stored in {path}")
    return (metrics.FIDStatistics(stored["mu"], stored["sigma"]),
            metrics.FIDStatistics(stored["mu_s"], stored["sigma_s"]))


def evaluate(ref_path: str, sample_path: str, graph_path: str | os.PathLike | None = None,
             batch_size: int = BATCH_SIZE, allow_size_mismatch: bool = False) -> EvalResult:
    # Every check that can fail runs before TensorFlow is imported (several seconds) and before any features.
    ref_info, sample_info = check_inputs(ref_path, sample_path, allow_size_mismatch)
    ref_stored, sample_stored = read_precomputed_statistics(ref_path), read_precomputed_statistics(sample_path)
    graph = find_inception_graph(graph_path)

    print(f"loading TensorFlow and the Inception graph {graph}...")
    from evaluations.inception import InceptionFeatures, TFPairwiseDistances  # deferred: imports TensorFlow

    with InceptionFeatures(graph) as net:
        feats = {}
        for name, info in (("reference", ref_info), ("sample", sample_info)):
            h, w = info.image_size
            print(f"computing {name} batch activations ({info.num_images} images, {h}x{w})...")
            feats[name] = net.activations(iter_batches(info.path, batch_size),
                                          total=num_batches(info.num_images, batch_size), desc=name)
        probs = metrics.softmax_probabilities(feats["sample"][0], net.softmax_weights)

    print("computing evaluations...")
    ref_stats, ref_stats_s = _statistics(ref_path, ref_stored, *feats["reference"])
    sample_stats, sample_stats_s = _statistics(sample_path, sample_stored, *feats["sample"])
    distances = TFPairwiseDistances()
    try:
        estimator = metrics.ManifoldEstimator(distance_fn=distances)
        precision, recall = metrics.precision_recall(feats["reference"][0], feats["sample"][0], estimator)
    finally:
        distances.close()
    return EvalResult(
        inception_score=metrics.inception_score(probs),
        fid=metrics.frechet_distance(sample_stats, ref_stats),
        sfid=metrics.frechet_distance(sample_stats_s, ref_stats_s),
        precision=precision, recall=recall)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_batch",
                        help="reference batch .npz (arr_0: N x H x W x 3 uint8; optional mu/sigma/mu_s/sigma_s)")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0: N x H x W x 3 uint8)")
    parser.add_argument("--inception-graph", default=None,
                        help="path of classify_image_graph_def.pb (default: $INCEPTION_GRAPH, ./, ~/.cache/fqgan/)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per Inception forward pass")
    parser.add_argument("--allow-size-mismatch", action="store_true",
                        help="evaluate even if reference and sample images differ in size")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    try:
        result = evaluate(args.ref_batch, args.sample_batch, args.inception_graph, args.batch_size,
                          args.allow_size_mismatch)
    except (EvaluatorInputError, metrics.FIDError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(result.lines()))
    out = result_path(args.sample_batch)
    out.write_text("\n".join(result.lines()) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
