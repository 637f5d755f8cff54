"""A training run's frame, shared by the tokenizer and FAR loops: process group and experiment folder (locked:
one run per folder), the position in the data (what a checkpoint resumes from), checkpoints written
collectively, and stopping on a preemption signal or Ctrl-C."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

import torch
import torch.distributed as dist

from utils.argtypes import nonnegative_int, positive_float
from utils.checkpoint import (SAVE_FORMATS, CheckpointError, add_unsafe_load_argument, atomic_save, load_file,
                              write_checkpoint)
from utils.data import epoch_loader
from utils.distributed import (DistInfo, all_gather_objects, cleanup, get_world_size, init_distributed,
                               is_distributed)
from utils.flags import PRECISIONS, config_namespace, require
from utils.logs import create_logger
from utils.rng import gather_rng_states, restore_rng_state, seed_everything
from utils.runfiles import FolderInUse, FolderLock, remove_stale_temporaries

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
    p.add_argument("--max-nonfinite-steps", type=nonnegative_int, default=100,
                   help="stop after this many optimizer steps in a row skipped for a NaN/inf loss or gradient "
                        "(0: never)")
    p.add_argument("--save-format", choices=SAVE_FORMATS, default="pt",
                   help="safetensors: beside each NNNNNNN.pt also write NNNNNNN.safetensors (the 'model' weights "
                        "and the config only; resuming needs the .pt)")
    p.add_argument("--stop-timeout", type=positive_float, default=300.0,
                   help="after a stop signal, seconds the step in progress may take before the run exits without "
                        "a checkpoint (a stuck data read)")
    add_unsafe_load_argument(p)


@dataclass(frozen=True)
class RunConfig:
    """The flags of a run that both trainers' ``TrainConfig`` share (``add_run_arguments`` plus the batch, seed,
    schedule, optimizer and output flags, which both scripts declare with the same defaults). Frozen and checked
    when built."""
    exp_name: str = "run"
    results_dir: str = "results"
    no_local_save: bool = False
    global_batch_size: int = 256
    gradient_accumulation_steps: int = 1
    global_seed: int = 0
    epochs: int = 1
    max_steps: int = 0
    mixed_precision: str = "bf16"
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 1.0
    ema: bool = False
    ema_decay: float = 0.9999
    log_every: int = 100
    ckpt_every: int = 5000
    auto_resume: bool = False
    device: Optional[str] = None
    wandb: bool = False
    max_nonfinite_steps: int = 100
    save_format: str = "pt"
    stop_timeout: float = 300.0
    unsafe_load: bool = False

    def __post_init__(self):
        require(self.global_batch_size >= 1 and self.gradient_accumulation_steps >= 1 and self.epochs >= 1,
                "--global-batch-size, --gradient-accumulation-steps and --epochs must be >= 1")
        require(self.global_batch_size % self.gradient_accumulation_steps == 0,
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--gradient-accumulation-steps {self.gradient_accumulation_steps}")
        require(self.mixed_precision in PRECISIONS,
                f"--mixed-precision {self.mixed_precision}: use one of {', '.join(PRECISIONS)}")
        for flag, value in (("--beta1", self.beta1), ("--beta2", self.beta2)):
            require(0 <= value < 1, f"{flag} {value}: must be in [0, 1)")
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


def experiment_dir(results_dir: str, model_name: str, exp_name: str) -> Path:
    """``<results_dir>/<model>-<exp_name>`` as in the original scripts (checkpoints in ``checkpoints/``)."""
    return Path(results_dir) / f"{model_name.replace('/', '-')}-{exp_name}"


def run_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The checkpoints in ``ckpt_dir`` (files named ``0005000.pt``), newest (highest step) first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m["step"]), p) for p in ckpt_dir.iterdir() for m in [CKPT_RE.match(p.name)] if m]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint with the highest step number in ``ckpt_dir``, if any."""
    found = run_checkpoints(ckpt_dir)
    return found[0] if found else None


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
    # One run per folder: rank 0 locks it before anything is written there (log.txt, metrics, checkpoints); a
    # second run into it stops here, every rank with the same line.
    lock, error = None, None
    if info.is_main:
        try:
            lock = FolderLock(exp_dir, "run folder")
        except FolderInUse as e:
            error = str(e)
    error = all_gather_objects(error)[0]
    if error:
        fail(error)
    logger = create_logger(exp_dir if info.is_main else None, info.is_main)
    logger.info(f"Experiment directory: {exp_dir}")
    logger.info(f"{args}")
    if info.is_main:
        for stale in remove_stale_temporaries(exp_dir / "checkpoints"):
            logger.info(f"Removed {stale}, left by an interrupted save")
    return Run(info, accum, args.global_batch_size // (world * accum), exp_dir, logger, not args.no_local_save,
               args.save_format, lock)


@dataclass
class Resume:
    """What a run starts from: nothing, a checkpoint of its own folder, or one named on the command line."""
    path: Optional[str] = None
    ckpt: Optional[dict[str, Any]] = None
    own: bool = False  # one of this run folder's checkpoints: always resumed exactly (never a fine-tune seed)


