"""FAR: the factorized autoregressive generator of FQGAN (arXiv 2411.16681), for any number of factors F.

An image is a 16x16 grid of positions; each position carries F codes, one per tokenizer factor (visual
first, then the semantic ones). FAR is LlamaGen's class-conditional GPT with two changes:

    class label ──> class token ┐
    codes[t] (F tokens) ──> F embeddings ──concat──> linear ──> trunk input at t+1
                                                              │
    trunk (RMSNorm, 2-D RoPE, SwiGLU blocks; causal over positions)
                                                              │ h[t]
    factor head (a small causal transformer over F steps, run at every position):
        step 0 input: h[t]                    -> output_1 -> logits of factor 1 (visual)
        step j input: embedding of factor j's code at t -> output_{j+1} -> logits of factor j+1

so the trunk models positions and the factor head models the factors inside one position.

LlamaGen's GPT (``GPT-B`` ... ``GPT-7B``) is FAR with one factor, no factor head (``ar_n_layer=0``) and no
aggregation layer: the code embedding enters the trunk as it is and the trunk's output goes through the norm to
the output layer. A config with one factor and no factor-head layer is that model (``FARConfig.is_gpt``; the
aggregation layer of a single embedding would only compose with it) and uses LlamaGen's names
(``tok_embeddings``, ``output``).

Parameter names are those of the released checkpoints (``tok_embeddings_1``, ``aggregation_layer``,
``layers.*``, ``ar_head.*``, ``output_1`` ...; LlamaGen's for a GPT), so a released state dict loads with
``load_state_dict`` and every file we write loads into the original code. Checkpoint helpers are in
``checkpoint.py``, sampling in ``generate.py``.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.factors import factor_count, factor_names

from .decode_attention import KV_BLOCK, decode_attention


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class FARConfig:
    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    n_kv_head: Optional[int] = None  # None: as many as n_head (no grouped-query attention)
    ar_n_layer: int = 3              # layers of the factor head
    multiple_of: int = 256           # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance; > 0 adds the null class
    cls_token_num: int = 1
    vocab_size: int = 16384
    block_size: int = 256            # positions per image (a square grid)
    num_factors: int = 2
    model_type: str = "c2i"

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"FARConfig: {msg}")
        if self.model_type != "c2i":
            fail(f"model_type {self.model_type!r} is not supported (only class-conditional 'c2i')")
        if self.cls_token_num != 1:
            fail(f"a class-conditional model has one class token, got cls_token_num={self.cls_token_num}")
        if self.num_factors < 1:
            fail(f"num_factors must be >= 1, got {self.num_factors}")
        if self.dim % self.n_head:
            fail(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            fail(f"head dim {self.head_dim} must be a multiple of 4 (2-D rotary embedding)")
        if self.n_head % self.kv_heads:
            fail(f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")
        if self.grid_size ** 2 != self.block_size:
            fail(f"block_size {self.block_size} is not a square number of positions")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def is_gpt(self) -> bool:
        """LlamaGen's GPT: one factor and no factor head, hence no aggregation layer and LlamaGen's names."""
        return self.num_factors == 1 and self.ar_n_layer == 0

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def factor_names(self) -> tuple[str, ...]:
        return factor_names(self.num_factors)

    def replace(self, **changes) -> "FARConfig":
        return dataclasses.replace(self, **changes)


# Sizes. FAR-B and FAR-L are the paper's (released checkpoints); FAR-T and FAR-S are for tests, demos and
# small experiments. All use 64-dimensional heads, like LlamaGen.
FAR_models = {
    "FAR-T": dict(n_layer=4, dim=256, n_head=4, ar_n_layer=1),
    "FAR-S": dict(n_layer=12, dim=768, n_head=12, ar_n_layer=2),
    "FAR-B": dict(n_layer=24, dim=1024, n_head=16, ar_n_layer=3),
    "FAR-L": dict(n_layer=36, dim=1280, n_head=20, ar_n_layer=4),
}
# LlamaGen's GPT sizes (one factor, no factor head): 64-dimensional heads but for GPT-3B (100) and GPT-7B (128).
# B ... XXL and 3B have released class-conditional checkpoints. GPT-T is not LlamaGen's: like FAR-T, it is for
# tests, demos and small experiments.
GPT_models = {
    "GPT-T": dict(n_layer=4, dim=256, n_head=4, ar_n_layer=0),
    "GPT-B": dict(n_layer=12, dim=768, n_head=12, ar_n_layer=0),
    "GPT-L": dict(n_layer=24, dim=1024, n_head=16, ar_n_layer=0),
    "GPT-XL": dict(n_layer=36, dim=1280, n_head=20, ar_n_layer=0),
    "GPT-XXL": dict(n_layer=48, dim=1536, n_head=24, ar_n_layer=0),
    "GPT-XXXL": dict(n_layer=48, dim=2560, n_head=40, ar_n_layer=0),
    "GPT-1B": dict(n_layer=22, dim=2048, n_head=32, ar_n_layer=0),
    "GPT-3B": dict(n_layer=24, dim=3200, n_head=32, ar_n_layer=0),
    "GPT-7B": dict(n_layer=32, dim=4096, n_head=32, ar_n_layer=0),
}
MODELS = {**FAR_models, **GPT_models}  # every named size, the --gpt-model choices


def far_config(name: str = "FAR-B", num_factors: int | str = 2, **overrides) -> FARConfig:
    """The config of a named size (``FAR-*``, or LlamaGen's ``GPT-*``, which have one factor); ``num_factors``
    is a count or a preset name ('single', 'dual', 'triple')."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {list(MODELS)}")
    count = factor_count(num_factors)
    if name in GPT_models and count != 1:
        raise ValueError(f"{name} is LlamaGen's single-codebook generator: it predicts 1 factor, not {count} "
                         f"(use a FAR-* size for {count}-factor codes)")
    return FARConfig(**{**MODELS[name], "num_factors": count, **overrides})


