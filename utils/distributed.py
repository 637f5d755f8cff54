"""torch.distributed set-up that works the same under ``torchrun`` (NCCL on GPUs, gloo on CPUs) and as a
plain single ``python`` process (no process group at all; every collective below degrades to a no-op)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun, choose this process's device, and return who we are.

    ``device`` forces ``"cpu"`` or ``"cuda"``; by default CUDA is used when present. The backend follows the
    device: NCCL for CUDA, gloo for CPU."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if launched_by_torchrun() and not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30), **kwargs)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistInfo(0, 1, 0, dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t).div_(get_world_size())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
