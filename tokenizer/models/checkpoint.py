"""Reading and writing tokenizer weights in the released FQGAN layout.

Inside this project each factor is one ``FactorBranch`` (``factors.{i}.*``) and the feature-prediction heads
live in ``heads.{i}.*``. The released checkpoints (``fqgan_dual_ds16.pt`` ...) name the same tensors after
the factor instead. The mapping is a pure renaming, one-to-one in both directions:

    factors.{i}.adapter.X          <->  encoder.{visual_head | semantic_head[_mid|_high]}.0.X
    factors.{i}.norm_out.X         <->  encoder.norm_out_{name}.X
    factors.{i}.conv_out.X         <->  encoder.conv_out_{name}.X
    factors.{i}.quant_conv.X       <->  quant_conv_{name}.X
    factors.{i}.quantizer.X        <->  quantize_{name}.X
    heads.{i}.X                    <->  feat_pred_head.X (dual) | {mid,high}_sem_feat_pred.X (triple)
    encoder.*, post_quant_conv.*, decoder.*   unchanged

Every file this project writes uses the released names, so the original code reads our checkpoints and ours
reads theirs. ``released_state_dict`` / ``load_released_state_dict`` convert; ``load_tokenizer`` builds the
right model from a file alone: from the config our files carry (``"config"``, checked against the weights), or
for released files (no config) from the weights' key names and shapes (factor count, VQ-8 / VQ-16, heads).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional

import torch

from utils.checkpoint import (EMA_FIRST, CheckpointError, LoadedFrom, check_state_dict, extract_weights, load_file,
                              save_checkpoint, stored_config)

from .fqgan import PRESETS, FactorConfig, FactorizedTokenizer, TokenizerConfig


def adapter_key(name: str) -> str:
    if name == "vis":
        return "encoder.visual_head.0"
    if name.startswith("sem"):
        return f"encoder.semantic_head{name[3:]}.0"
    return f"encoder.{name}_head.0"


def head_key(name: str) -> str:
    if name == "sem":
        return "feat_pred_head"
    if name.startswith("sem_"):
        return f"{name[4:]}_sem_feat_pred"
    return f"{name}_feat_pred"


def _prefix_map(cfg: TokenizerConfig) -> list[tuple[str, str]]:
    """(native prefix, released prefix) pairs; longest native prefixes never overlap."""
    pairs = []
    for i, f in enumerate(cfg.factors):
        n = f.name
        pairs += [(f"factors.{i}.adapter.", adapter_key(n) + "."),
                  (f"factors.{i}.norm_out.", f"encoder.norm_out_{n}."),
                  (f"factors.{i}.conv_out.", f"encoder.conv_out_{n}."),
                  (f"factors.{i}.quant_conv.", f"quant_conv_{n}."),
                  (f"factors.{i}.quantizer.", f"quantize_{n}.")]
    for i in cfg.head_factors:
        pairs.append((f"heads.{i}.", head_key(cfg.factors[i].name) + "."))
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]], reverse: bool) -> str:
    for native, released in pairs:
        src, dst = (released, native) if reverse else (native, released)
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def released_state_dict(model: FactorizedTokenizer) -> dict[str, torch.Tensor]:
    """The model's weights under the released key names (tensors are shared, not copied)."""
    pairs = _prefix_map(model.config)
    return {_rename(k, pairs, False): v for k, v in model.state_dict().items()}


def released_head_prefixes(cfg: TokenizerConfig) -> tuple[str, ...]:
    return tuple(head_key(cfg.factors[i].name) + "." for i in cfg.head_factors)


def load_released_state_dict(model: FactorizedTokenizer, sd: Mapping[str, torch.Tensor],
                             path: str | os.PathLike = "<state dict>", allow_missing_heads: bool = False) -> None:
    """Load released-layout weights into ``model``; one CheckpointError lists every key that does not fit.
    With ``allow_missing_heads`` a file without feature-prediction heads loads too (heads stay as they are)."""
    cfg = model.config
    expected = {k: v.shape for k, v in released_state_dict(model).items()}
    optional = released_head_prefixes(cfg) if allow_missing_heads else ()
    check_state_dict(expected, sd, path, describe(cfg), optional)
    pairs = _prefix_map(cfg)
    native = {_rename(k, pairs, True): v for k, v in sd.items()}
    model.load_state_dict(native, strict=not allow_missing_heads)


def describe(cfg: TokenizerConfig) -> str:
    names = [f.name for f in cfg.factors]
    preset = next((p for p, fs in PRESETS.items() if [f.name for f in fs] == names), None)
    kind = preset or f"{len(names)}-factor"
    vq = {16: "VQ-16", 8: "VQ-8"}.get(cfg.downsample, f"{cfg.downsample}x")
    heads = "with feature heads" if cfg.head_factors else "without feature heads"
    return f"a {kind} {vq} tokenizer (factors {', '.join(names)}; {heads})"


_QUANT_RE = re.compile(r"^quantize_(.+)\.embedding\.weight$")


