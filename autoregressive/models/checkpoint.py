"""Reading and writing FAR weights in the released layout, and LlamaGen's GPT weights in LlamaGen's.

``FAR`` uses the released parameter names (``cls_embedding.embedding_table``, ``tok_embeddings_{1..F}``,
``aggregation_layer``, ``layers.{i}.*``, ``ar_head.{i}.*``, ``norm``, ``output_{1..F}``; a GPT LlamaGen's
``tok_embeddings``, ``layers.{i}.*``, ``norm``, ``output``), so no renaming is needed in either direction: a
file holds the model's own state dict and a released file loads with ``load_state_dict``. What these helpers
add is strictness with a single clear error for a file that does not fit (entries that are not weights, such as
LlamaGen's KV caches and rotary table, are dropped by name first), the config (stored in our files as
``"config"``; for released files inferred from the weights alone), and atomic saving.

Weights cannot tell the number of attention heads nor the token grid. For a file without a stored config they
come, in this order, from the training checkpoint's ``args`` (``gpt_model``; ``image_size`` /
``downsample_size``), from the caller (``gpt_model=``, ``n_head=``, ``block_size=``: the sampler's
``--gpt-model``, ``--image-size`` and ``--downsample-size``), from the size tables (the named size with the
file's width and depth: GPT-3B's 32 heads of 100) and last from the rule every other size follows
(64-dimensional heads; a 16x16 grid). ``model.loaded_from`` says which.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping, Optional

import torch

from utils.checkpoint import (MODEL_FIRST, CheckpointError, LoadedFrom, check_state_dict, extract_weights, load_file,
                              noting_stored_config, stored_config, write_checkpoint)
from utils.factors import preset_name

from .far import FAR, MODELS, FARConfig, find_multiple, rope_table, size_name

# Entries of a generator's state dict that are not weights: LlamaGen's KV caches (persistent buffers once its
# sampler has set them up), its rotary table and causal mask. Dropped by name, before the strict check.
RUNTIME_ENTRIES = re.compile(r"(^|\.)(freqs_cis|causal_mask)$|\.kv_cache\.[kv](_cache)?$")


def weights_only(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not RUNTIME_ENTRIES.search(k)}


def is_generator_weights(sd: Mapping[str, torch.Tensor]) -> bool:
    """A FAR's or a GPT's state dict (rather than a tokenizer's)."""
    return "tok_embeddings_1.weight" in sd or "tok_embeddings.weight" in sd


def describe_far(cfg: FARConfig) -> str:
    if cfg.is_gpt:
        g = cfg.grid_size
        return (f"a LlamaGen {size_name(cfg) or 'GPT'} generator (dim {cfg.dim}, {cfg.n_layer} layers, "
                f"{cfg.n_head} heads of {cfg.head_dim}, vocab {cfg.vocab_size}, {cfg.num_classes} classes, "
                f"{g}x{g} tokens)")
    size = size_name(cfg) or "custom"
    kind = preset_name(cfg.num_factors)
    return (f"a {kind} FAR ({size}: dim {cfg.dim}, {cfg.n_layer} layers, {cfg.ar_n_layer} factor-head layers, "
            f"vocab {cfg.vocab_size}, {cfg.num_classes} classes)")


def load_far_weights(model: FAR, sd: Mapping[str, torch.Tensor],
                             path: str | os.PathLike = "<state dict>") -> None:
    """Load released-layout weights strictly (entries that are not weights dropped by name, see
    RUNTIME_ENTRIES); one CheckpointError names every missing, unexpected or mis-shaped key."""
    sd = weights_only(sd)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, sd, path, describe_far(model.config))
    on_meta = model.rope.is_meta  # built under torch.device("meta"): take the file's tensors as they are
    model.load_state_dict(sd, strict=True, assign=on_meta)
    if on_meta and model.device.type != "meta":
        model.rope = rope_table(model.config).to(model.device)


_LAYER = re.compile(r"^(?P<stack>layers|ar_head)\.(?P<layer>\d+)\.")  # the trunk's and the factor head's blocks


