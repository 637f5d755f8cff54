"""What a training loop reports at a logging step: averaged metrics, speed, an ETA, and where they go
(console / log file, TensorBoard, ``metrics.jsonl``)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from utils.distributed import all_reduce_mean
from utils.runfiles import write_text_atomic

Scalar = Union[torch.Tensor, float, int]


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
    """Per-step scalars averaged over a logging window, then over ranks.

    ``add`` takes tensors as they come out of a step and keeps the sums on the device, so a training step never
    waits for the GPU; ``reduce`` (collective: every rank calls it at the same step with the same keys) reads
    them all back with one transfer. A key averages over the steps that reported it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, Scalar]) -> None:
        for k, v in values.items():
            v = v.detach().to(self.device, torch.float64) if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def reduce(self) -> dict[str, float]:
        keys = sorted(self.sums)
        local = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64, device=self.device).reshape(())
                             / self.counts[k] for k in keys])
        out = dict(zip(keys, all_reduce_mean(local).tolist()))
        self.sums.clear()
        self.counts.clear()
        return out


def progress_line(step: int, total: int, epoch: int, parts: list[str], speed: dict[str, float]) -> str:
    """``(step=0000100/0200000 epoch=1) loss=... | 2.31 steps/s 590.1 img/s | ETA 1d 02:03:04``."""
    return (f"(step={step:07d}/{total:07d} epoch={epoch}) " + " ".join(parts) +
            f" | {speed['steps_per_s']:.2f} steps/s {speed['images_per_s']:.1f} img/s | "
            f"ETA {format_duration(speed['eta_s'])}")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(path: Path, step: int) -> int:
    """Keep the lines of ``metrics.jsonl`` up to ``step`` (the checkpoint a run resumes from): a run killed after
    its last checkpoint logged steps that the resumed run logs again. A line cut short by the kill goes too.
    Rewritten atomically; returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
        except ValueError:
            keep = False
        kept += [line] if keep else []
        dropped += not keep
    if dropped:
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


def report(logger: logging.Logger, writer, jsonl: Path | None, step: int, total: int, epoch: int,
           avg: dict[str, float], speed: dict[str, float], parts: list[str]) -> None:
    """One logging point: TensorBoard scalars, the console / log-file progress line, and (rank 0, ``jsonl``
    not None) a line of ``metrics.jsonl``."""
    writer.scalars({f"train/{k}": v for k, v in avg.items()}, step)
    writer.scalars({f"speed/{k}": speed[k] for k in ("steps_per_s", "images_per_s")}, step)
    logger.info(progress_line(step, total, epoch, parts, speed))
    if jsonl is not None:
        append_jsonl(jsonl, {"step": step, **avg})
