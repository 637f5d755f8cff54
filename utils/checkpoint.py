"""Checkpoint files: atomic writes and tolerant reads.

A checkpoint is written to a temporary file in the destination folder, flushed to disk, then renamed over the
destination, so a crash (or a full disk) mid-write never leaves a truncated file where a good one was.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

WEIGHT_KEYS = ("ema", "model", "state_dict")  # where checkpoints of this family keep their weights
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DDP / FSDP wrappers and torch.compile


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the file and what is wrong."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with a one-line error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        # Training checkpoints hold an argparse Namespace and optimizer state, hence weights_only=False.
        # Only load checkpoints you trust, as with any pickle.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # corrupt zip, truncated download, not a torch file ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def strip_wrapper_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def extract_weights(ckpt: Any, path: str | os.PathLike = "<checkpoint>",
                    prefer: tuple[str, ...] = WEIGHT_KEYS) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a checkpoint and the key it came from (``"ema"``, ``"model"``, ``"state_dict"``,
    or ``""`` for a bare state dict), with DDP / compile prefixes removed."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(ckpt).__name__}")
    for key in prefer:
        if isinstance(ckpt.get(key), Mapping) and ckpt[key]:
            return strip_wrapper_prefixes(ckpt[key]), key
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_wrapper_prefixes(ckpt), ""
    raise CheckpointError(f"{path}: no weights under any of {list(prefer)} (top-level keys: {sorted(ckpt)[:10]})")


def _short(keys, limit: int = 6) -> str:
    keys = list(keys)
    s = ", ".join(keys[:limit])
    return s + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], path, what: str,
                     optional: tuple[str, ...] = ()) -> None:
    """Raise one CheckpointError naming missing, unexpected and mis-shaped keys, if there are any.
    Keys starting with one of ``optional`` may be absent."""
    missing = [k for k in expected if k not in found and not k.startswith(optional)]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} in file vs {tuple(expected[k])} in model"
              for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped keys: {_short(shapes, 3)}")
    if problems:
        raise CheckpointError(f"{path}: does not fit {what}: " + "; ".join(problems))