def size_name(cfg: FARConfig) -> Optional[str]:
    """The named size whose width, depths and heads ``cfg`` has (a GPT config only matches GPT names)."""
    table = GPT_models if cfg.is_gpt else FAR_models
    return next((n for n, s in table.items() if all(getattr(cfg, k) == v for k, v in s.items())), None)


def cache_length(cfg: FARConfig) -> int:
    """Entries of the trunk's KV cache: the class token(s) and every position, rounded up to a multiple of the
    decode kernels' KV block (16), so block-wise kernels always read whole blocks inside the buffer (the spare
    entries are never written and always masked)."""
    return find_multiple(cfg.cls_token_num + cfg.block_size, KV_BLOCK)


# ------------------------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# ------------------------------------------------------------------------------------------------------------
def rope_table(cfg: FARConfig) -> torch.Tensor:
    """(cls_token_num + block_size, head_dim // 2, 2) float32 (cos, sin) for every sequence position.

    Half of each head's channel pairs rotate with the row of the position, the other half with its column.
    The class token's rows are all ZERO (not the identity rotation): queries and keys at the class position
    are multiplied by 0, exactly as in LlamaGen / FAR, whose weights were trained that way. The factor head
    reuses the first F rows, so its step 0 (the trunk output) gets the zero rows too and step j >= 1 the
    rotation of grid position j - 1.
    """
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2, dtype=torch.float32) / half))  # (head_dim/4,)
    g = cfg.grid_size
    ang = torch.outer(torch.arange(g, dtype=torch.float32), inv_freq)                          # (g, head_dim/4)
    grid = torch.cat([ang[:, None, :].expand(g, g, -1), ang[None, :, :].expand(g, g, -1)], dim=-1)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)                       # (g*g, half, 2)
    return torch.cat([torch.zeros(cfg.cls_token_num, half, 2), table])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, T, H, head_dim) by rope (T, head_dim // 2, 2), in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)


# ------------------------------------------------------------------------------------------------------------
# Transformer blocks
# ------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in float32 even under bf16
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, cfg: FARConfig):
        super().__init__()
        hidden = cfg.ffn_hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """A static key/value cache (batch, kv_heads, length, head_dim). The buffers are not persistent, so they
    never reach a state dict, and their addresses stay fixed, which CUDA graphs need."""

    def __init__(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: FARConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, kv_len=None, kernel: str = "sdpa") -> torch.Tensor:
        """Without ``input_pos``: causal attention over x alone (training, teacher forcing). With it: x holds
        the sequence positions ``input_pos``; their keys/values go into the cache, and the queries attend to
        its first ``kv_len`` entries:

        * a tensor (int64, one element): the filled length as data. A single query then attends through the
          decode kernel ``kernel`` (``decode_attention``) over the whole static cache, masked beyond the
          length: one graph serves every length;
        * an int: the cache is sliced to that many entries (static), and a single query attends to all of
          them through ``kernel``;
        * None: the whole cache, restricted by ``mask`` (len(input_pos), cache length) when given (SDPA).
        """
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            if isinstance(kv_len, int):
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
            if T == 1 and mask is None:
                length = kv_len if isinstance(kv_len, torch.Tensor) else None
                y = decode_attention(kernel, q, k, v, length)
                return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, q_dim)))
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=input_pos is None,
                                           dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, q_dim)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