def infer_config(sd: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>",
                 **overrides) -> TokenizerConfig:
    """Rebuild the TokenizerConfig of released-layout weights from their keys and shapes."""
    names = [m.group(1) for k in sd for m in [_QUANT_RE.match(k)] if m]
    if not names or "encoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{path}: not FQGAN tokenizer weights (no encoder.conv_in / quantize_* keys; "
                              f"first keys: {list(sd)[:5]})")
    preset_factors = next((fs for fs in PRESETS.values() if {f.name for f in fs} == set(names)), None)
    if preset_factors is not None:
        factors = list(preset_factors)
    else:  # a custom factor set: visual first, then the rest in file order
        factors = [FactorConfig(n) for n in sorted(names, key=lambda n: n != "vis")]
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks.")})
        ch_mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in levels)
        num_res = len({k.split(".")[4] for k in sd if k.startswith("encoder.conv_blocks.0.res.")})
        emb = sd[f"quantize_{factors[0].name}.embedding.weight"]
        adapter = adapter_key(factors[0].name)
        pos = sd[f"{adapter}.positional_embedding"]
        adapter_layers = len({k.split(".")[4] for k in sd if k.startswith(f"{adapter}.transformer.")})
        head_layers = 3
        with_heads = False
        for i, f in enumerate(factors):
            ce = sd.get(f"{head_key(f.name)}.class_embedding")
            if ce is not None:
                with_heads = True
                factors[i] = dataclasses.replace(f, head_width=ce.shape[-1])
                head_layers = len({k.split(".")[2] for k in sd if k.startswith(f"{head_key(f.name)}.transformer.")})
        z_channels = sd["decoder.conv_in.weight"].shape[1]
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: incomplete FQGAN tokenizer weights (missing {e})") from None
    downsample = 2 ** (len(ch_mult) - 1)
    grid = int(round(pos.shape[0] ** 0.5))
    kwargs = dict(factors=tuple(factors), ch_mult=ch_mult, ch=ch, num_res_blocks=num_res, z_channels=z_channels,
                  codebook_size=emb.shape[0], codebook_embed_dim=emb.shape[1], adapter_layers=adapter_layers,
                  head_layers=head_layers, with_feature_heads=with_heads, base_image_size=grid * downsample)
    kwargs.update(overrides)
    return TokenizerConfig(**kwargs)


def load_tokenizer(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                   expect_factors: Optional[int] = None, prefer: tuple[str, ...] = EMA_FIRST,
                   unsafe_load: Optional[bool] = None, **overrides) -> FactorizedTokenizer:
    """Build a tokenizer from a checkpoint (a path or an ``hf://`` name; ``.pt`` released or ours, or
    safetensors) and load its weights, in eval mode; ``model.loaded_from`` says which weights and config.

    ``prefer`` is the order in which weight entries are tried (EMA weights first, as the original evaluation
    does; code extraction and sampling read ``"model"`` first, as the original does). ``expect_factors`` turns a
    file with another factor count into a clear error. Extra keyword arguments override config fields that
    weights cannot tell (e.g. ``entropy_loss_ratio``). ``unsafe_load``: see ``utils.checkpoint.load_file``."""
    return tokenizer_from_checkpoint(load_file(path, map_location, unsafe_load), path, expect_factors, prefer,
                                     **overrides)


def tokenizer_from_checkpoint(ckpt: Any, path: str | os.PathLike = "<checkpoint>",
                              expect_factors: Optional[int] = None, prefer: tuple[str, ...] = EMA_FIRST,
                              **overrides) -> FactorizedTokenizer:
    """``load_tokenizer`` for a checkpoint already read with ``load_file``."""
    sd, key = extract_weights(ckpt, path, prefer)
    cfg = stored_config(TokenizerConfig, ckpt, path, "FQGAN tokenizer weights", **overrides)
    from_file = cfg is not None
    if cfg is None:
        cfg = infer_config(sd, path, **overrides)
    if expect_factors is not None and cfg.num_factors != expect_factors:
        entry = {2: "dual", 3: "triple"}.get(cfg.num_factors, "matching")
        raise CheckpointError(f"{path}: holds {describe(cfg)}, but {expect_factors} factors were expected "
                              f"(use the {entry} entry point)")
    model = FactorizedTokenizer(cfg)
    try:
        load_released_state_dict(model, sd, path)
    except CheckpointError as e:
        if from_file:
            raise CheckpointError(f"{e} (the model was built from the config stored in the file)") from None
        raise
    model.loaded_from = LoadedFrom(str(path), key, from_file)
    return model.eval()


def tokenizer_checkpoint(model: FactorizedTokenizer, ema: Optional[FactorizedTokenizer] = None,
                         **extra: Any) -> dict[str, Any]:
    """A checkpoint dict in the released layout (``model``, optionally ``ema``), the model's ``config`` (which
    loading builds from) and ``extra`` entries."""
    ckpt: dict[str, Any] = {"model": released_state_dict(model)}
    if ema is not None:
        ckpt["ema"] = released_state_dict(ema)
    ckpt["config"] = dataclasses.asdict(model.config)
    ckpt.update(extra)
    return ckpt


def save_tokenizer(path: str | os.PathLike, model: FactorizedTokenizer, save_format: Optional[str] = None,
                   **extra: Any) -> None:
    """Write ``model`` atomically: a ``.pt`` checkpoint the original FQGAN code can load, or with
    ``save_format="safetensors"`` (default for a ``.safetensors`` path) a weights-only file (weights + config;
    ``extra`` entries such as ``ema`` or optimizer state are not stored)."""
    save_checkpoint(tokenizer_checkpoint(model, **extra), path, save_format)
