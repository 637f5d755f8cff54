"""Deterministic weights for the golden tests.

The golden numbers in ``tests/data/golden.npz`` were computed by the original FQGAN / FAR code, those in
``tests/data/golden_llamagen.npz`` by LlamaGen's, with every state-dict tensor filled from its key alone (a
SplitMix64 stream seeded by the key's crc32). Rebuilding the same tensors here lets the tests compare our
implementation against those numbers without any real checkpoint. The key lists (names and shapes of the
released layouts) live in ``tests/data/keys``.
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parent / "data"

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _uniform(seed: int, n: int) -> np.ndarray:
    """SplitMix64 outputs ``(seed << 32) + i * golden`` for i < n, mapped to float64 in [0, 1)."""
    with np.errstate(over="ignore"):
        i = np.arange(n, dtype=np.uint64)
        z = np.uint64((seed << 32) & 0xFFFFFFFFFFFFFFFF) + i * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def reference_tensor(key: str, shape) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    if key.endswith("codebook_used"):
        return torch.zeros(shape, dtype=torch.float32)
    v = (_uniform(zlib.crc32(key.encode("utf-8")), n) - 0.5) * math.sqrt(12.0)
    if len(shape) <= 1:
        v = 1.0 + 0.1 * v if key.endswith("weight") else 0.1 * v
    else:
        v = v / math.sqrt(float(np.prod(shape[1:])))
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def reference_keys(name: str) -> list[dict]:
    """The released layout ``[{"key", "shape"}, ...]`` of ``name`` (a file stem in tests/data/keys)."""
    return json.loads((DATA / "keys" / f"{name}.json").read_text())


def reference_state_dict(name: str) -> dict[str, torch.Tensor]:
    return {e["key"]: reference_tensor(e["key"], e["shape"]) for e in reference_keys(name)}


def golden(name: str = "golden") -> dict[str, np.ndarray]:
    """The arrays of ``tests/data/<name>.npz`` ("golden": FQGAN / FAR; "golden_llamagen": LlamaGen)."""
    with np.load(DATA / f"{name}.npz") as g:
        return {k: g[k] for k in g.files}


def coffee(size: int) -> torch.Tensor:
    """The golden numbers' input: scikit-image's ``coffee.png`` after the ADM centre crop to ``size``, as the
    model input (1, 3, size, size) in [-1, 1] (the golden files keep only the 256 px crop)."""
    from PIL import Image
    from skimage import data

    from utils.data import center_crop_arr

    img = np.asarray(center_crop_arr(Image.fromarray(data.coffee()), size))
    return torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
