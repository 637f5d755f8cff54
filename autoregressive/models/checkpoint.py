"""Reading and writing FAR weights in the released layout.

``FAR`` uses the released parameter names (``cls_embedding.embedding_table``, ``tok_embeddings_{1..F}``,
``aggregation_layer``, ``layers.{i}.*``, ``ar_head.{i}.*``, ``norm``, ``output_{1..F}``), so no renaming is
needed in either direction: a file holds the model's own state dict and a released file loads with
``load_state_dict``. What these helpers add is a single clear error for a file that does not fit, the
config (stored in our files as ``"config"``; for released files inferred from the weights alone), and atomic
saving.

Weights cannot tell the number of attention heads; for a file without a stored config, every FAR / LlamaGen
size uses 64-dimensional heads, so that is assumed unless ``n_head`` is given (or the training checkpoint's
``args.gpt_model`` names a size).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional

import torch

from utils.checkpoint import (MODEL_FIRST, CheckpointError, LoadedFrom, check_state_dict, extract_weights, load_file,
                              noting_stored_config, stored_config, write_checkpoint)
from utils.factors import preset_name

from .far import FAR, FAR_models, FARConfig, find_multiple, rope_table


def describe_far(cfg: FARConfig) -> str:
    kind = preset_name(cfg.num_factors)
    size = next((n for n, s in FAR_models.items()
                 if all(getattr(cfg, k) == v for k, v in s.items())), "custom")
    return (f"a {kind} FAR ({size}: dim {cfg.dim}, {cfg.n_layer} layers, {cfg.ar_n_layer} factor-head layers, "
            f"vocab {cfg.vocab_size}, {cfg.num_classes} classes)")


def load_far_weights(model: FAR, sd: Mapping[str, torch.Tensor],
                             path: str | os.PathLike = "<state dict>") -> None:
    """Load released-layout weights; one CheckpointError names every missing, unexpected or mis-shaped key."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, sd, path, describe_far(model.config))
    on_meta = model.rope.is_meta  # built under torch.device("meta"): take the file's tensors as they are
    model.load_state_dict(sd, strict=True, assign=on_meta)
    weight = model.aggregation_layer.weight
    if on_meta and not weight.is_meta:
        model.rope = rope_table(model.config).to(weight.device)


_LAYER = re.compile(r"^(?P<stack>layers|ar_head)\.(?P<layer>\d+)\.")  # the trunk's and the factor head's blocks


def infer_far_config(sd: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>",
                     n_head: Optional[int] = None, **overrides) -> FARConfig:
    """The FARConfig of released-layout weights: factor count, widths, depths, vocabulary and classes come
    from the keys and shapes; ``n_head`` (default dim // 64), ``block_size`` (default 256) and the training
    hyper-parameters cannot be read from weights and may be given as keyword arguments."""
    try:
        num_factors = 0
        while f"tok_embeddings_{num_factors + 1}.weight" in sd:
            num_factors += 1
        if num_factors == 0:
            raise KeyError("tok_embeddings_1.weight")
        vocab_size, dim = sd["tok_embeddings_1.weight"].shape
        depth = {"layers": 0, "ar_head": 0}
        for k in sd:
            m = _LAYER.match(k)
            if m:
                depth[m["stack"]] = max(depth[m["stack"]], int(m["layer"]) + 1)
        qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
        hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
        class_rows = sd["cls_embedding.embedding_table.weight"].shape[0]
    except (KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: not FAR weights, cannot infer the config (missing {e}; first keys: "
                              f"{list(sd)[:5]})") from None
    n_head = n_head or max(1, dim // 64)
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


def _n_head_from_args(ckpt: Any) -> Optional[int]:
    name = getattr(ckpt.get("args"), "gpt_model", None) if isinstance(ckpt, Mapping) else None
    return FAR_models.get(name, {}).get("n_head")


def load_far(path: str | os.PathLike, map_location: str | torch.device = "cpu",
             expect_factors: Optional[int] = None, prefer: tuple[str, ...] = MODEL_FIRST,
             dtype: Optional[torch.dtype] = None, unsafe_load: Optional[bool] = None, **overrides) -> FAR:
    """Build a FAR from a checkpoint (a path or an ``hf://`` name; ``.pt`` released or ours, or safetensors),
    load its weights, return it in eval mode; ``model.loaded_from`` says which weights and config.

    ``prefer``: the order in which weight entries are tried (``"model"`` first, the weights the original
    sampler reads; ``prefer=("ema",)`` for the EMA weights). ``expect_factors`` turns a file with another factor
    count into a clear error. Keyword arguments override config fields (``n_head``, ``block_size`` ...).
    ``unsafe_load``: see ``utils.checkpoint.load_file``."""
    return far_from_checkpoint(load_file(path, map_location, unsafe_load), path, expect_factors, prefer, dtype,
                               **overrides)


def far_from_checkpoint(ckpt: Any, path: str | os.PathLike = "<checkpoint>", expect_factors: Optional[int] = None,
                        prefer: tuple[str, ...] = MODEL_FIRST, dtype: Optional[torch.dtype] = None,
                        **overrides) -> FAR:
    """``load_far`` for a checkpoint already read with ``load_file``."""
    sd, key = extract_weights(ckpt, path, prefer)
    cfg = stored_config(FARConfig, ckpt, path, "FAR weights", **overrides)
    from_file = cfg is not None
    if cfg is None:
        overrides.setdefault("n_head", _n_head_from_args(ckpt))
        if trained_block_size(ckpt) is not None:
            overrides.setdefault("block_size", trained_block_size(ckpt))
        cfg = infer_far_config(sd, path, **overrides)
    if expect_factors is not None and cfg.num_factors != expect_factors:
        raise CheckpointError(f"{path}: holds {describe_far(cfg)}, but {expect_factors} factors were expected")
    with torch.device("meta"):  # no time spent initialising weights that are about to be overwritten
        model = FAR(cfg)
    with noting_stored_config(from_file):
        load_far_weights(model, sd, path)
    if dtype is not None:
        model = model.to(dtype)
    model.loaded_from = LoadedFrom(str(path), key, from_file)
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
