"""``--fid-ref`` for the samplers and the tokenizer's reconstruction evaluation: Inception features taken from the
decoded uint8 images while they are still on the device (the torch backend, ``inception_torch``), stored per row
beside the npz parts (so a killed run resumes with them), gathered on rank 0 at the end and scored by
``scoring.score``, the function ``evaluator.py`` calls: the same five numbers as ``evaluator.py --backend torch`` on
the npz of the same images, without writing or reading the npz.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from evaluations.inception import file_sha256, find_inception_graph
from evaluations.inception_torch import TorchBackendConfig, TorchInception
from evaluations.errors import EvaluatorInputError
from evaluations.metrics import FIDError
from evaluations.npz_stream import MIN_IMAGES, read_precomputed_statistics, validate_images
from evaluations.scoring import EvalResult, check_stored, reference_statistics, score
from utils.argtypes import positive_int
from utils.flags import flag
from utils.runfiles import write_text_atomic

POOL, SPATIAL = "inception_pool", "inception_spatial"  # the per-row feature arrays among the npz parts
SCORING_ERRORS = (EvaluatorInputError, FIDError)  # what scoring raises about its inputs: one line at an entry point
# Inception images at once on a GPU beside the sampler: ~16 MB of float32 activations each at 299x299, so 128 take
# ~2 GB, inside the headroom the sampler's automatic batch size leaves (the evaluator alone uses 500)
GPU_BATCH = 128


FID_GROUP = "scoring in-process (--fid-ref)"


@dataclass(frozen=True)
class FIDFlags:
    """The flags of an entry point that can score its images as it makes them (the samplers, reconstruction)."""
    fid_ref: Optional[str] = flag(None, group=FID_GROUP, output=False,
                                  help="reference batch .npz: score the images in-process as they are made (IS, FID, "
                                       "sFID, precision, recall, as evaluations/evaluator.py --backend torch)")
    inception_graph: Optional[str] = flag(None, group=FID_GROUP, output=False,
                                          help="classify_image_graph_def.pb for --fid-ref (default: $INCEPTION_GRAPH, "
                                               "./, ~/.cache/fqgan/)")
    fid_batch_size: Optional[int] = flag(None, type=positive_int, group=FID_GROUP, output=False,
                                         help=f"images per Inception forward pass for --fid-ref (default: {GPU_BATCH} "
                                              "on a GPU, 64 on a CPU)")


class InProcessFID:
    """The Inception network on this rank's device, checked against the reference batch before any sampling:
    call it on each decoded uint8 batch (N, H, W, 3), store what it returns under ``arrays(n)``, and score the
    gathered features on rank 0 with ``score``."""

    def __init__(self, ref_path: str, graph_path: Optional[str], device: torch.device, image_size: int,
                 num_images: int, batch_size: Optional[int] = None):
        # every check that can fail runs before the first image is generated
        self.ref = validate_images(ref_path)
        stored = read_precomputed_statistics(ref_path)  # finite (and below: of this graph's sizes), or one line now
        if self.ref.image_size != (image_size, image_size):
            h, w = self.ref.image_size
            raise EvaluatorInputError(f"--fid-ref {ref_path}: reference images are {h}x{w} but the images made "
                                      f"here are {image_size}x{image_size}")
        if num_images < MIN_IMAGES:
            raise EvaluatorInputError(f"--fid-ref needs at least {MIN_IMAGES} images (precision/recall uses each "
                                      f"image's 3 nearest neighbours), not {num_images}")
        self.graph = find_inception_graph(graph_path)
        self.graph_sha = file_sha256(self.graph)
        if batch_size is None and device.type == "cuda":
            batch_size = GPU_BATCH
        self.net = TorchInception(self.graph, TorchBackendConfig(device=str(device), batch_size=batch_size))
        pool, spatial = self(torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8, device=device))
        self.dims = pool.shape[1], spatial.shape[1]
        if stored is not None:
            check_stored(ref_path, stored, self.dims)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool_3 [N, D], spatial [N, S]) float32 on the device, flattened as the evaluator flattens them; no
        host sync (the caller's writer thread copies them to the host)."""
        pool, spatial = self.net.device_features(images)
        return pool.reshape(len(pool), -1), spatial.reshape(len(spatial), -1)

    def arrays(self, n: int) -> dict:
        return {POOL: ((n, self.dims[0]), np.float32), SPATIAL: ((n, self.dims[1]), np.float32)}

    def describe(self) -> str:
        return f"reference {self.ref.path} ({self.ref.num_images} images); Inception backend: {self.net.describe()}"

    def score(self, pool: np.ndarray, spatial: np.ndarray) -> EvalResult:
        """Rank 0: the five numbers, with the reference statistics from the cache when it has them."""
        ref = reference_statistics(self.ref, self.net, self.graph_sha)
        print("computing evaluations...")
        return score(pool, spatial, ref, self.net)


def write_result(result: EvalResult, txt: Path, jsonl: Path, **info) -> None:
    """The five lines as evaluator.py prints and writes them (``txt``), and one JSON line appended to ``jsonl``."""
    print("\n".join(result.lines()))
    txt.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(txt, "\n".join(result.lines()) + "\n")
    line = {**info, **result._asdict(), "backend": "torch", "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(jsonl, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"wrote {txt} and a line of {jsonl}")
