"""What a tokenizer's factors have learned, measured from features alone (no model here, so it tests fast).

* ``codebook_stats``: a factor's code histogram over a set -> codes used, fraction of the codebook, perplexity;
* ``separability``: per-image features and class labels -> cross-validated k-nearest-neighbour accuracy and a
  linear probe's accuracy, with the chance level beside them. A semantic factor should separate classes far
  above chance; a purely visual one need not;
* ``tsne``: features -> a seeded 2-D t-SNE embedding (the same seed gives the same picture).

The features ``tokenizer/factor_report.py`` feeds in are each image's quantized codes of one factor, averaged
over positions. Everything runs on standardized features: the factors' codes live on the unit sphere, but a
concatenation of factors or a near-constant dimension would otherwise weigh unevenly.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

MAX_FOLDS = 5
MAX_NEIGHBOURS = 5
EXACT_TSNE = 500  # points; the exact t-SNE costs O(N^2) per iteration


def codebook_stats(hist: torch.Tensor) -> dict[str, float]:
    """One factor's code histogram (codebook_size,) -> number of codes used, the fraction of the codebook
    they are, and the perplexity exp(entropy) of the code distribution (1: one code; codebook_size: uniform)."""
    hist = hist.double()
    p = hist / hist.sum()
    nz = p[p > 0]
    return {"codes_used": int((hist > 0).sum()), "usage": float((hist > 0).float().mean()),
            "perplexity": float(torch.exp(-(nz * nz.log()).sum()))}


def chance_level(labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent class (1 / classes for a balanced set)."""
    return float(np.bincount(labels).max() / len(labels))


def cv_plan(labels: np.ndarray) -> tuple[int, int]:
    """(folds, k) for a labelled set: up to MAX_FOLDS stratified folds, no more than the smallest class has
    images (each fold then holds one of each), and k no larger than what the smallest class keeps in a training
    split, so a class's own neighbours can be the majority. Folds 0 when some class has a single image."""
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    folds = min(MAX_FOLDS, smallest) if smallest >= 2 else 0
    k = max(1, min(MAX_NEIGHBOURS, smallest - -(-smallest // folds))) if folds else 0
    return folds, k


def separability(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Optional[float]]:
    """How well features (N, d) tell the classes ``labels`` (N,) apart, on held-out folds: the mean accuracy
    of a k-nearest-neighbour vote and of a logistic-regression probe over stratified cross-validation, both on
    standardized features, and the chance level. Accuracies are None (with a ``note``) when the set cannot be
    cross-validated: fewer than two classes, or a class with a single image."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    _, labels = np.unique(labels, return_inverse=True)  # classes absent from the set do not count
    folds, k = cv_plan(labels)
    out = {"knn_accuracy": None, "probe_accuracy": None, "chance": chance_level(labels), "knn_k": k,
           "folds": folds, "feature_dim": int(features.shape[1])}
    if labels.max() < 1 or not folds:
        out["note"] = ("needs two or more classes" if labels.max() < 1 else
                       "needs two or more images of every class (for cross-validation)")
        return out
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    knn = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    out["knn_accuracy"] = float(cross_val_score(knn, features, labels, cv=cv).mean())
    out["probe_accuracy"] = float(cross_val_score(probe, features, labels, cv=cv).mean())
    return out


def tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 2-D t-SNE embedding (N, 2) of standardized features (N, d), reproducible for a seed. The perplexity
    is scikit-learn's default of 30, lowered for small sets (it must stay below the number of points). Up to
    EXACT_TSNE points the exact gradient runs: it is faster there than the Barnes-Hut approximation (and exact)."""
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    n = len(features)
    if n < 3 or np.ptp(features, axis=0).max() == 0:  # nothing to lay out: every point at the origin
        return np.zeros((n, 2), dtype=np.float32)
    x = StandardScaler().fit_transform(features.astype(np.float64))
    perplexity = min(30.0, (n - 1) / 3)
    method = "exact" if n <= EXACT_TSNE else "barnes_hut"
    return TSNE(n_components=2, perplexity=perplexity, init="pca", method=method, random_state=seed).fit_transform(x)
