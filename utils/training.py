"""Pieces every training loop here shares: experiment folders, checkpoints that resume exactly, RNG state of
every rank, mixed-precision set-up, and a progress line with an ETA."""
from __future__ import annotations

import logging
import random
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional

import numpy as np
import torch

from utils.distributed import DistInfo, all_gather_objects, get_rank, init_distributed
from utils.logging import create_logger

CKPT_RE = re.compile(r"^(\d+)\.pt$")


def experiment_dir(results_dir: str, model_name: str, exp_name: str) -> Path:
    """``<results_dir>/<model>-<exp_name>`` as in the original scripts (checkpoints in ``checkpoints/``)."""
    return Path(results_dir) / f"{model_name.replace('/', '-')}-{exp_name}"


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint with the highest step number in ``ckpt_dir`` (files named ``0005000.pt``), if any."""
    if not ckpt_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() for m in [CKPT_RE.match(p.name)] if m]
    return max(found)[1] if found else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


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


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16 / fp16 autocast on CUDA; on CPU training runs in fp32 (CPU autocast is slow and rarely helps)."""
    if device.type != "cuda" or mixed_precision == "none":
        return nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return lambda: torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and mixed_precision == "fp16")


@contextmanager
def frozen(module: torch.nn.Module):
    """Temporarily stop gradients into ``module``'s parameters (gradients still flow through it)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


class Throughput:
    """Steps/s and images/s since the last report, and an ETA for the remaining steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.t0, self.steps, self.images = time.perf_counter(), 0, 0

    def update(self, images: int) -> None:
        self.steps += 1
        self.images += images

    def report(self, steps_left: int) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"steps_per_s": self.steps / dt, "images_per_s": self.images / dt}
        out["eta_s"] = steps_left / out["steps_per_s"] if out["steps_per_s"] > 0 else float("inf")
        self.reset()
        return out


class MetricAverager:
    """Per-step scalars averaged over a logging window, then over ranks (``reduce`` is collective: every
    rank must call it at the same step with the same keys)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def reduce(self) -> dict[str, float]:
        from utils.distributed import all_reduce_mean

        keys = sorted(self.sums)
        local = torch.tensor([self.sums[k] / max(self.count, 1) for k in keys], dtype=torch.float64)
        out = dict(zip(keys, all_reduce_mean(local).tolist()))
        self.sums.clear()
        self.count = 0
        return out


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    import json

    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def progress_line(step: int, total: int, epoch: int, parts: list[str], speed: dict[str, float]) -> str:
    """``(step=0000100/0200000 epoch=1) loss=... | 2.31 steps/s 590.1 img/s | ETA 1d 02:03:04``."""
    return (f"(step={step:07d}/{total:07d} epoch={epoch}) " + " ".join(parts) +
            f" | {speed['steps_per_s']:.2f} steps/s {speed['images_per_s']:.1f} img/s | "
            f"ETA {format_duration(speed['eta_s'])}")


def resume_entry(epoch: int, batch_in_epoch: int, **extra: Any) -> dict[str, Any]:
    """What a checkpoint needs for an exact resume (collective: gathers every rank's RNG state)."""
    from utils.distributed import get_world_size

    return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "rng": gather_rng_states(),
            "world_size": get_world_size(), **extra}


def fail(msg: object) -> NoReturn:
    """Stop the run with a one-line error (no traceback): bad flags, missing files, checkpoints that don't fit."""
    sys.exit(f"error: {msg}")


@dataclass
class Run:
    """Who this process is and where its run writes: what both training loops set up first."""
    info: DistInfo
    accum: int  # gradient-accumulation steps
    micro_batch: int  # images per rank per forward pass
    exp_dir: Path
    logger: logging.Logger

    @property
    def ckpt_dir(self) -> Path:
        return self.exp_dir / "checkpoints"


def start_run(args, model_name: str) -> Run:
    """Join the process group, check the batch arithmetic, seed (identically on every rank, so all ranks build
    the same initial weights; call ``seed_everything(seed * world + rank)`` once the models exist), and open
    ``<results-dir>/<model>-<exp-name>`` with its log."""
    info = init_distributed(args.device)
    world = info.world_size
    accum = max(1, args.gradient_accumulation_steps)
    if args.global_batch_size % (world * accum):
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes x "
             f"{accum} accumulation steps")
    seed_everything(args.global_seed)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    exp_dir = experiment_dir(args.results_dir, model_name, args.exp_name)
    logger = create_logger(exp_dir if info.is_main else None, info.is_main)
    logger.info(f"Experiment directory: {exp_dir}")
    logger.info(f"{args}")
    return Run(info, accum, args.global_batch_size // (world * accum), exp_dir, logger)


def find_resume(explicit: Optional[str], auto: bool, ckpt_dir: Path) -> Optional[str]:
    """The checkpoint to resume from: the one named on the command line, else with ``auto`` the run's newest."""
    if explicit or not auto:
        return explicit
    latest = latest_checkpoint(ckpt_dir)
    return str(latest) if latest else None


def restore_position(ckpt: dict[str, Any], steps_per_epoch: int, scalers: dict[str, Any],
                     logger: logging.Logger) -> tuple[int, int, int, dict[str, Any]]:
    """(train_steps, epoch, batch in epoch, resume state) from a checkpoint; restores the grad scalers (named
    as in the resume state) and this rank's RNG. A checkpoint of the original code carries only ``steps``: it
    is rewound to the start of its epoch, as the original does."""
    steps = int(ckpt.get("steps", 0))
    state = ckpt.get("resume", {})
    if "epoch" not in state:
        epoch = steps // steps_per_epoch
        return epoch * steps_per_epoch, epoch, 0, state
    for name, scaler in scalers.items():
        scaler.load_state_dict(state[name])
    if not restore_rng_state(state.get("rng")):
        logger.warning("world size changed since the checkpoint: RNG streams start afresh")
    return steps, state["epoch"], state["batch_in_epoch"], state


def epoch_loader(dataset, sampler, batch_size: int, num_workers: int, collate_fn, device: torch.device,
                 seed: int) -> torch.utils.data.DataLoader:
    """The loader of one epoch. It gets its own generator: drawing its worker seeds from the global RNG would
    shift dropout masks after a resume."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                       num_workers=num_workers, collate_fn=collate_fn,
                                       pin_memory=device.type == "cuda",
                                       generator=torch.Generator().manual_seed(seed))


def report(run: Run, writer, step: int, total: int, epoch: int, avg: dict[str, float], speed: dict[str, float],
           parts: list[str]) -> None:
    """One logging point: TensorBoard scalars, the console / log-file progress line, ``metrics.jsonl``."""
    writer.scalars({f"train/{k}": v for k, v in avg.items()}, step)
    writer.scalars({f"speed/{k}": speed[k] for k in ("steps_per_s", "images_per_s")}, step)
    run.logger.info(progress_line(step, total, epoch, parts, speed))
    if run.info.is_main:
        append_jsonl(run.exp_dir / "metrics.jsonl", {"step": step, **avg})
