"""Inception Score, FID, sFID, precision and recall of a sample batch against a reference batch, as computed by
OpenAI's ADM evaluator (guided-diffusion ``evaluations/evaluator.py``), the numbers tokenizer papers report.

    python evaluations/evaluator.py reconstructions/val_imagenet.npz reconstructions/FQGAN_Dual_DS16.npz

Both files are ``.npz`` with ``arr_0`` an N x H x W x 3 uint8 image batch. Statistics ``mu``/``sigma``/``mu_s``/
``sigma_s`` stored in either file are used instead of computing them (ADM reference batches carry them); the
images are still needed for precision/recall. The five numbers are printed and written beside the sample batch
(``X.npz`` -> ``X.txt``), as the FQGAN evaluator does. The reference batch's statistics are cached after its
first use (``scoring.reference_statistics``, keyed by the file's and the graph's content). Needs
``classify_image_graph_def.pb``, and runs it with ``--backend tf`` (TensorFlow, as ADM) or ``--backend torch`` (the same graph file run by torch ops, on a GPU or the
CPU, no TensorFlow needed; same numbers to float32 rounding). The default picks torch when a GPU is present or
TensorFlow cannot be imported, else TensorFlow; the output says which ran.

Reference and sample images must have the same size: the Inception graph resizes everything to 299x299, so a
mismatch would run, but it almost always means the wrong pair of files (a 256 reference for 512 samples).
``--allow-size-mismatch`` evaluates anyway.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

if __name__ == "__main__":
    # Run as a script, Python puts evaluations/ first on sys.path; take it off, so our module names (metrics,
    # inception) cannot shadow anything TensorFlow imports. `evaluations.*` comes from the installed project.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

from evaluations import metrics
from evaluations.errors import EvaluatorInputError
from evaluations.inception import BACKENDS, choose_backend, file_sha256, find_inception_graph, open_backend
from evaluations.npz_stream import (ImageArrayInfo, iter_batches, num_batches, read_precomputed_statistics,
                                    validate_images)
from evaluations.scoring import EvalResult, reference_statistics, score
from utils.argtypes import positive_int
from utils.flags import flag, parse, require


FULL_RANK_IMAGES = 2048  # the pool features' width: fewer images cannot give a full-rank covariance


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


def evaluate(ref_path: str, sample_path: str, graph_path: str | os.PathLike | None = None,
             batch_size: int | None = None, allow_size_mismatch: bool = False, backend: str = "auto",
             device: str | None = None) -> EvalResult:
    """The five numbers; ``backend`` is tf, torch or auto (see choose_backend), ``device`` is torch's (implies
    torch under auto), ``batch_size`` defaults to the backend's (64 on a CPU, 500 on a GPU)."""
    # Every check that can fail runs before TensorFlow/torch are imported (seconds) and before any features.
    ref_info, sample_info = check_inputs(ref_path, sample_path, allow_size_mismatch)
    ref_stored = read_precomputed_statistics(ref_path)  # half-stored statistics fail here, not after the features
    sample_stored = read_precomputed_statistics(sample_path)
    graph = find_inception_graph(graph_path)
    for label, info, stored in (("reference", ref_info, ref_stored), ("sample", sample_info, sample_stored)):
        if stored is None and info.num_images < FULL_RANK_IMAGES:  # (after the checks: errors stay one line)
            print(f"warning: the {label} batch {info.path} has {info.num_images} images, fewer than the "
                  f"{FULL_RANK_IMAGES} features of the Inception pool: its covariance is rank-deficient and "
                  f"FID/sFID from it are not comparable with published numbers (ADM uses 10,000-50,000)",
                  file=sys.stderr)

    name, why = ("torch", f"--device {device}") if backend == "auto" and device else choose_backend(backend)
    print(f"loading the Inception graph {graph} ({name} backend: {why})...")
    with open_backend(name, graph, batch_size, device) as net:
        print(f"Inception backend: {net.describe()}")
        ref = reference_statistics(ref_info, net, file_sha256(graph))
        h, w = sample_info.image_size
        print(f"computing sample batch activations ({sample_info.num_images} images, {h}x{w})...")
        pool, spatial = net.activations(iter_batches(sample_path, net.batch_size),
                                        total=num_batches(sample_info.num_images, net.batch_size), desc="sample")
        print("computing evaluations...")
        return score(pool, spatial, ref, net, sample_path, sample_stored)


@dataclass(frozen=True)
class EvalConfig:
    """The evaluator's command line."""
    ref_batch: str = flag(positional=True,
                          help="reference batch .npz (arr_0: N x H x W x 3 uint8; optional mu/sigma/mu_s/sigma_s)")
    sample_batch: str = flag(positional=True, help="sample batch .npz (arr_0: N x H x W x 3 uint8)")
    inception_graph: Optional[str] = flag(None, help="path of classify_image_graph_def.pb (default: $INCEPTION_GRAPH, "
                                                     "./, ~/.cache/fqgan/)")
    backend: str = flag("auto", choices=("auto", *BACKENDS),
                        help="tf: TensorFlow runs the graph (as ADM); torch: torch runs the same graph, GPU or CPU, no "
                             "TensorFlow needed. auto (default): torch if a GPU is present or TensorFlow is missing, "
                             "else tf")
    device: Optional[str] = flag(None, help="torch backend's device, e.g. cuda, cuda:1, cpu (default: cuda if "
                                            "available)")
    batch_size: Optional[int] = flag(None, type=positive_int,
                                     help="images per Inception forward pass (default: 64 on a CPU, 500 on a GPU)")
    allow_size_mismatch: bool = flag(False, help="evaluate even if reference and sample images differ in size")

    def __post_init__(self):
        require(not (self.device and self.backend == "tf"), "--device applies to --backend torch only")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(EvalConfig, argv, __doc__.split("\n\n")[0])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = evaluate(args.ref_batch, args.sample_batch, args.inception_graph, args.batch_size,
                          args.allow_size_mismatch, args.backend, args.device)
    except (EvaluatorInputError, metrics.FIDError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(result.lines()))
    out = result_path(args.sample_batch)
    try:
        out.write_text("\n".join(result.lines()) + "\n")
    except OSError as e:  # a read-only sample folder: the numbers above are the result
        print(f"warning: could not write {out} ({e.strerror or e}); the numbers are printed above", file=sys.stderr)
        return 0
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
