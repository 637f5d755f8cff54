"""A training run's frame, shared by the tokenizer and FAR loops: process group and experiment folder, the
position in the data (what a checkpoint resumes from), checkpoints written collectively, and stopping on a
preemption signal."""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

import torch
import torch.distributed as dist

from utils.checkpoint import SAVE_FORMATS, add_unsafe_load_argument, atomic_save, write_checkpoint
from utils.data import epoch_loader
from utils.distributed import DistInfo, barrier, cleanup, get_world_size, init_distributed, is_distributed
from utils.logging import create_logger
from utils.rng import gather_rng_states, restore_rng_state, seed_everything

CKPT_RE = re.compile(r"^(?P<step>\d+)\.pt$")


def fail(msg: object) -> NoReturn:
    """Stop the run with a one-line error (no traceback): bad flags, missing files, checkpoints that don't fit."""
    sys.exit(f"error: {msg}")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a run that both training loops share: resuming, device, logging, the non-finite guard, the
    checkpoint format and unsafe loading (the original's own flags stay with each loop)."""
    p.add_argument("--auto-resume", action="store_true", help="resume from the newest checkpoint of this run")
    p.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (if installed)")
    p.add_argument("--max-nonfinite-steps", type=int, default=100,
                   help="stop after this many optimizer steps in a row skipped for a NaN/inf loss or gradient "
                        "(0: never)")
    p.add_argument("--save-format", choices=SAVE_FORMATS, default="pt",
                   help="safetensors: beside each NNNNNNN.pt also write NNNNNNN.safetensors (the 'model' weights "
                        "and the config only; resuming needs the .pt)")
    add_unsafe_load_argument(p)


def experiment_dir(results_dir: str, model_name: str, exp_name: str) -> Path:
    """``<results_dir>/<model>-<exp_name>`` as in the original scripts (checkpoints in ``checkpoints/``)."""
    return Path(results_dir) / f"{model_name.replace('/', '-')}-{exp_name}"


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint with the highest step number in ``ckpt_dir`` (files named ``0005000.pt``), if any."""
    if not ckpt_dir.is_dir():
        return None
    found = [(int(m["step"]), p) for p in ckpt_dir.iterdir() for m in [CKPT_RE.match(p.name)] if m]
    return max(found)[1] if found else None


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

    @property
    def ckpt_dir(self) -> Path:
        return self.exp_dir / "checkpoints"

    @property
    def metrics_file(self) -> Optional[Path]:
        return self.exp_dir / "metrics.jsonl" if self.info.is_main else None


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
    exp_dir = experiment_dir(args.results_dir, model_name, args.exp_name)
    logger = create_logger(exp_dir if info.is_main else None, info.is_main)
    logger.info(f"Experiment directory: {exp_dir}")
    logger.info(f"{args}")
    return Run(info, accum, args.global_batch_size // (world * accum), exp_dir, logger, not args.no_local_save,
               args.save_format)


def find_resume(explicit: Optional[str], auto: bool, ckpt_dir: Path) -> Optional[str]:
    """The checkpoint to resume from: the one named on the command line, else with ``auto`` the run's newest."""
    if explicit or not auto:
        return explicit
    latest = latest_checkpoint(ckpt_dir)
    return str(latest) if latest else None


# ---------------------------------------------------------------------------------------------- position
@dataclass
class Position:
    """Where a run is: optimisation steps done, and the epoch / batch within it that the next step reads."""
    step: int = 0
    epoch: int = 0
    batch: int = 0


def restore_position(ckpt: dict[str, Any], steps_per_epoch: int, scalers: dict[str, Any],
                     logger: logging.Logger) -> tuple[Position, dict[str, Any]]:
    """The position a checkpoint resumes from and its resume state; restores the grad scalers (named as in the
    resume state) and this rank's RNG. A checkpoint of the original code carries only ``steps``: it is rewound
    to the start of its epoch, as the original does."""
    steps = int(ckpt.get("steps", 0))
    state = ckpt.get("resume", {})
    if "epoch" not in state:
        epoch = steps // steps_per_epoch
        return Position(epoch * steps_per_epoch, epoch, 0), state
    for name, scaler in scalers.items():
        scaler.load_state_dict(state[name])
    if not restore_rng_state(state.get("rng")):
        logger.warning("world size changed since the checkpoint: RNG streams start afresh")
    return Position(steps, state["epoch"], state["batch_in_epoch"]), state


def epoch_batches(start: Position, epochs: int, dataset, sampler, batch_size: int, num_workers: int, collate_fn,
                  device: torch.device, seed: int) -> Iterator[tuple[int, int, Any]]:
    """(epoch, batches of that epoch done after this one, batch) from ``start`` to the end of the last epoch:
    positions the (resumable) sampler and the dataset's augmentations at each epoch, and loads its batches."""
    for epoch in range(start.epoch, epochs):
        first = start.batch if epoch == start.epoch else 0
        sampler.set_epoch(epoch, first)
        dataset.set_epoch(epoch)
        loader = epoch_loader(dataset, sampler, batch_size, num_workers, collate_fn, device, seed)
        for done, batch in enumerate(loader, start=first + 1):
            yield epoch, done, batch


def save_run_checkpoint(run: Run, pos: Position, payload: Optional[dict[str, Any]],
                        **resume: Any) -> Optional[Path]:
    """Write ``<ckpt_dir>/<step>.pt`` atomically: ``payload`` (the models, optimizers ...) plus ``steps`` and the
    exact resume state (position, every rank's RNG, ``resume`` extras). Collective: every rank calls it at the
    same step; rank 0 writes (nothing with ``--no-local-save``); returns the path on rank 0."""
    state = {"epoch": pos.epoch, "batch_in_epoch": pos.batch, "rng": gather_rng_states(),
             "world_size": get_world_size(), **resume}
    path = None
    if run.info.is_main and run.save and payload is not None:
        path = atomic_save({**payload, "steps": pos.step, "resume": state}, run.ckpt_dir / f"{pos.step:07d}.pt")
        run.logger.info(f"Saved checkpoint to {path}")
        if run.save_format == "safetensors":
            run.logger.info(f"and its weights to {write_checkpoint(payload, path.with_suffix('.safetensors'))}")
    barrier()
    return path


class Checkpoints:
    """When a training loop writes checkpoints: every ``every`` steps, after the step at which it was asked to
    stop, and once at the end unless that step was just written. ``save(pos)`` is collective (every rank calls
    it at the same step) and returns the path on rank 0, the latest of which ``finish_run`` returns."""

    def __init__(self, save: Callable[[Position], Optional[Path]], every: int, start: Position):
        self.save, self.every = save, every
        self.saved_step, self.latest = start.step, None

    def after_step(self, pos: Position, stopping: bool) -> None:
        if pos.step % self.every == 0 or stopping:
            self.latest, self.saved_step = self.save(pos), pos.step

    def last(self, pos: Position) -> Optional[Path]:
        if self.saved_step != pos.step:
            self.latest, self.saved_step = self.save(pos), pos.step
        return self.latest


def finish_run(pos: Position, error: Optional[str], checkpoints: Checkpoints, closing: tuple,
               log: logging.Logger) -> Optional[Path]:
    """The end of a training loop: a non-finite-loss ``error`` stops the run without saving; otherwise the final
    checkpoint (if the last step has none yet), then ``closing`` (the writer, the stop signal) and the process
    group are closed. Returns the latest checkpoint's path (rank 0)."""
    if error is not None:
        fail(error)
    path = checkpoints.last(pos)
    for thing in closing:
        thing.close()
    log.info("Done!")
    cleanup()
    return path


# ---------------------------------------------------------------------------------------------- preemption
class StopSignal:
    """SIGTERM (what SLURM and cloud schedulers send before a kill; torchrun forwards it) and SIGUSR1 ask the run
    to stop after the step in progress. ``requested`` is collective, so every rank stops at the same step even
    when only some received the signal; it reduces a CPU flag over a gloo group, not a GPU sync."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[str] = None
        self.group = None
        if is_distributed():
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        flag = torch.tensor([self.received is not None], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def announce(self, log: logging.Logger, step: int) -> None:
        log.info(f"Stopped by {self.received or 'a signal to another rank'} after step {step}; resume with: "
                 f"{resume_command()}")

    def close(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def resume_command(flag: str = "--auto-resume") -> str:
    """The command line that continues this run (the current one plus ``--auto-resume``)."""
    args = list(sys.argv)
    if flag not in args:
        args.append(flag)
    launcher = [f"torchrun --nproc_per_node={get_world_size()}"] if is_distributed() else [sys.executable]
    return " ".join(launcher + [shlex.quote(a) for a in args])
