"""Single-query decode attention: how ONE query per (row, head) attends to a static KV cache.

Decoding FAR asks, at every position, for softmax(q k^T / sqrt(d)) v with one query per (row, head) against
the filled part of a static cache. The work is reading the cache; the arithmetic is tiny. Every kernel here
has the same contract:

    decode_attention(kernel, q, k, v, length) -> (B, H, 1, d)
        q: (B, H, 1, d); k, v: (B, H_kv, L, d) (the whole static cache; H a multiple of H_kv: grouped-query
        heads read their K/V head without copies where the kernel allows); length: None (all L entries) or
        an int64 tensor of one element, the number of FILLED entries, 1 <= length <= L. The length is data
        on the device, not a Python int: one compiled graph (and one CUDA graph) serves every position.
        Entries at and beyond ``length`` are masked out, whatever they hold.

The kernels (``ATTENTION_KERNELS``, chosen with ``generate(..., attention=NAME)``):

* ``"sdpa"``: ``F.scaled_dot_product_attention`` with a boolean mask over the whole cache. Reads all L
  entries at every position (the cost of the last position, always); on a GPU a mask rules out the flash
  kernel, so the memory-efficient one runs. The default until the others have been measured on a GPU.
  (Eager generation slices the cache to its filled entries first and passes no length: no mask, no waste.)
* ``"reductions"``: two plain reductions (scores over d, then the weighted sum over L) with the mask; compiled
  by inductor they read K once and V once, without the fused kernels' 64-128-query tiles. Also whole-cache.
* ``"flex"``: ``torch.nn.attention.flex_attention`` with a block mask built inside the (compiled) function from
  the length tensor, KV blocks of 16: blocks past the length are skipped, not read. Grouped-query heads are
  native (``enable_gqa``). Meant to run compiled (eagerly flex runs an unfused reference implementation).
* ``"triton"``: a split-KV single-query Triton kernel (``split_kv_attention``): program (row * KV head, split)
  reads the filled 16-key blocks of its slice of the cache once for all the query heads of that KV head
  (grouped-query heads), keeping a running max / sum / weighted sum per head in float32 (the keys are split
  into slices of 64 only when (row, KV head) pairs are too few to fill the device: ``ENOUGH_PROGRAMS``);
  the slices are combined with their log-sum-exp weights. It is the custom op ``fqgan::split_kv_attention``
  (with a fake implementation), so it sits inside ``torch.compile(fullgraph=True)`` graphs and CUDA graphs as
  one opaque call. On a CPU it runs under Triton's interpreter when ``TRITON_INTERPRET=1`` (tests), else the
  same split-KV algorithm in plain torch. A head dim that is not a power of two (GPT-3B's 100) is padded to
  one inside the kernel (masked loads: the padding costs lanes, not memory traffic).

Block-wise kernels read whole blocks of 16; the trunk's cache length is rounded up to a multiple of 16
(``far.cache_length``), so the last block is always inside the buffer.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

ATTENTION_KERNELS = ("sdpa", "reductions", "flex", "triton")
KV_BLOCK = 16      # keys per block: the flex block mask's KV block, the Triton kernel's inner tile
SPLIT_KV = 64      # keys per Triton program (split-KV): 4 blocks
ENOUGH_PROGRAMS = 2048  # (row, KV head) pairs that fill a GPU without splitting the keys (one split each)


def check_kernel(kernel: str) -> str:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    return kernel


def _valid(length: Optional[torch.Tensor], L: int, device) -> Optional[torch.Tensor]:
    """(L,) bool: which cache entries are filled (None: all)."""
    if length is None:
        return None
    return torch.arange(L, device=device) < length.reshape(())


# ------------------------------------------------------------------------------------------------------------
# sdpa and reductions: the whole cache, masked
# ------------------------------------------------------------------------------------------------------------
def sdpa_attention(q, k, v, length=None):
    H, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != H:
        k = k.repeat_interleave(H // kv_heads, dim=1)
        v = v.repeat_interleave(H // kv_heads, dim=1)
    valid = _valid(length, k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if valid is None else valid.view(1, 1, 1, -1))


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           length: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for ONE query per (row, head) as two reductions, scores and probabilities in
    float32 (float64 inputs stay float64). Grouped-query heads broadcast, so K and V are not copied per head.
    Compiled by inductor it reads K once and V once; run eagerly it materialises (B, H, L, d) products."""
    B, H, _, d = q.shape
    kv_heads = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)  # bf16 / fp16 accumulate in float32, float64 stays
    q = q.to(acc).view(B, kv_heads, H // kv_heads, 1, d) * d ** -0.5   # (B, H_kv, G, 1, d)
    scores = (q * k[:, :, None].to(acc)).sum(-1)                         # (B, H_kv, G, L)
    valid = _valid(length, k.shape[2], q.device)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    probs = scores.softmax(-1)
    y = (probs[..., None] * v[:, :, None].to(acc)).sum(-2)               # (B, H_kv, G, d)
    return y.reshape(B, H, 1, d).to(v.dtype)


# ------------------------------------------------------------------------------------------------------------
# flex: the block mask from the length, inside the compiled function
# ------------------------------------------------------------------------------------------------------------
def flex_decode_attention(q, k, v, length=None):
    """FlexAttention over the filled KV blocks. The block mask is built here, from ``length`` (so inside the
    caller's compiled graph: no mask object crosses a graph boundary, and every length uses the same graph).
    The mask function compares with ``length - 1``'s view (a graph input's view, which the CPU template needs)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L = k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    # a buffer of its own: inductor's CPU template reads the query's layout as 4-D, and the rotary embedding's
    # output is a view of a 5-D one
    q = q.clone(memory_format=torch.contiguous_format)
    if length is None:
        return flex_attention(q, k, v, enable_gqa=gqa)
    n = length.reshape(())

    def filled(b, h, q_idx, kv_idx):
        return kv_idx < n

    # Query block: 1 on the CPU (inductor's CPU code for a padded 16-row query block does not compile in torch
    # 2.14), 16 on GPUs (the decoding kernel's query tile must divide it)
    q_block = 1 if q.device.type == "cpu" else 16
    mask = create_block_mask(filled, None, None, q.shape[2], L, device=q.device, BLOCK_SIZE=(q_block, KV_BLOCK))
    return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)


# ------------------------------------------------------------------------------------------------------------
# triton: split-KV single-query kernel as a custom op
# ------------------------------------------------------------------------------------------------------------
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_kernels: dict = {}


def _triton_kernel():
    """The Triton kernel, defined on first use (so ``TRITON_INTERPRET`` set before that first use decides
    whether it is interpreted); None without Triton."""
    key = _interpret()
    if key in _triton_kernels:
        return _triton_kernels[key]
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _triton_kernels[key] = None
        return None

    @triton.jit
    def split_kv_kernel(Q, K, V, LEN, M, S, ACC, stride_qb, stride_qh, stride_kb, stride_kh, stride_kl,
                        stride_vb, stride_vh, stride_vl, scale, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                        GROUP_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, BLOCK: tl.constexpr,
                        SPLIT: tl.constexpr, NSPLIT: tl.constexpr):
        # program (row * KV_HEADS + kv head, split): the GROUP query heads of one KV head, against the filled
        # entries of keys [split * SPLIT, (split + 1) * SPLIT); K and V are read once for the whole group.
        # Head channels are padded to D_P2 (Triton's blocks are powers of two; GPT-3B's heads have 100): the
        # padding reads zeros and is never stored
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // KV_HEADS
        kv_h = pid % KV_HEADS
        n = tl.load(LEN)
        lo = split * SPLIT
        hi = tl.minimum(lo + SPLIT, n)
        d = tl.arange(0, D_P2)
        d_ok = d < D
        g = tl.arange(0, GROUP_P2)
        g_ok = g < GROUP
        q_ptrs = Q + b * stride_qb + (kv_h * GROUP + g)[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale  # (G, D)
        k_base = K + b * stride_kb + kv_h * stride_kh
        v_base = V + b * stride_vb + kv_h * stride_vh
        m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
        s_i = tl.zeros([GROUP_P2], tl.float32)
        acc = tl.zeros([GROUP_P2, D_P2], tl.float32)
        for start in range(lo, hi, BLOCK):  # only the filled blocks of this slice are read
            offs = start + tl.arange(0, BLOCK)
            ok = offs < hi
            kv_ok = ok[:, None] & d_ok[None, :]
            kb = tl.load(k_base + offs[:, None] * stride_kl + d[None, :], mask=kv_ok, other=0.0)
            scores = tl.sum(q[:, None, :] * kb.to(tl.float32)[None, :, :], 2)                # (G, BLOCK)
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            vb = tl.load(v_base + offs[:, None] * stride_vl + d[None, :], mask=kv_ok, other=0.0)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vb.to(tl.float32)[None, :, :], 1)
            s_i = s_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = (b * KV_HEADS * GROUP + kv_h * GROUP + g) * NSPLIT + split                    # (G,)
        tl.store(M + out, m_i, mask=g_ok)
        tl.store(S + out, s_i, mask=g_ok)
        tl.store(ACC + out[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])

    _triton_kernels[key] = split_kv_kernel
    return split_kv_kernel


def _combine(m: torch.Tensor, s: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Merge per-split (max, sum, weighted sum) (..., NSPLIT[, d]): slices with nothing filled have max -inf
    and weight 0 (slice 0 always holds entry 0, so the overall max is finite)."""
    top = m.amax(-1, keepdim=True)
    w = torch.exp(m - top)
    return (acc * w[..., None]).sum(-2) / (s * w).sum(-1, keepdim=True)


def _split_kv_torch(q, k, v, length):
    """The kernel's algorithm in plain torch (CPU without the interpreter, or without Triton)."""
    B, H, _, d = q.shape
    L = k.shape[2]
    nsplit = -(-L // SPLIT_KV)
    pad = nsplit * SPLIT_KV - L
    acc_t = torch.promote_types(q.dtype, torch.float32)
    kp = F.pad(k, (0, 0, 0, pad)).to(acc_t).view(B, k.shape[1], 1, nsplit, SPLIT_KV, d)
    vp = F.pad(v, (0, 0, 0, pad)).to(acc_t).view(B, k.shape[1], 1, nsplit, SPLIT_KV, d)
    qg = q.to(acc_t).view(B, k.shape[1], H // k.shape[1], 1, 1, d) * d ** -0.5
    scores = (qg * kp).sum(-1)                                                   # (B, Hkv, G, NS, SPLIT)
    ok = torch.arange(nsplit * SPLIT_KV, device=q.device).view(nsplit, SPLIT_KV) < length.reshape(())
    scores = scores.masked_fill(~ok, float("-inf"))
    m = scores.amax(-1)
    p = torch.exp(scores - torch.where(torch.isinf(m), 0.0, m)[..., None])
    p = p.masked_fill(~ok, 0.0)
    acc = (p[..., None] * vp).sum(-2)
    y = _combine(m, p.sum(-1), acc)                                               # (B, Hkv, G, d)
    return y.reshape(B, H, 1, d).to(q.dtype)


@torch.library.custom_op("fqgan::split_kv_attention", mutates_args=())
def split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Split-KV single-query attention; see the module docstring. ``length``: int64, one element."""
    kernel = _triton_kernel() if (q.is_cuda or _interpret()) else None
    if kernel is None:
        return _split_kv_torch(q, k, v, length)
    B, H, _, d = q.shape
    L = k.shape[2]
    kv_heads = k.shape[1]
    group = H // kv_heads
    # Split the keys only when (row, KV head) pairs are too few to fill the device: at FAR-B's 2048 rows one
    # program per pair reads all its filled blocks, and the partial results stay small
    split = SPLIT_KV if B * kv_heads < ENOUGH_PROGRAMS else -(-L // KV_BLOCK) * KV_BLOCK
    nsplit = -(-L // split)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    m = torch.empty(B * H, nsplit, device=q.device, dtype=torch.float32)
    s = torch.empty_like(m)
    acc = torch.empty(B * H, nsplit, d, device=q.device, dtype=torch.float32)
    length = length.reshape(1).to(torch.int64)
    # the query-head group padded to a power of two, at least 2 (no size-1 blocks in the kernel)
    group_p2 = max(2, 1 << (group - 1).bit_length())
    kernel[(B * kv_heads, nsplit)](q, k, v, length, m, s, acc, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                   k.stride(2), v.stride(0), v.stride(1), v.stride(2), d ** -0.5,
                                   KV_HEADS=kv_heads, GROUP=group, GROUP_P2=group_p2, D=d,
                                   D_P2=1 << (d - 1).bit_length(), BLOCK=KV_BLOCK, SPLIT=split, NSPLIT=nsplit)
    return _combine(m, s, acc).view(B, H, 1, d).to(q.dtype)


@split_kv_attention.register_fake
def _(q, k, v, length):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def triton_attention(q, k, v, length=None):
    if length is None:
        length = torch.full((1,), k.shape[2], dtype=torch.int64, device=q.device)
    return split_kv_attention(q, k, v, length)


# ------------------------------------------------------------------------------------------------------------
_KERNELS = {"sdpa": sdpa_attention, "reductions": single_query_attention, "flex": flex_decode_attention,
            "triton": triton_attention}


def decode_attention(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     length: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Single-query attention with the named kernel (see the module docstring)."""
    return _KERNELS[kernel](q, k, v, length)


def bytes_read(q: torch.Tensor, k: torch.Tensor, length: int) -> int:
    """The bytes a decode step must read at ``length`` filled entries: q, the filled K and V, the output."""
    B, kv_heads, _, d = k.shape
    return (2 * q.numel() + 2 * B * kv_heads * length * d) * q.element_size()


__all__ = ["ATTENTION_KERNELS", "KV_BLOCK", "SPLIT_KV", "bytes_read", "check_kernel", "decode_attention",
           "single_query_attention", "split_kv_attention"]
