"""Where a training run starts from: its own newest checkpoint (requeue-safe), one named on the command line, or
nothing; the flags a resumed run may not change; and the exact position in the data (epoch, batch, every rank's
RNG) that a checkpoint resumes at. Both trainers resume through ``resume_run``."""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from utils.checkpoint import CheckpointError, extract_weights, load_file
from utils.distributed import get_world_size
from utils.flags import fields_where, flag_name
from utils.rng import restore_rng_state

CKPT_RE = re.compile(r"^(?P<step>\d+)\.pt$")
WEIGHTS_FIRST = ("model", "ema", "state_dict")  # a training checkpoint's own weights, then what else it has


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
class Position:
    """Where a run is: optimisation steps done, and the epoch / batch within it that the next step reads."""
    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class Resume:
    """What a run starts from: nothing, a checkpoint of its own folder, or one named on the command line.
    ``exact``: continue it (position, RNG, optimizer); False for a fine-tune seed (its weights only)."""
    path: Optional[str] = None
    ckpt: Optional[dict[str, Any]] = None
    own: bool = False  # one of this run folder's checkpoints: always resumed exactly (never a fine-tune seed)
    exact: bool = True

    @property
    def found(self) -> bool:
        return self.ckpt is not None

    def weights(self) -> dict:
        return extract_weights(self.ckpt, self.path, prefer=WEIGHTS_FIRST)[0]

    def ema_weights(self) -> dict:
        return self.ckpt.get("ema") or self.weights()

    def load_states(self, objects: Mapping[str, Any], log: logging.Logger) -> None:
        """Each object's ``load_state_dict`` from the checkpoint entry of its name (optimizers, discriminator);
        one the file lacks starts fresh, with a warning."""
        for name, obj in objects.items():
            if name in self.ckpt:
                obj.load_state_dict(self.ckpt[name])
            else:
                log.warning(f"{self.path} has no '{name}'; it starts fresh")

    def position(self, steps_per_epoch: int, scalers: Mapping[str, Any],
                 log: logging.Logger) -> tuple[Position, dict[str, Any]]:
        """The position to continue at (step 0 for a fine-tune seed) and the checkpoint's resume state."""
        if not self.exact:
            return Position(), {}
        return restore_position(self.ckpt, steps_per_epoch, scalers, log)

    def announce(self, start: Position, log: logging.Logger) -> None:
        note = ("" if self.exact else " (finetune: step counter reset)" if resumable(self.ckpt)
                else " (a weights-only file, not a training checkpoint: its weights only, step 0, a fresh optimizer)")
        log.info(f"Resumed from {self.path}: step {start.step}, epoch {start.epoch}, batch {start.batch}" + note)


def resumable(ckpt: Any) -> bool:
    """A training checkpoint (ours, or the original code's: weights, optimizer and step count), not a weights-only
    or converted file, which would restart the run at step 0 with a fresh optimizer and then be overwritten."""
    return isinstance(ckpt, Mapping) and "steps" in ckpt and "optimizer" in ckpt


def find_resume(explicit: Optional[str], ckpt_dir: Path, exp_dir: Path, flag: str,
                log: logging.Logger) -> Resume:
    """The checkpoint a run starts from. A run folder with checkpoints of its own resumes from the newest one that
    loads and holds a resume state, whatever ``explicit`` (``flag``: --vq-ckpt / --gpt-ckpt, which only seed a
    fresh run) says: a job requeued with its first command line continues where it stopped. A checkpoint that
    fails to load (cut short by a crash) or is not resumable (weights only) is reported and the one before used."""
    own = run_checkpoints(ckpt_dir)
    for path in own:
        try:
            ckpt = load_file(path)
        except CheckpointError as e:
            log.warning(f"{e}; trying the checkpoint before it")
            continue
        if not resumable(ckpt):
            log.warning(f"{path} is not a resumable checkpoint of this run (no optimizer and step count: a "
                        f"weights-only file?); trying the checkpoint before it")
            continue
        log.info(f"{exp_dir} has checkpoints of its own: resuming from {path}"
                 + (f" ({flag} {explicit} only seeds a fresh run)" if explicit else ""))
        return Resume(str(path), ckpt, own=True)
    if own:
        raise CheckpointError(f"none of the {len(own)} checkpoints in {ckpt_dir} can be resumed from (see above); "
                              f"move them away to start afresh")
    return Resume(explicit, load_file(explicit)) if explicit else Resume()


def check_resumed_flags(ckpt: dict[str, Any], cfg: Any, path: str, log: logging.Logger) -> None:
    """Compare the flags a checkpoint of ours was trained with to this run's: a field declared ``resume="fixed"``
    (batch size, image size, seed, architecture) that changed is refused in one line, since the saved position
    and weights would be read with another meaning; other changes are printed (``resume="ignored"`` ones not)."""
    saved = ckpt.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if "resume" not in ckpt or not isinstance(saved, dict):  # a released checkpoint: no exact resume to protect
        return
    skip = set(fields_where(cfg, resume="ignored"))
    changed = {k: (saved[k], v) for k, v in sorted(vars(cfg.namespace()).items())
               if k in saved and saved[k] != v and k not in skip}
    refused = [k for k in fields_where(cfg, resume="fixed") if k in changed]
    name = lambda k: flag_name(k, type(cfg))  # noqa: E731
    if refused:
        raise ValueError(f"{path} was trained with " + ", ".join(f"{name(k)} {changed[k][0]}" for k in refused)
                         + "; resuming it with " + ", ".join(f"{name(k)} {changed[k][1]}" for k in refused)
                         + " would change the data stream or the model: use the original values or a new "
                           "--exp-name")
    if changed:
        log.info("Changed since the checkpoint: " + ", ".join(f"{name(k)} {a} -> {b}" for k, (a, b) in changed.items()))


def resume_run(cfg: Any, ckpt_dir: Path, exp_dir: Path, explicit: Optional[str], flag: str, log: logging.Logger,
               finetune: bool = False) -> Resume:
    """Find what a run resumes from (``find_resume``) and, when it continues it exactly (always for the run's own
    checkpoints; not for a ``finetune`` seed, nor for a weights-only file, which has no position to continue),
    check the flags that may not change."""
    resume = find_resume(explicit, ckpt_dir, exp_dir, flag, log)
    resume.exact = resume.own or (not finetune and resumable(resume.ckpt))
    if resume.found and resume.exact:
        check_resumed_flags(resume.ckpt, cfg, resume.path, log)
    return resume


def restore_position(ckpt: dict[str, Any], steps_per_epoch: int, scalers: Mapping[str, Any],
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
    written_by, world = state.get("world_size"), get_world_size()
    if written_by is not None and written_by != world:
        logger.warning(f"the checkpoint was written by {written_by} processes and this run has {world}: the data "
                       f"order continues exactly (it does not depend on the number of processes), but each rank's "
                       f"random stream (dropout masks, label dropout) starts afresh")
    elif not restore_rng_state(state.get("rng")):
        logger.warning("world size changed since the checkpoint: RNG streams start afresh")
    return Position(steps, state["epoch"], state["batch_in_epoch"]), state