def _reused_region(fn):
    """Mark ``fn`` as a nested compile region (PyTorch >= 2.8; unchanged before): inside torch.compile its
    code is traced and lowered once, then stamped out for every call whose inputs look alike, instead of being
    lowered again each time. Eagerly it is a plain call."""
    region = getattr(torch.compiler, "nested_compile_region", None)
    if region is None:
        return fn
    if "max_reuse_entries" in inspect.signature(region).parameters:
        # Decoding needs one entry for the trunk's block and one per factor-head step; the default cap (8),
        # an error when exceeded, would refuse models with more than 7 factors
        return region(fn, max_reuse_entries=64)
    return region(fn)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: FARConfig, drop_path_p: float = 0.0):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop_path_p = drop_path_p

    def forward(self, x, rope, input_pos=None, mask=None, kv_len=None, kernel="sdpa"):
        h = self.attention(self.attention_norm(x), rope, input_pos, mask, kv_len, kernel)
        x = x + drop_path(h, self.drop_path_p, self.training)
        return x + drop_path(self.feed_forward(self.ffn_norm(x)), self.drop_path_p, self.training)

    @_reused_region
    def cached_step(self, x, rope, input_pos, mask, kv_len, kernel):
        """``forward`` with the KV cache (decoding). A compiled position step calls it for every layer, so it
        is a nested compile region: the trunk's block is lowered once for all its layers, the factor head's
        once per head step. Lowering each of FAR-B's 24 layers anew took about half of its compile time."""
        return self(x, rope, input_pos, mask, kv_len, kernel)


