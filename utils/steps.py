"""The pieces of one optimisation step that both training loops share: mixed precision, gradient accumulation,
clipping, and skipping a step whose gradients are not finite - all without waiting for the GPU."""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator, NamedTuple, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from utils.flags import DTYPES, precision


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16 / fp16 autocast on CUDA (``mixed_precision`` in utils.flags' vocabulary); on CPU training runs in
    fp32 (CPU autocast is slow and rarely helps)."""
    name = precision(mixed_precision)
    if device.type != "cuda" or name == "fp32":
        return nullcontext
    return lambda: torch.autocast("cuda", dtype=DTYPES[name])


def grad_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and precision(mixed_precision) == "fp16")


def fused_kwargs(optimizer_class: type) -> dict:
    """``fused=True`` where the optimizer has it: one kernel for the whole update, and (what ``optimizer_step``
    relies on) a step that can be skipped on the device."""
    return {"fused": True} if "fused" in inspect.signature(optimizer_class).parameters else {}


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


def accumulation(module: torch.nn.Module, chunks: Iterable) -> Iterator[tuple[object, object]]:
    """(chunk, context) for each micro-batch: the context defers DDP's gradient all-reduce (``no_sync``) or
    FSDP's reduce-scatter until the last chunk, so accumulated gradients are synchronised once per step."""
    chunks = list(chunks)
    for j, chunk in enumerate(chunks):
        last = j == len(chunks) - 1
        if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
            module.set_requires_gradient_sync(last)
            yield chunk, nullcontext()
        elif isinstance(module, DDP) and not last:
            yield chunk, module.no_sync()
        else:
            yield chunk, nullcontext()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, parameters,
                   max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale, clip to ``max_grad_norm`` (0: no clipping), and step - unless the gradients are not finite (a
    NaN / inf loss or gradient), in which case the update is skipped. Returns (gradient norm, skipped) as
    0-d device tensors: nothing here reads a value back to the host.

    The skip happens on the device: fused optimizers take a ``found_inf`` flag (the mechanism fp16 grad scaling
    uses) and leave parameters, moments and step counts untouched when it is set."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    skipped = ~torch.isfinite(grad_norm)
    if scaler.is_enabled():
        scaler.step(optimizer)  # fp16: the scaler skips non-finite steps itself
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = skipped.float()
        optimizer.step()
        del optimizer.found_inf
    elif not skipped.item():  # an optimizer without the device-side skip: one host sync
        optimizer.step()
    scaler.update()
    return grad_norm.detach(), skipped


class NonFiniteCheck(NamedTuple):
    skipped: int  # steps skipped since the last check
    error: Optional[str]  # set once too many steps in a row were skipped: the run is diverging


class NonFiniteGuard:
    """Counts the steps ``optimizer_step`` skipped, on the device. ``check`` (at logging steps, where the loop
    reads values anyway) reports them, and an error once ``limit`` steps in a row were skipped."""

    def __init__(self, device: torch.device, limit: int):
        self.limit = limit
        self.skipped = torch.zeros((), device=device)  # since the last check
        self.streak = torch.zeros((), device=device)   # consecutive skipped steps up to now
        self.longest = torch.zeros((), device=device)  # longest streak seen since the last check

    def update(self, skipped: torch.Tensor) -> None:
        s = skipped.float()
        self.skipped += s
        self.streak = (self.streak + s) * s
        self.longest = torch.maximum(self.longest, self.streak)

    def check(self) -> NonFiniteCheck:
        skipped, longest = (int(v) for v in torch.stack([self.skipped, self.longest]).tolist())
        self.skipped.zero_()
        self.longest.zero_()  # a streak still going on keeps counting from where it is
        error = None
        if self.limit and longest >= self.limit:
            error = (f"{longest} optimizer steps in a row had a non-finite loss or gradient (--max-nonfinite-steps "
                     f"{self.limit}): the run is diverging; stopped without writing a checkpoint, the last one is "
                     "intact")
        return NonFiniteCheck(skipped, error)