def _depths(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    depth = {"layers": 0, "ar_head": 0}
    for k in sd:
        m = _LAYER.match(k)
        if m:
            depth[m["stack"]] = max(depth[m["stack"]], int(m["layer"]) + 1)
    return depth


def infer_far_config(sd: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>",
                     n_head: Optional[int] = None, **overrides) -> FARConfig:
    """The FARConfig of released-layout weights (FAR's or LlamaGen's GPT's): factor count, widths, depths,
    vocabulary and classes come from the keys and shapes; ``n_head`` (default: the size table's for this width
    and depth, else dim // 64), ``block_size`` (default 256) and the training hyper-parameters cannot be read
    from weights and may be given as keyword arguments."""
    gpt = "tok_embeddings.weight" in sd
    try:
        num_factors = 1 if gpt else 0
        while not gpt and f"tok_embeddings_{num_factors + 1}.weight" in sd:
            num_factors += 1
        if num_factors == 0:
            raise KeyError("tok_embeddings_1.weight")
        vocab_size, dim = sd["tok_embeddings.weight" if gpt else "tok_embeddings_1.weight"].shape
        depth = _depths(sd)
        qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
        hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
        class_rows = sd["cls_embedding.embedding_table.weight"].shape[0]
    except (KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: not FAR weights, cannot infer the config (missing {e}; first keys: "
                              f"{list(sd)[:5]})") from None
    n_head = n_head or table_heads(dim, depth["layers"], depth["ar_head"]) or max(1, dim // 64)
    head_dim = dim // n_head
    kw: dict[str, Any] = dict(dim=dim, n_layer=depth["layers"], ar_n_layer=depth["ar_head"], n_head=n_head,
                              vocab_size=vocab_size, num_factors=num_factors)
    n_kv = (qkv_rows // head_dim - n_head) // 2
    if n_kv != n_head:
        kw["n_kv_head"] = n_kv
    class_dropout = overrides.get("class_dropout_prob", FARConfig.class_dropout_prob)
    kw["num_classes"] = class_rows - (class_dropout > 0)  # the last row is the null class
    default_hidden = find_multiple(int(2 * 4 * dim / 3), FARConfig.multiple_of)
    if hidden != default_hidden:  # a custom SwiGLU width: reproduce it exactly
        kw.update(multiple_of=1, ffn_dim_multiplier=(hidden + 0.5) / int(2 * 4 * dim / 3))
    kw.update(overrides)
    try:
        return FARConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def table_heads(dim: int, n_layer: int, ar_n_layer: int) -> Optional[int]:
    """The head count of the named size with this width and these depths, if there is one."""
    return next((s["n_head"] for s in MODELS.values()
                 if (s["dim"], s["n_layer"], s["ar_n_layer"]) == (dim, n_layer, ar_n_layer)), None)


def _shape_of(sd: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
    """(width, trunk depth, factor-head depth) of FAR or GPT weights (checked by ``infer_far_config``)."""
    emb = sd.get("tok_embeddings.weight", sd.get("tok_embeddings_1.weight"))
    depth = _depths(sd)
    return (emb.shape[1] if emb is not None else 0), depth["layers"], depth["ar_head"]


def _size_fits(name: Optional[str], sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether the named size has the width and depths of ``sd``."""
    size = MODELS.get(name)
    return size is not None and (size["dim"], size["n_layer"], size["ar_n_layer"]) == _shape_of(sd)


def _args(ckpt: Any) -> Any:
    return ckpt.get("args") if isinstance(ckpt, Mapping) else None


def released_shape(ckpt: Any, sd: Mapping[str, torch.Tensor], path, gpt_model: Optional[str] = None,
                   n_head: Optional[int] = None, block_size: Optional[int] = None,
                   default_block_size: int = FARConfig.block_size) -> tuple[dict, str]:
    """What the weights of a file without a stored config cannot tell, the head count and the token grid, and
    where each came from (see the module docstring): ({"n_head", "block_size"}, a note for ``loaded_from``).
    ``gpt_model`` / ``n_head`` / ``block_size``: the caller's; a value the file's ``args`` contradict is an
    error. ``default_block_size``: the grid when neither the file nor the caller gives one."""
    args = _args(ckpt)
    heads, heads_from = None, None
    named = getattr(args, "gpt_model", None)
    if _size_fits(named, sd):
        heads, heads_from = MODELS[named]["n_head"], f"its args (gpt_model {named})"
    if n_head is not None and heads is not None and n_head != heads:
        raise CheckpointError(f"{path}: {n_head} attention heads asked for, but its args name {named} "
                              f"({heads} heads)")
    if heads is None and n_head is not None:
        heads, heads_from = n_head, f"the caller ({n_head} heads)"
    if heads is None and _size_fits(gpt_model, sd):
        heads, heads_from = MODELS[gpt_model]["n_head"], f"the caller's size (--gpt-model {gpt_model})"
    if heads is None:
        dim, n_layer, ar_n_layer = _shape_of(sd)
        heads = table_heads(dim, n_layer, ar_n_layer)
        heads_from = "the size table (width and depth)" if heads else "64-dimensional heads assumed"
        heads = heads or max(1, dim // 64)
    size, down = getattr(args, "image_size", None), getattr(args, "downsample_size", None)
    if isinstance(size, int) and isinstance(down, int) and down > 0:
        grid, grid_from = size // down, f"its args (image_size {size}, downsample_size {down})"
        if block_size is not None and block_size != grid * grid:
            raise CheckpointError(f"{path}: was trained on {grid}x{grid} tokens ({grid_from}), but "
                                  f"{math.isqrt(block_size)}x{math.isqrt(block_size)} were asked for (check "
                                  f"--image-size and --downsample-size)")
    elif block_size is not None:
        grid, grid_from = math.isqrt(block_size), "the caller"
    else:
        grid, grid_from = math.isqrt(default_block_size), "the default"
    return ({"n_head": heads, "block_size": grid * grid},
            f"{heads} heads from {heads_from}, {grid}x{grid} tokens from {grid_from}")


def trained_block_size(ckpt: Any) -> Optional[int]:
    """The positions per image (grid x grid) a FAR checkpoint was trained on: its stored config's, else the
    training script's ``args`` (image size / downsampling, squared; the original's files carry them); None when
    the file does not say (bare weights)."""
    if not isinstance(ckpt, Mapping):
        return None
    stored = ckpt.get("config")
    if isinstance(stored, Mapping) and isinstance(stored.get("block_size"), int):
        return stored["block_size"]
    args = ckpt.get("args")
    args = vars(args) if hasattr(args, "__dict__") else args if isinstance(args, Mapping) else {}
    size, down = args.get("image_size"), args.get("downsample_size")
    if isinstance(size, int) and isinstance(down, int) and down > 0:
        return (size // down) ** 2
    return None


def load_far(path: str | os.PathLike, map_location: str | torch.device = "cpu",
             expect_factors: Optional[int] = None, prefer: tuple[str, ...] = MODEL_FIRST,
             dtype: Optional[torch.dtype] = None, unsafe_load: Optional[bool] = None,
             gpt_model: Optional[str] = None, default_block_size: int = FARConfig.block_size,
             **overrides) -> FAR:
    """Build a FAR (or LlamaGen GPT) from a checkpoint (a path or an ``hf://`` name; ``.pt`` released or ours, a
    DDP file's ``"model"`` / ``"ema"`` or a bare FSDP state dict, or safetensors), load its weights strictly,
    return it in eval mode; ``model.loaded_from`` says which weights and config (and, for a file without a
    stored config, where the head count and the token grid came from).

    ``prefer``: the order in which weight entries are tried (``"model"`` first, the weights the original
    sampler reads; ``prefer=("ema",)`` for the EMA weights). ``expect_factors`` turns a file with another factor
    count into a clear error. ``gpt_model`` names the size the caller expects (used for the head count when the
    file does not say it), ``default_block_size`` the token count when neither the file nor ``block_size``
    does. Keyword arguments override config fields (``n_head``, ``block_size`` ...; those two must agree with
    what the file says). ``unsafe_load``: see ``utils.checkpoint.load_file``."""
    return far_from_checkpoint(load_file(path, map_location, unsafe_load), path, expect_factors, prefer, dtype,
                               gpt_model, default_block_size, **overrides)


def far_from_checkpoint(ckpt: Any, path: str | os.PathLike = "<checkpoint>", expect_factors: Optional[int] = None,
                        prefer: tuple[str, ...] = MODEL_FIRST, dtype: Optional[torch.dtype] = None,
                        gpt_model: Optional[str] = None, default_block_size: int = FARConfig.block_size,
                        **overrides) -> FAR:
    """``load_far`` for a checkpoint already read with ``load_file``."""
    sd, key = extract_weights(ckpt, path, prefer)
    sd = weights_only(sd)
    cfg = stored_config(FARConfig, ckpt, path, "FAR weights", **overrides)
    from_file, note = cfg is not None, ""
    if cfg is None:
        shape, note = released_shape(ckpt, sd, path, gpt_model, overrides.pop("n_head", None),
                                     overrides.pop("block_size", None), default_block_size)
        cfg = infer_far_config(sd, path, **shape, **overrides)
    else:
        stored = ckpt["config"]
        for field in ("n_head", "block_size"):  # what the weights cannot check: a different value is a mistake
            if overrides.get(field, stored.get(field)) != stored.get(field):
                raise CheckpointError(f"{path}: its stored config has {field} {stored.get(field)}, but "
                                      f"{overrides[field]} was asked for (check --image-size and "
                                      f"--downsample-size)")
    if expect_factors is not None and cfg.num_factors != expect_factors:
        raise CheckpointError(f"{path}: holds {describe_far(cfg)}, but {expect_factors} factors were expected")
    with torch.device("meta"):  # no time spent initialising weights that are about to be overwritten
        model = FAR(cfg)
    with noting_stored_config(from_file):
        load_far_weights(model, sd, path)
    if dtype is not None:
        model = model.to(dtype)
    model.loaded_from = LoadedFrom(str(path), key, from_file, note)
    return model.eval()


def far_checkpoint(model: FAR, ema: Optional[FAR] = None, **extra: Any) -> dict[str, Any]:
    """A checkpoint dict in the released layout (``model``, optionally ``ema``), the model's ``config`` (which
    loading builds from) and ``extra`` entries."""
    ckpt: dict[str, Any] = {"model": model.state_dict()}
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    ckpt["config"] = dataclasses.asdict(model.config)
    ckpt.update(extra)
    return ckpt


def save_far(path: str | os.PathLike, model: FAR, ema: Optional[FAR] = None, save_format: Optional[str] = None,
             **extra: Any) -> None:
    """Write ``model`` (and ``ema``) atomically: a ``.pt`` checkpoint the original FQGAN code can load, or with
    ``save_format="safetensors"`` (default for a ``.safetensors`` path) a weights-only file of ``model``'s
    weights and config."""
    write_checkpoint(far_checkpoint(model, ema, **extra), path, save_format)
