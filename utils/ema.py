"""Exponential moving average of model weights."""
from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn as nn


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)


def requires_grad(model: nn.Module, flag: bool = True) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def new_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` in eval mode, to follow it with ``update_ema``."""
    ema = deepcopy(model).eval()
    requires_grad(ema, False)
    return ema
