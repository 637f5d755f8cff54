"""A training run's set-up, shared by the tokenizer and FAR trainers: the flags every run has (``RunConfig``), the
process group, the batch split over processes and accumulation steps, and the experiment folder (locked: one run
per folder) with its log. Resuming is in ``utils/resume.py``, the loop and its checkpoints in
``utils/training.py``, stop signals in ``utils/preemption.py``."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from utils.argtypes import (finite_float, nonnegative_float, nonnegative_int, positive_float, positive_int, seed_int,
                            unit_float)
from utils.checkpoint import SAVE_FORMATS, unsafe_load_flag
from utils.distributed import DistInfo, all_gather_objects, init_distributed
from utils.flags import PRECISIONS, config_namespace, flag, precision_flag, require
from utils.logs import create_logger
from utils.rng import seed_everything
from utils.runfiles import FolderInUse, FolderLock, remove_stale_temporaries


class RunError(Exception):
    """A run cannot go on (a busy run folder, a batch that does not split, a checkpoint that cannot be written):
    one line, raised on every rank alike; entry points exit with it."""


@dataclass(frozen=True)
class RunConfig:
    """The flags every training run has; each trainer's ``TrainConfig`` extends it (and may redeclare a field with
    its own default). Frozen and checked when built."""
    exp_name: str = flag("", required=True, resume="ignored", help="names the run folder <results-dir>/<model>-<exp-name>")
    results_dir: str = flag("results", resume="ignored", help="where run folders are made")
    recipe: Optional[str] = flag(None, resume="ignored",
                                 help="a named recipe of the paper's settings (utils/recipes.py); flags given on the "
                                      "command line override it")
    no_local_save: bool = flag(False, help="do not write checkpoints (debugging)")
    global_batch_size: int = flag(256, type=positive_int, resume="fixed", help="images per optimizer step, all ranks")
    micro_batch_size: Optional[int] = flag(
        None, type=positive_int,
        help="images per forward pass and process: --gradient-accumulation-steps becomes global batch / (processes "
             "x this), so a recipe keeps its forward passes on any number of GPUs")
    gradient_accumulation_steps: Optional[int] = flag(
        None, type=positive_int, help="forward passes per optimizer step (default: from --micro-batch-size, else 1)")
    global_seed: int = flag(0, type=seed_int, resume="fixed")
    epochs: int = flag(1, type=positive_int)
    max_steps: int = flag(0, type=nonnegative_int, help="stop after this many steps (0: run all epochs)")
    mixed_precision: str = precision_flag("bf16", "autocast dtype on GPU (CPU runs fp32)")
    lr: float = flag(1e-4, type=positive_float)
    beta1: float = flag(0.9, type=finite_float)
    beta2: float = flag(0.95, type=finite_float)
    max_grad_norm: float = flag(1.0, type=nonnegative_float, help="0 disables clipping")
    ema: bool = flag(False, help="keep an EMA of the weights (saved as 'ema')")
    ema_decay: float = flag(0.9999, type=unit_float)
    log_every: int = flag(100, type=positive_int)
    ckpt_every: int = flag(5000, type=positive_int)
    auto_resume: bool = flag(False, resume="ignored", help="resume from the newest checkpoint of this run")
    device: Optional[str] = flag(None, help="cuda or cpu (default: cuda when available)")
    wandb: bool = flag(False, resume="ignored", help="also log to Weights & Biases (if installed)")
    max_nonfinite_steps: int = flag(100, type=nonnegative_int,
                                    help="stop after this many optimizer steps in a row skipped for a NaN/inf loss or "
                                         "gradient (0: never)")
    save_format: str = flag("pt", choices=SAVE_FORMATS,
                            help="safetensors: beside each NNNNNNN.pt also write NNNNNNN.safetensors (the 'model' "
                                 "weights and the config only; resuming needs the .pt)")
    stop_timeout: float = flag(300.0, type=positive_float,
                               help="after a stop signal, seconds the step in progress may take before the run exits "
                                    "without a checkpoint (a stuck data read)")
    unsafe_load: bool = unsafe_load_flag(resume="ignored")
    check_flags: bool = flag(False, resume="ignored",
                             help="check the flags and print the batch split for $WORLD_SIZE processes, then exit "
                                  "(the launch scripts run this before torchrun)")

    def __post_init__(self):
        require(self.global_batch_size >= 1 and self.epochs >= 1, "--global-batch-size and --epochs must be >= 1")
        accum = self.gradient_accumulation_steps
        require(accum is None or accum >= 1, "--gradient-accumulation-steps must be >= 1")
        require(accum is None or self.global_batch_size % accum == 0,
                f"--global-batch-size {self.global_batch_size} is not divisible by --gradient-accumulation-steps "
                f"{accum}")
        require(self.mixed_precision in PRECISIONS,
                f"--mixed-precision {self.mixed_precision}: use one of {', '.join(PRECISIONS)}")
        for name, value in (("--beta1", self.beta1), ("--beta2", self.beta2)):
            require(0 <= value < 1, f"{name} {value}: must be in [0, 1)")
        require(self.save_format in SAVE_FORMATS, f"--save-format {self.save_format}: use one of {SAVE_FORMATS}")

    def namespace(self) -> argparse.Namespace:
        """The flags as the argparse ``Namespace`` a checkpoint stores under ``args`` (as the original does)."""
        return config_namespace(self)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Steps of the whole run: every epoch, or --max-steps when that is fewer."""
        total = steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total