class LabelEmbedder(nn.Module):
    """Class embeddings; row ``num_classes`` is the null class used for classifier-free guidance, and labels
    are replaced by it with probability ``dropout_prob`` in training."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


# ------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------
def _ramp(top: float, n: int) -> list[float]:
    return [top * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class FAROutput(NamedTuple):
    logits: tuple[torch.Tensor, ...]   # F tensors (B, T, vocab_size), float32, factor order
    losses: Optional[torch.Tensor]     # (F,) cross-entropy per factor, when targets were given
    loss: Optional[torch.Tensor]       # their mean: the training loss


class FAR(nn.Module):
    def __init__(self, config: FARConfig):
        super().__init__()
        self.config = cfg = config
        Fn = cfg.num_factors
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        for f in range(Fn):
            setattr(self, self._embedding_name(f), nn.Embedding(cfg.vocab_size, cfg.dim))
        if not cfg.is_gpt:
            self.aggregation_layer = nn.Linear(Fn * cfg.dim, cfg.dim)  # mixes the F code embeddings of a position
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        # stochastic depth grows linearly with depth, from 0 to drop_path_rate, in trunk and head alike
        self.layers = nn.ModuleList(TransformerBlock(cfg, p) for p in _ramp(cfg.drop_path_rate, cfg.n_layer))
        self.ar_head = nn.ModuleList(TransformerBlock(cfg, p) for p in _ramp(cfg.drop_path_rate, cfg.ar_n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # shared by all factors, applied to the factor-head output
        for f in range(Fn):
            setattr(self, self._output_name(f), nn.Linear(cfg.dim, cfg.vocab_size, bias=False))
        self.register_buffer("rope", rope_table(cfg), persistent=False)
        self.initialize_weights()

    # -- parameters -------------------------------------------------------------------------------------------
    def initialize_weights(self):
        """LlamaGen's init: N(0, initializer_range) for linear and embedding weights, zero biases, and zero
        output layers, so an untrained model predicts the uniform distribution."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for f in range(self.config.num_factors):
            nn.init.zeros_(self.output_layer(f).weight)

    def _apply(self, fn, recurse=True):
        # Rebuild the rotary table after every move/cast: .to(bfloat16) would round it (the original keeps it
        # float32) and .to_empty() after a meta-device build would leave it uninitialised.
        super()._apply(fn, recurse)
        self.rope = rope_table(self.config).to(self.rope.device)
        return self

    def _embedding_name(self, f: int) -> str:
        return "tok_embeddings" if self.config.is_gpt else f"tok_embeddings_{f + 1}"

    def _output_name(self, f: int) -> str:
        return "output" if self.config.is_gpt else f"output_{f + 1}"

    def tok_embedding(self, f: int) -> nn.Embedding:
        """Embedding table of factor f (0-based: 0 is the visual factor)."""
        return getattr(self, self._embedding_name(f))

    def output_layer(self, f: int) -> nn.Linear:
        """Output layer (logits) of factor f."""
        return getattr(self, self._output_name(f))

    @property
    def device(self) -> torch.device:
        return self.cls_embedding.embedding_table.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.cls_embedding.embedding_table.weight.dtype

    def aggregate(self, embs: list[torch.Tensor]) -> torch.Tensor:
        """The trunk input of a position from its F code embeddings (a GPT's single embedding as it is)."""
        return embs[0] if self.config.is_gpt else self.aggregation_layer(torch.cat(embs, dim=-1))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(self.tok_embedding(f).weight.numel() for f in range(self.config.num_factors))
        return n

    # -- input checks ----------------------------------------------------------------------------------------
    # Shapes and dtypes are checked on every call: they are known without looking at the data. Values (codes in
    # the vocabulary, labels in range) need a look at the data, which on a GPU is a host sync and under
    # torch.compile a graph break: they are checked where inputs enter (the code store checks codes when it is
    # written and its vocabulary when it is opened, generate() checks labels), and ``forward`` checks them
    # itself only for CPU tensors in eager mode, where that costs nothing (and catches mistakes in notebooks).
    def check_codes(self, idx: torch.Tensor, values: bool = True) -> None:
        cfg = self.config
        if idx.dim() != 3 or idx.shape[-1] != cfg.num_factors:
            raise ValueError(f"FAR expects codes of shape (batch, positions, {cfg.num_factors}) for its "
                             f"{cfg.num_factors} factors {cfg.factor_names}, got shape {tuple(idx.shape)}")
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"FAR codes must be integer indices, got {idx.dtype}")
        if idx.shape[1] > cfg.block_size:
            raise ValueError(f"{idx.shape[1]} positions given, but the model holds at most {cfg.block_size}")
        if not values:
            return
        bad = (idx < 0) | (idx >= cfg.vocab_size)
        if bad.any():
            for f in range(cfg.num_factors):
                vals = idx[..., f][bad[..., f]]
                if vals.numel():
                    raise ValueError(
                        f"codes of factor {f + 1} ({cfg.factor_names[f]}) are outside the vocabulary "
                        f"[0, {cfg.vocab_size - 1}]: {vals.numel()} values in [{vals.min().item()}, "
                        f"{vals.max().item()}]")

    def check_labels(self, labels: torch.Tensor, allow_null: bool = True, values: bool = True) -> None:
        top = self.config.num_classes + (allow_null and self.config.has_null_class)
        if labels.dim() != 1 or labels.dtype.is_floating_point:
            raise ValueError(f"class labels must be an integer tensor of shape (batch,), got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        if values and labels.numel() and (labels.min() < 0 or labels.max() >= top):
            raise ValueError(f"class labels must lie in [0, {top - 1}], got values in "
                             f"[{labels.min().item()}, {labels.max().item()}]")

    # -- training / teacher forcing --------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, cond: torch.Tensor, targets: Optional[torch.Tensor] = None) -> FAROutput:
        """idx: (B, T, F) codes of the first T positions; cond: (B,) class labels (``num_classes`` = null).
        Returns the logits of every factor at every position t, predicted from the class and positions < t
        (and, inside position t, from the factors before it). ``targets`` (B, T, F) adds the losses; it is
        normally ``idx`` itself (entries equal to -100 are ignored)."""
        cfg = self.config
        values = idx.device.type == "cpu" and not torch.compiler.is_compiling()  # see "input checks"
        self.check_codes(idx, values)
        self.check_labels(cond, values=values)
        B, T, Fn = idx.shape
        embs = [self.tok_embedding(f)(idx[..., f]) for f in range(Fn)]           # F x (B, T, D)
        x = self.aggregate(embs)
        # position t sees the class token and the codes of positions < t
        h = torch.cat([self.cls_embedding(cond)[:, None], x[:, :-1]], dim=1)
        h = self.tok_dropout(h)
        rope = self.rope[:T]
        for layer in self.layers:
            h = layer(h, rope)
        if cfg.is_gpt:  # no factor head: the trunk's output predicts the one factor
            ctx = self.norm(h)[:, :, None]
        else:  # factor head: at each position a sequence [h_t, emb_1(code_1,t), ..., emb_{F-1}(code_{F-1},t)]
            ctx = torch.stack([h] + embs[:-1], dim=2).reshape(B * T, Fn, cfg.dim)
            rope = self.rope[:Fn]
            for layer in self.ar_head:
                ctx = layer(ctx, rope)
            ctx = self.norm(ctx).view(B, T, Fn, cfg.dim)
        logits = tuple(self.output_layer(f)(ctx[:, :, f]).float() for f in range(Fn))
        if targets is None:
            return FAROutput(logits, None, None)
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of the codes {tuple(idx.shape)}, got "
                             f"{tuple(targets.shape)}")
        losses = torch.stack([F.cross_entropy(logits[f].flatten(0, 1), targets[..., f].flatten())
                              for f in range(Fn)])
        return FAROutput(logits, losses, losses.mean())

    # -- cached decoding (used by generate.py) ---------------------------------------------------------------
    def setup_caches(self, batch_size: int, dtype: Optional[torch.dtype] = None,
                     device: Optional[torch.device] = None) -> None:
        """Allocate the static KV caches: the trunk's for the whole sequence (``cache_length``: rounded up to
        whole blocks of the decode kernels), the factor head's for its F steps (overwritten at every
        position). Caches of the right shape are kept, not reallocated."""
        cfg = self.config
        dtype = dtype or self.dtype
        device = device or self.device
        for layers, length in ((self.layers, cache_length(cfg)), (self.ar_head, cfg.num_factors)):
            for layer in layers:
                c = layer.attention.kv_cache
                shape = (batch_size, cfg.kv_heads, length, cfg.head_dim)
                if c is None or c.k.shape != shape or c.k.dtype != dtype or c.k.device != torch.device(device):
                    layer.attention.kv_cache = KVCache(*shape, dtype=dtype, device=device)

    def embed_position(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, F) codes of one position -> (B, 1, D) trunk input for the next position."""
        return self.aggregate([self.tok_embedding(f)(tokens[:, f:f + 1]) for f in range(self.config.num_factors)])

    def trunk_step(self, x: torch.Tensor, input_pos: torch.Tensor, kv_len=None,
                   kernel: str = "sdpa") -> torch.Tensor:
        """Run the trunk on x (B, S, D) at sequence positions input_pos (S,) with the cache; (B, S, D) out.
        Sequence position 0 is the class token, position p >= 1 holds the codes of grid position p - 1.

        ``kv_len``, the number of cache entries the queries attend to (decoding: input_pos + 1):
        * a tensor (int64, one element; S == 1): the filled length as data; the single query attends through
          the decode kernel ``kernel`` over the static cache, masked beyond it (``decode_attention``), so one
          compiled graph serves every position;
        * an int: the cache sliced to that length (for S == 1 it must be input_pos + 1: no mask needed);
        * None: the whole cache with a causal mask (the slow reference)."""
        S = x.shape[1]
        mask = None
        if kv_len is None or S > 1:
            length = kv_len if isinstance(kv_len, int) else self.layers[0].attention.kv_cache.k.shape[2]
            mask = torch.arange(length, device=x.device)[None, :] <= input_pos[:, None]
            kv_len = length
        rope = self.rope[input_pos]
        for layer in self.layers:
            x = layer.cached_step(x, rope, input_pos, mask, kv_len, kernel)
        return x

    def head_step(self, x: torch.Tensor, step: int, kernel: str = "sdpa") -> torch.Tensor:
        """Factor-head step ``step`` on x (B, 1, D): the trunk output for step 0, else the embedding of factor
        ``step - 1``'s code (see ``tok_embedding``). Returns the float32 logits (B, vocab) of factor ``step``.
        The step writes cache slot ``step`` and reads slots 0..step, all written at this position, so the
        cache never needs clearing between positions."""
        pos = torch.arange(step, step + 1, device=x.device)
        rope = self.rope[step:step + 1]
        for layer in self.ar_head:
            x = layer.cached_step(x, rope, pos, None, step + 1, kernel)
        return self.output_layer(step)(self.norm(x[:, -1])).float()
