"""Random number generator state of every rank: seeding, and capturing / restoring it for exact resume."""
from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch

from utils.distributed import all_gather_objects, get_rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed % 2 ** 64)  # seed * world + rank may pass torch's uint64 for a large --global-seed


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (collective), for a checkpoint: dropout masks after a resume then match."""
    return all_gather_objects(rng_state())


def restore_rng_state(states: Optional[list[dict[str, Any]]]) -> bool:
    """Restore this rank's RNG state from ``gather_rng_states``'s list; False if the world size changed."""
    rank = get_rank()
    if not states or rank >= len(states):
        return False
    s = states[rank]
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    return True