@dataclass(frozen=True)
class BatchSplit:
    """A global batch over processes and accumulation steps."""
    world: int
    accum: int
    micro: int  # images per rank per forward pass

    def describe(self, cfg: RunConfig) -> str:
        why = (f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps}" if cfg.gradient_accumulation_steps
               else f"--micro-batch-size {cfg.micro_batch_size}" if cfg.micro_batch_size else "no accumulation")
        return (f"batch: {cfg.global_batch_size} images per step = {self.world} processes x {self.accum} "
                f"accumulation steps x {self.micro} images per forward pass ({why})")


def batch_split(cfg: RunConfig, world: int) -> BatchSplit:
    """How ``--global-batch-size`` splits over ``world`` processes: ``--gradient-accumulation-steps`` when given,
    else as many steps as keep ``--micro-batch-size`` images per forward pass (at least one), else none. A split
    that is not whole is one line naming the numbers."""
    g = cfg.global_batch_size
    accum = cfg.gradient_accumulation_steps
    if accum is None:
        accum = max(1, g // (world * cfg.micro_batch_size)) if cfg.micro_batch_size else 1
    if g % (world * accum):
        hint = (" (give --gradient-accumulation-steps, or a number of processes that divides it)"
                if cfg.micro_batch_size and not cfg.gradient_accumulation_steps else "")
        raise RunError(f"--global-batch-size {g} is not divisible by {world} processes x {accum} accumulation "
                       f"steps{hint}")
    return BatchSplit(world, accum, g // (world * accum))


def experiment_dir(results_dir: str, model_name: str, exp_name: str) -> Path:
    """``<results_dir>/<model>-<exp_name>`` as in the original scripts (checkpoints in ``checkpoints/``)."""
    return Path(results_dir) / f"{model_name.replace('/', '-')}-{exp_name}"


@dataclass
class Run:
    """Who this process is and where its run writes: what both training loops set up first."""
    info: DistInfo
    accum: int  # gradient-accumulation steps
    micro_batch: int  # images per rank per forward pass
    exp_dir: Path
    logger: logging.Logger
    save: bool = True  # False with --no-local-save
    save_format: str = "pt"  # "safetensors": also a weights-only copy of every checkpoint
    lock: Optional[FolderLock] = None  # rank 0's lock on exp_dir, held for the process's lifetime

    @property
    def ckpt_dir(self) -> Path:
        return self.exp_dir / "checkpoints"

    @property
    def metrics_file(self) -> Optional[Path]:
        return self.exp_dir / "metrics.jsonl" if self.info.is_main else None


def first_error(error: Optional[str]) -> None:
    """Collective: every rank raises the first rank's error (if any), so all stop with the same line."""
    error = next((e for e in all_gather_objects(error) if e), None)
    if error:
        raise RunError(error)


def start_run(cfg: RunConfig, model_name: str) -> Run:
    """Join the process group, split the batch, seed (identically on every rank, so all ranks build the same
    initial weights; call ``seed_everything(seed * world + rank)`` once the models exist), and open
    ``<results-dir>/<model>-<exp-name>`` with its log."""
    info = init_distributed(cfg.device)
    split = batch_split(cfg, info.world_size)
    seed_everything(cfg.global_seed)
    exp_dir = experiment_dir(cfg.results_dir, model_name, cfg.exp_name)
    # One run per folder: rank 0 locks it before anything is written there (log.txt, metrics, checkpoints); a
    # second run into it stops here, every rank with the same line.
    lock, error = None, None
    if info.is_main:
        try:
            lock = FolderLock(exp_dir, "run folder")
        except FolderInUse as e:
            error = str(e)
    first_error(error)
    logger = create_logger(exp_dir if info.is_main else None, info.is_main)
    logger.info(f"Experiment directory: {exp_dir}")
    logger.info(f"{cfg}")
    logger.info(split.describe(cfg))
    if info.is_main:
        for stale in remove_stale_temporaries(exp_dir / "checkpoints"):
            logger.info(f"Removed {stale}, left by an interrupted save")
    return Run(info, split.accum, split.micro, exp_dir, logger, not cfg.no_local_save, cfg.save_format, lock)
