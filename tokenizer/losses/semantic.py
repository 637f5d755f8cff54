"""Semantic supervision of a factor: InfoNCE between its feature-prediction head and a frozen teacher.

For a batch of B images, the head's class token of image i should be closer (in cosine similarity) to the
teacher's class token of image i than to the teacher's tokens of the other images. This is the original's
formulation exactly:

* both class tokens l2-normalised;
* logits = cosine similarities, temperature 1 (no learnable or fixed logit scale): each logit lies in
  [-1, 1], so the loss never goes below log(1 + (B - 1) / e^2) (positive pair at +1, all others at -1) and
  a batch of 128 keeps it above 2.9 - a plateau, not a bug;
* one direction only: rows are the head's tokens, columns the teacher's, the target of row i is column i
  (``labels = arange(B)``), averaged over rows;
* the teacher side is detached (the teacher is frozen anyway; this also keeps its features out of the graph).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Student (B, W) vs teacher (B, W) class tokens -> scalar InfoNCE (cross-entropy of row i towards column i).

    Computed in float32 whatever the autocast dtype: the softmax over B cosines is cheap and bf16 would round
    the similarities to ~3 significant digits."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"InfoNCE needs matching (B, W) features, got {tuple(student.shape)} (head) and "
                         f"{tuple(teacher.shape)} (teacher)")
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    logits = (s @ t.T) / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def head_class_token(head_features: torch.Tensor) -> torch.Tensor:
    """A feature-prediction head's output (B, 1 + hw, W) -> its class token (B, W)."""
    return head_features[:, 0]
