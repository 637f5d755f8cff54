"""The one training loop of both trainers (tokenizer and FAR), and the checkpoints it writes.

A trainer (``tokenizer/train.py``, ``autoregressive/train/train_c2i.py``) is built by its ``build(cfg)``, which
loads everything and resumes; ``train(trainer)`` then runs a plain loop of named steps:

    for each batch from the resumable sampler (from the resumed position):
        out = trainer.step(batch, step)            # one optimizer update (and the discriminator's)
        log (every --log-every steps): metrics averaged on the device, speed, ETA, the non-finite guard
        trainer.after_step(...)                    # e.g. the tokenizer's image grid
        checkpoint every --ckpt-every steps, or now and stop if a stop signal arrived

What a trainer provides is the ``Trainer`` protocol below; everything else (metrics, TensorBoard, checkpoints,
preemption, the non-finite guard) is the same for both and lives here.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch

from utils.checkpoint import atomic_save, write_checkpoint
from utils.data import epoch_loader
from utils.distributed import all_gather_objects, cleanup, get_world_size
from utils.flags import exits_on
from utils.images import TooManyUnreadable
from utils.logs import MetricWriter
from utils.preemption import StopSignal
from utils.progress import MetricAverager, Throughput, report, trim_metrics
from utils.resume import Position, latest_checkpoint
from utils.rng import gather_rng_states
from utils.run import Run, RunConfig, RunError, batch_split
from utils.steps import NonFiniteGuard


@dataclass
class StepOutput:
    """What one training step returns: its logs (device tensors, averaged at logging steps), whether the update
    was skipped for a non-finite loss or gradient (a device bool), how many samples this rank trained on, and
    what ``after_step`` may show (the tokenizer's reconstructions)."""
    logs: dict[str, Any]
    skipped: torch.Tensor
    samples: int
    preview: Any = None


class Trainer(Protocol):
    cfg: RunConfig
    run: Run
    start: Position
    total_steps: int
    dataset: Any
    sampler: Any
    collate: Callable
    project: str  # the wandb project name

    def step(self, batch: Any, step: int) -> StepOutput: ...

    def status(self) -> dict[str, float]:
        """Scalars logged beside the averaged ones (learning rate, skipped images ...)."""

    def progress_parts(self, avg: dict[str, float], nonfinite: int) -> list[str]:
        """The console line's parts at a logging step."""

    def after_step(self, pos: Position, batch: Any, out: StepOutput, writer: MetricWriter) -> None: ...

    def save(self, pos: Position) -> Optional[Path]:
        """A checkpoint at ``pos`` (collective); its path on rank 0."""


def run_trainer(parse: Callable[[], RunConfig], build: Callable[[RunConfig], Trainer],
                bad_input: tuple[type[BaseException], ...]) -> Optional[Path]:
    """A trainer's entry point: parse the command line, build (every input checked), train. Bad input ends with
    one line (``bad_input``: the errors ``parse`` and ``build`` raise), as does a run that cannot go on.
    ``--check-flags`` stops after parsing, with the batch split for ``$WORLD_SIZE`` processes (what the launch
    scripts print before torchrun starts, computed by the same code the run uses)."""
    with exits_on(*bad_input, RunError, interrupted="interrupted while setting up the run; no checkpoint was written"):
        cfg = parse()
        if cfg.check_flags:
            print(batch_split(cfg, int(os.environ.get("WORLD_SIZE", "1"))).describe(cfg))
            return None
        t = build(cfg)
    with exits_on(RunError, TooManyUnreadable):
        return train(t)


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


def train(t: Trainer) -> Optional[Path]:
    """Train ``t`` from its start position to its last step (or a stop signal); returns the last checkpoint's path
    (rank 0). A run stopped by --max-nonfinite-steps raises RunError without a new checkpoint."""
    cfg, run, log = t.cfg, t.run, t.run.logger
    device = run.info.device
    # What the checkpoint does not cover (steps a killed run logged after it) is logged again below: trim it.
    writer = MetricWriter(run.exp_dir / "tensorboard", run.info.is_main, cfg.wandb, t.project, cfg.exp_name,
                          cfg.namespace(), log, purge_step=t.start.step + 1)
    if run.metrics_file is not None and (dropped := trim_metrics(run.metrics_file, t.start.step)):
        log.info(f"{run.metrics_file}: dropped {dropped} lines past step {t.start.step}, where this run continues")
    throughput, averager = Throughput(device), MetricAverager(device)
    guard, stop = NonFiniteGuard(device, cfg.max_nonfinite_steps), StopSignal(cfg.stop_timeout)
    checkpoints = Checkpoints(t.save, cfg.ckpt_every, t.start)
    log.info(f"Training for {cfg.epochs} epochs ({t.total_steps - t.start.step} steps to go)...")
    batches = epoch_batches(t.start, cfg.epochs, t.dataset, t.sampler, run.micro_batch * run.accum,
                            cfg.num_workers, t.collate, device, cfg.global_seed)
    pos, error = t.start, None
    for epoch, done, batch in batches:
        if pos.step >= t.total_steps:
            break
        out = t.step(batch, pos.step + 1)
        pos = Position(pos.step + 1, epoch, done)
        guard.update(out.skipped)
        averager.add(out.logs)
        throughput.update(out.samples * run.info.world_size)

        if pos.step % cfg.log_every == 0 or pos.step == t.total_steps:
            check = guard.check()
            avg = {**averager.reduce(), **t.status(), "nonfinite_steps": check.skipped}
            report(log, writer, run.metrics_file, pos.step, t.total_steps, epoch, avg,
                   throughput.report(t.total_steps - pos.step), t.progress_parts(avg, check.skipped))
            if check.error:
                error = check.error
                break
        t.after_step(pos, batch, out, writer)
        stopping = stop.requested()
        checkpoints.after_step(pos, stopping)
        if stopping:
            stop.announce(log, pos.step)
            break
    return finish_run(pos, error, checkpoints, (writer, stop), log)


# ---------------------------------------------------------------------------------------------- checkpoints
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
        raise RunError(error)
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
        raise RunError(error)
    path = checkpoints.last(pos)
    for thing in closing:
        thing.close()
    log.info("Done!")
    cleanup()
    return path