def find_resume(explicit: Optional[str], run: Run, flag: str) -> Resume:
    """The checkpoint a run starts from. A run folder with checkpoints of its own resumes from the newest one that
    loads, whatever ``explicit`` (``flag``: --vq-ckpt / --gpt-ckpt, which only seed a fresh run) says: a job
    requeued with its first command line continues where it stopped. A checkpoint that fails to load is
    reported and the one before it used."""
    log = run.logger
    own = run_checkpoints(run.ckpt_dir)
    for path in own:
        try:
            ckpt = load_file(path)
        except CheckpointError as e:
            log.warning(f"{e}; trying the checkpoint before it")
            continue
        log.info(f"{run.exp_dir} has checkpoints of its own: resuming from {path}"
                 + (f" ({flag} {explicit} only seeds a fresh run)" if explicit else ""))
        return Resume(str(path), ckpt, True)
    if own:
        raise CheckpointError(f"none of the {len(own)} checkpoints in {run.ckpt_dir} can be read (see above); "
                              f"move them away to start afresh")
    return Resume(explicit, load_file(explicit), False) if explicit else Resume()


IGNORED_FLAGS = {"auto_resume", "vq_ckpt", "gpt_ckpt", "finetune", "unsafe_load", "wandb"}


def check_resumed_flags(ckpt: dict[str, Any], args: argparse.Namespace, fixed: tuple[str, ...], path: str,
                        log: logging.Logger) -> None:
    """Compare the flags a checkpoint of ours was trained with to this run's: one that changes the data stream
    or the model (``fixed``: batch size, image size, seed, architecture) is refused in one line, since the saved
    position and weights would be read with another meaning; the others are printed as changed."""
    saved = ckpt.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if "resume" not in ckpt or not isinstance(saved, dict):  # a released checkpoint: no exact resume to protect
        return
    changed = {k: (saved[k], v) for k, v in sorted(vars(args).items())
               if k in saved and saved[k] != v and k not in IGNORED_FLAGS}
    refused = [k for k in fixed if k in changed]
    flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    if refused:
        raise ValueError(f"{path} was trained with " + ", ".join(f"{flag(k)} {changed[k][0]}" for k in refused)
                         + "; resuming it with " + ", ".join(f"{flag(k)} {changed[k][1]}" for k in refused)
                         + " would change the data stream or the model: use the original values or a new "
                           "--exp-name")
    if changed:
        log.info("Changed since the checkpoint: " + ", ".join(f"{flag(k)} {a} -> {b}" for k, (a, b) in changed.items()))


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
    path, error = None, None
    if run.info.is_main and run.save and payload is not None:
        try:
            path = atomic_save({**payload, "steps": pos.step, "resume": state}, run.ckpt_dir / f"{pos.step:07d}.pt")
            run.logger.info(f"Saved checkpoint to {path}")
            if run.save_format == "safetensors":
                run.logger.info(f"and its weights to {write_checkpoint(payload, path.with_suffix('.safetensors'))}")
        except OSError as e:  # a full disk (space is reserved first), a read-only folder ...: every rank stops
            latest = latest_checkpoint(run.ckpt_dir)
            error = f"{e}; the run stops at step {pos.step}" + (f", its last checkpoint is {latest}" if latest else "")
    error = all_gather_objects(error)[0]  # (also the barrier after the write)
    if error:
        fail(error)
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
    """SIGTERM (what SLURM and cloud schedulers send before a kill; torchrun forwards it), SIGUSR1 and SIGINT
    (Ctrl-C) ask the run to stop after the step in progress, with a checkpoint. ``requested`` is collective, so
    every rank stops at the same step even when only some received the signal; it reduces a CPU flag over a gloo
    group, not a GPU sync.

    A second signal exits at once (one line, no checkpoint; the last one stays valid), except within ECHO_S of
    the first: a terminal's Ctrl-C reaches torchrun and its workers alike, and torchrun then sends SIGTERM.
    If the step in progress does not end within ``timeout`` seconds of the first signal (a data read that
    blocks), a watchdog ends the process with one line."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    ECHO_S = 2.0

    def __init__(self, timeout: float = 300.0):
        self.received: Optional[str] = None
        self.first_at = 0.0
        self.timeout = timeout
        self.watchdog: Optional[threading.Timer] = None
        self.group = None
        if is_distributed():
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self.first_at = name, time.monotonic()
            self.watchdog = threading.Timer(self.timeout, self._give_up)
            self.watchdog.daemon = True
            self.watchdog.start()
        elif time.monotonic() - self.first_at > self.ECHO_S:
            # os.write: a handler must not print through a buffered stream the main thread may be writing to
            os.write(2, f"error: second stop signal ({name}): exiting at once without a checkpoint\n".encode())
            os._exit(128 + signum)

    def _give_up(self) -> None:
        os.write(2, (f"error: stop asked by {self.received}, but the step in progress did not end within "
                     f"{self.timeout:g} s (--stop-timeout; a stuck data read?): exiting without a checkpoint; "
                     f"resume with: {resume_command()}\n").encode())
        os._exit(1)

    def requested(self) -> bool:
        flag = torch.tensor([self.received is not None], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        stop = bool(flag.item())
        if stop and self.watchdog is not None:
            self.watchdog.cancel()  # the step ended: the checkpoint is written next
        return stop

    def announce(self, log: logging.Logger, step: int) -> None:
        log.info(f"Stopped by {self.received or 'a signal to another rank'} after step {step}; resume with: "
                 f"{resume_command()}")

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def resume_command(flag: str = "--auto-resume") -> str:
    """The command line that continues this run (the current one plus ``--auto-resume``)."""
    args = list(sys.argv)
    if flag not in args:
        args.append(flag)
    launcher = [f"torchrun --nproc_per_node={get_world_size()}"] if is_distributed() else [sys.executable]
    return " ".join(launcher + [shlex.quote(a) for a in args])
