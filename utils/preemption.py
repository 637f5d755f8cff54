"""Stopping a training run on a preemption signal or Ctrl-C: every rank finishes its step, a checkpoint is
written, and the command that resumes is printed."""
from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from utils.distributed import get_world_size, is_distributed


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
