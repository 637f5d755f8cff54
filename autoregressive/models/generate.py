"""Sampling images' codes from FAR with static KV caches and classifier-free guidance.

One image position costs one trunk step plus F factor-head steps:

    prefill: class token -> trunk -> h
    for every position t:
        x = h
        for factor j in 0..F-1:  logits = head_step(x, j); guide; sample code j; x = embedding_j(code j)
        h = trunk_step(aggregate(codes of t))

Guidance batches the conditional and the unconditional (null class) rows together, so each step is ONE
forward pass over 2B rows: logits = uncond + scale * (cond - uncond), with a scale per factor. Both caches are
allocated once per generation (and kept for the next one if the shape matches); the factor head's cache holds
just F steps and is simply overwritten at every position, because step j writes slot j before any query can
read it. Decode steps have static shapes, so ``compile=True`` (torch.compile; CUDA graphs on a GPU) applies.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .far import FAR

PerFactor = Union[float, int, Sequence[float], Sequence[int]]


def per_factor(value: PerFactor, num_factors: int, name: str, kind=float) -> tuple:
    """A scalar for every factor, or one value per factor (factor order: visual first)."""
    if isinstance(value, (int, float)):
        return (kind(value),) * num_factors
    values = tuple(kind(v) for v in value)
    if len(values) != num_factors:
        raise ValueError(f"{name} has {len(values)} values but the model has {num_factors} factors")
    return values


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One code per row of logits (B, V): temperature, then top-k, then nucleus (top-p) filtering.
    ``temperature == 0`` or ``top_k == 1`` is greedy (argmax)."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # the mass before this code already exceeds top_p (keeps the 1st)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i, like
    # torch.multinomial, but without a host sync (it stays inside a CUDA graph).
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(-1)


def decode_position(model: FAR, h: torch.Tensor, scales: tuple, doubled: bool, temperature: tuple,
                    top_k: tuple, top_p: tuple, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample the F codes of one position from the trunk output h (rows, 1, D); returns (B, F).
    With ``doubled`` the rows are [conditional; unconditional] and both get the sampled codes."""
    codes = []
    x = h
    for j in range(model.config.num_factors):
        logits = model.head_step(x, j)
        if doubled:
            cond, uncond = logits.chunk(2)
            logits = cond if scales[j] == 1.0 else uncond + (cond - uncond) * scales[j]
        code = sample(logits, temperature[j], top_k[j], top_p[j], generator)
        codes.append(code)
        if j + 1 < model.config.num_factors:
            x = model.tok_embedding(j)((code.repeat(2) if doubled else code)[:, None])
    return torch.stack(codes, dim=1)


def next_hidden(model: FAR, codes: torch.Tensor, input_pos: torch.Tensor, kv_len: Optional[int] = None):
    """Feed the codes (rows, F) of one position to the trunk; its output predicts the next position."""
    return model.trunk_step(model.embed_position(codes), input_pos, kv_len)


_compiled: dict = {}


def _maybe_compile(fn, device: torch.device):
    mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs where they pay
    key = (fn, mode)
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, mode=mode, dynamic=False)
    return _compiled[key]


@torch.no_grad()
def generate(model: FAR, labels: Union[torch.Tensor, Sequence[int]], num_positions: Optional[int] = None, *,
             cfg_scale: PerFactor = 1.0, cfg_interval: float = -1, temperature: PerFactor = 1.0,
             top_k: PerFactor = 0, top_p: PerFactor = 1.0, generator: Optional[torch.Generator] = None,
             compile: bool = False) -> torch.Tensor:
    """Sample codes for class ``labels`` (B,); returns (B, num_positions, F) int64, factor order as in training.

    cfg_scale, temperature, top_k, top_p: one value for all factors or a sequence of F values.
    Guidance is on when any scale differs from 1 (a factor with scale 1 uses its conditional logits).
    cfg_interval: as in LlamaGen, -1 guides every position; otherwise positions t > cfg_interval + 1 use the
    conditional logits only (the unconditional rows are still computed, keeping shapes static).
    num_positions: defaults to the full image (block_size); fewer gives a prefix (benchmarks, tests).
    The model runs in eval mode; its previous mode is restored afterwards.
    """
    cfg = model.config
    Fn = cfg.num_factors
    device = model.aggregation_layer.weight.device
    labels = torch.as_tensor(labels, device=device)
    model.check_labels(labels)
    scales = per_factor(cfg_scale, Fn, "cfg_scale")
    temps = per_factor(temperature, Fn, "temperature")
    ks = per_factor(top_k, Fn, "top_k", int)
    ps = per_factor(top_p, Fn, "top_p")
    if any(t < 0 for t in temps):
        raise ValueError(f"temperature must be >= 0, got {temps}")
    doubled = any(s != 1.0 for s in scales)
    if doubled and not cfg.has_null_class:
        raise ValueError("classifier-free guidance needs the null class, but this model was built with "
                         "class_dropout_prob=0 (no null class row)")
    T = cfg.block_size if num_positions is None else int(num_positions)
    if not 1 <= T <= cfg.block_size:
        raise ValueError(f"num_positions must be in [1, {cfg.block_size}], got {T}")

    B = labels.shape[0]
    cond = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if doubled else labels
    was_training = model.training
    model.eval()
    model.setup_caches(cond.shape[0])
    step, trunk = decode_position, next_hidden
    if compile:
        step, trunk = _maybe_compile(decode_position, device), _maybe_compile(next_hidden, device)
    unguided = (1.0,) * Fn
    C = cfg.cls_token_num
    positions = torch.arange(C, C + T, device=device)  # sequence position of each grid position's codes
    out = torch.empty(B, T, Fn, dtype=torch.long, device=device)
    try:
        h = model.trunk_step(model.cls_embedding(cond)[:, None], torch.arange(C, device=device))[:, -1:]
        for t in range(T):
            if t > 0:
                h = trunk(model, codes, positions[t - 1:t], None if compile else C + t)
            guided = cfg_interval < 0 or t <= cfg_interval + 1
            new = step(model, h, scales if guided else unguided, doubled, temps, ks, ps, generator)
            out[:, t] = new
            codes = new.repeat(2, 1) if doubled else new.clone()  # a CUDA-graph output is overwritten on replay
    finally:
        model.train(was_training)
    return out
