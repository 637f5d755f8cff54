"""Vector quantizer with an l2-normalised codebook (LlamaGen / FQGAN style).

The nearest-code search runs over bounded row chunks, so encoding never materialises the whole
(positions x codebook) distance matrix: 64 images at 256x256 with VQ-16 are 16384 positions, and a 16384-entry
codebook would otherwise need a 1 GiB matrix per factor. Training with the entropy loss needs the full
softmax over codes anyway, so there the matrix is built once and shared by the search and the loss.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

USAGE_WINDOW = 65536  # length of the released checkpoints' ``codebook_used`` buffer
SEARCH_CHUNK_ELEMENTS = 1 << 24  # distance-matrix elements per search chunk (64 MiB in float32)


class QuantizerOutput(NamedTuple):
    quant: torch.Tensor  # (B, D, h, w) codes, with a straight-through gradient to the encoder
    indices: torch.Tensor  # (B, h, w) int64 code indices
    codebook_loss: Optional[torch.Tensor]  # training only
    commit_loss: Optional[torch.Tensor]  # training only, already times beta
    entropy_loss: Optional[torch.Tensor]  # training only, already times the entropy ratio
    usage: torch.Tensor  # () fraction of the codebook seen in the recent-usage window (training only, else 0)


def entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-sample entropy of softmax(affinity / T) minus the entropy of the batch-average distribution.

    Minimising it makes each position confident about its code while spreading the batch over the codebook.
    The 1e-5 offsets reproduce the original formula exactly (including the one inside log_softmax, which
    is a no-op up to rounding)."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int = 16384, code_dim: int = 8, beta: float = 0.25,
                 entropy_ratio: float = 0.0, l2_norm: bool = True, entropy_temperature: float = 0.01):
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.entropy_ratio = entropy_ratio
        self.entropy_temperature = entropy_temperature
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, code_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # The last USAGE_WINDOW indices seen in training; part of the released state dict.
        self.register_buffer("codebook_used", torch.zeros(USAGE_WINDOW))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def _distances(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # ||z||^2 + ||e||^2 - 2 z.e, in the original's order of operations (near-ties resolve identically).
        # On a GPU the product runs in float64: with TF32 allowed (the evaluation scripts allow it for speed)
        # PyTorch runs float32 matmuls with 10-bit mantissas, which flips near-tie codes; float64 is never
        # TF32, and with 8-dimensional codes it costs next to nothing.
        dot = (z.double() @ e.double().t()).to(z.dtype) if z.is_cuda else z @ e.t()
        return torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1) - 2 * dot

    @torch.no_grad()
    def nearest(self, z: torch.Tensor, e: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Index of the nearest code for each row of ``z`` (N, D), searched in bounded chunks."""
        e = self.codebook() if e is None else e
        rows = max(1, SEARCH_CHUNK_ELEMENTS // e.shape[0])
        return torch.cat([self._distances(part, e).argmin(dim=1) for part in z.split(rows)]) if len(z) else \
            torch.zeros(0, dtype=torch.long, device=z.device)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> codes (B, D, h, w)."""
        if indices.min() < 0 or indices.max() >= self.codebook_size:
            raise ValueError(f"code indices must lie in [0, {self.codebook_size}); got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return self.codebook()[indices].permute(0, 3, 1, 2)

    @torch.no_grad()
    def _track_usage(self, indices: torch.Tensor) -> torch.Tensor:
        n = indices.numel()
        buf = self.codebook_used
        if n >= buf.numel():
            buf.copy_(indices[-buf.numel():].to(buf.dtype))
        else:
            buf.copy_(torch.cat([buf[n:], indices.to(buf.dtype)]))
        # Like the original, the window starts zero-filled, so code 0 counts as used until it is flushed out.
        # Distinct codes counted with a scatter (a fixed-size result, unlike torch.unique): no host sync and no
        # graph break under torch.compile.
        seen = torch.zeros(self.codebook_size, device=buf.device).index_fill_(0, buf.long(), 1.0)
        return seen.mean()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        # Always in float32, also under bf16 / fp16 autocast: nearest-code search among 16384 unit vectors
        # and the entropy softmax at temperature 0.01 are too sensitive for 8-bit mantissas.
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        z = z.permute(0, 2, 3, 1)
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        flat = z.reshape(-1, d)
        e = self.codebook()
        losses = (None, None, None)
        usage = flat.new_zeros(())
        if self.training:
            if self.entropy_ratio:
                dist = self._distances(flat, e)
                indices = dist.detach().argmin(dim=1)
                ent = self.entropy_ratio * entropy_loss(-dist, self.entropy_temperature)
            else:
                indices = self.nearest(flat.detach(), e.detach())
                ent = flat.new_zeros(())
            zq = e[indices].view_as(z)
            losses = (torch.mean((zq - z.detach()) ** 2), self.beta * torch.mean((zq.detach() - z) ** 2), ent)
            usage = self._track_usage(indices)
        else:
            indices = self.nearest(flat, e)
            zq = e[indices].view_as(z)
        zq = z + (zq - z).detach()  # straight-through estimator
        return QuantizerOutput(zq.permute(0, 3, 1, 2), indices.view(b, h, w), *losses, usage)
