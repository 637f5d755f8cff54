"""Reading and writing tokenizer weights in the released FQGAN layout.

Inside this project each factor is one ``FactorBranch`` (``factors.{i}.*``) and the feature-prediction heads
live in ``heads.{i}.*``. The released checkpoints (``fqgan_dual_ds16.pt`` ...) name the same tensors after
the factor instead. The mapping is a pure renaming, one-to-one in both directions, given by the tables below:

    factors.{i}.adapter.X          <->  encoder.{visual_head | semantic_head[_mid|_high]}.0.X
    factors.{i}.norm_out.X         <->  encoder.norm_out_{name}.X
    factors.{i}.conv_out.X         <->  encoder.conv_out_{name}.X
    factors.{i}.quant_conv.X       <->  quant_conv_{name}.X
    factors.{i}.quantizer.X        <->  quantize_{name}.X
    heads.{i}.X                    <->  feat_pred_head.X (dual) | {mid,high}_sem_feat_pred.X (triple)
    encoder.*, post_quant_conv.*, decoder.*   unchanged

LlamaGen's single-codebook ``VQModel`` (``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt``) is the one-factor tokenizer
without adapter (the ``single`` preset); its files name that factor's modules without a suffix:

    factors.0.norm_out.X / conv_out.X   <->  encoder.norm_out.X / encoder.conv_out.X
    factors.0.quant_conv.X              <->  quant_conv.X
    factors.0.quantizer.X               <->  quantize.X

Every file this project writes uses the released names, so the original code reads our checkpoints and ours
reads theirs. ``released_state_dict`` / ``load_tokenizer_weights`` convert; ``load_tokenizer`` builds the
right model from a file alone: from the config our files carry (``"config"``, checked against the weights), or
for released files (no config) from the weights' key names and shapes (layout, factor count, VQ-8 / VQ-16,
codebook, adapters, heads).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from utils.checkpoint import (EMA_FIRST, CheckpointError, LoadedFrom, check_state_dict, extract_weights, load_file,
                              noting_stored_config, stored_config, write_checkpoint)
from utils.argtypes import positive_int
from utils.factors import PRESET_FACTORS, preset_of, preset_name
from utils.flags import flag, flag_name

from .fqgan import FactorConfig, FactorizedTokenizer, TokenizerConfig, preset_factors

# Released names of the paper's factors' adapters and feature-prediction heads. A factor with any other name
# gets ``encoder.<name>_head.0`` and ``<name>_feat_pred`` (the rule the released names almost follow).
RELEASED_ADAPTERS = {"vis": "encoder.visual_head.0", "sem": "encoder.semantic_head.0",
                     "sem_mid": "encoder.semantic_head_mid.0", "sem_high": "encoder.semantic_head_high.0"}
RELEASED_HEADS = {"sem": "feat_pred_head", "sem_mid": "mid_sem_feat_pred", "sem_high": "high_sem_feat_pred"}


# LlamaGen's names of its one factor's modules (keyed by the module's native name); it has no adapter.
LLAMAGEN_PREFIXES = {"norm_out": "encoder.norm_out", "conv_out": "encoder.conv_out", "quant_conv": "quant_conv",
                     "quantizer": "quantize"}
LLAMAGEN_CODEBOOK = "quantize.embedding.weight"  # the key that tells LlamaGen's layout from FQGAN's
# LlamaGen's modules in the order of its state dict (the encoder ends with the factor's norm_out and conv_out)
LLAMAGEN_ORDER = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


def llamagen_layout(cfg: TokenizerConfig) -> bool:
    """Whether ``cfg`` is LlamaGen's VQModel (one factor, no adapter), whose files use LlamaGen's names."""
    return cfg.num_factors == 1 and not cfg.with_adapters


def released_factor_prefixes(name: str, llamagen: bool = False) -> dict[str, str]:
    """Released prefix of each module of factor ``name``'s branch (keyed by the module's native name); with
    ``llamagen``, LlamaGen's names of its single factor."""
    if llamagen:
        return dict(LLAMAGEN_PREFIXES)
    return {"adapter": RELEASED_ADAPTERS.get(name, f"encoder.{name}_head.0"),
            "norm_out": f"encoder.norm_out_{name}",
            "conv_out": f"encoder.conv_out_{name}",
            "quant_conv": f"quant_conv_{name}",
            "quantizer": f"quantize_{name}"}


def released_head_prefix(name: str) -> str:
    return RELEASED_HEADS.get(name, f"{name}_feat_pred")


def _prefix_map(cfg: TokenizerConfig) -> list[tuple[str, str]]:
    """(native prefix, released prefix) pairs, each ending in a dot, so no prefix matches another's keys."""
    llamagen = llamagen_layout(cfg)
    pairs = [(f"factors.{i}.{module}.", f"{released}.") for i, f in enumerate(cfg.factors)
             for module, released in released_factor_prefixes(f.name, llamagen).items()]
    pairs += [(f"heads.{i}.", released_head_prefix(cfg.factors[i].name) + ".") for i in cfg.head_factors]
    released = [r for _, r in pairs]
    clash = sorted({r for r in released if released.count(r) > 1})
    if clash:
        raise ValueError(f"factor names {[f.name for f in cfg.factors]} map to the same released keys ({clash[0]}); "
                         "rename a factor")
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]], reverse: bool) -> str:
    for native, released in pairs:
        src, dst = (released, native) if reverse else (native, released)
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def released_state_dict(model: FactorizedTokenizer) -> dict[str, torch.Tensor]:
    """The model's weights under the released key names (tensors are shared, not copied); LlamaGen's layout
    also in LlamaGen's order, so a file we write lists exactly the keys of one LlamaGen writes."""
    pairs = _prefix_map(model.config)
    sd = {_rename(k, pairs, False): v for k, v in model.state_dict().items()}
    if not llamagen_layout(model.config):
        return sd
    def rank(key: str) -> int:
        return next((i for i, prefix in enumerate(LLAMAGEN_ORDER) if key.startswith(prefix)), len(LLAMAGEN_ORDER))

    return {k: sd[k] for k in sorted(sd, key=rank)}  # a stable sort: the order inside each module is kept


def released_head_prefixes(cfg: TokenizerConfig) -> tuple[str, ...]:
    return tuple(released_head_prefix(cfg.factors[i].name) + "." for i in cfg.head_factors)


def load_tokenizer_weights(model: FactorizedTokenizer, sd: Mapping[str, torch.Tensor],
                           path: str | os.PathLike = "<state dict>", allow_missing_heads: bool = False) -> None:
    """Load released-layout weights into ``model``; one CheckpointError lists every key that does not fit.
    With ``allow_missing_heads`` a file without feature-prediction heads loads too (heads stay as they are)."""
    cfg = model.config
    expected = {k: v.shape for k, v in released_state_dict(model).items()}
    optional = released_head_prefixes(cfg) if allow_missing_heads else ()
    check_state_dict(expected, sd, path, describe_tokenizer(cfg), optional)
    pairs = _prefix_map(cfg)
    native = {_rename(k, pairs, True): v for k, v in sd.items()}
    model.load_state_dict(native, strict=not allow_missing_heads)


def describe_tokenizer(cfg: TokenizerConfig) -> str:
    names = [f.name for f in cfg.factors]
    vq = {16: "VQ-16", 8: "VQ-8"}.get(cfg.downsample, f"{cfg.downsample}x")
    codebook = f"codebook {cfg.codebook_size} x {cfg.codebook_embed_dim}"
    if llamagen_layout(cfg) and not cfg.head_factors:
        return f"a single-codebook {vq} tokenizer (LlamaGen's VQModel; {codebook})"
    kind = preset_of(names) or preset_name(len(names))
    heads = "with feature heads" if cfg.head_factors else "without feature heads"
    adapters = "" if cfg.with_adapters else ", without adapters"
    return f"a {kind} {vq} tokenizer (factors {', '.join(names)}; {heads}{adapters}; {codebook})"


@dataclass(frozen=True)
class TokenizerFlags:
    """The flags of an entry point that reads a tokenizer checkpoint (extraction, sampling, reconstruction): the
    file (``--vq-ckpt``) decides the model, and the original scripts' model flags, when given, are checked against
    it (``check_tokenizer_flags``)."""
    vq_ckpt: str = flag("", required=True, help="tokenizer checkpoint: a file (.pt / .safetensors) or "
                                                 "hf://owner/repo/file")
    vq_model: Optional[str] = flag(None, choices=("VQ-16", "VQ-8"), output=False,
                                   help="checked against --vq-ckpt (which decides the model)")
    codebook_size: Optional[int] = flag(None, type=positive_int, output=False, help="checked against --vq-ckpt")
    codebook_embed_dim: Optional[int] = flag(None, type=positive_int, output=False, help="checked against --vq-ckpt")


def tokenizer_facts(cfg: TokenizerConfig) -> dict[str, Any]:
    """What a tokenizer is, named as the flags that describe it (``--vq-model``, ``--codebook-size`` ...)."""
    return {"vq_model": f"VQ-{cfg.downsample}", "codebook_size": cfg.codebook_size,
            "codebook_embed_dim": cfg.codebook_embed_dim}


def check_tokenizer_flags(flags: Any, model: FactorizedTokenizer) -> None:
    """Every flag of ``flags`` (a config) named as a fact of the model (``tokenizer_facts``) and given (not None)
    must agree with the checkpoint ``--vq-ckpt``, which is what gets built; and its ``--image-size`` must be a
    multiple of the model's downsampling (else the codes would not cover the image)."""
    for name, have in tokenizer_facts(model.config).items():
        given = getattr(flags, name, None)
        if given is not None and given != have:
            option = flag_name(name)
            raise CheckpointError(f"{option} {given} does not match {flags.vq_ckpt}, which holds "
                                  f"{describe_tokenizer(model.config)} with {option} {have}")
    size, down = getattr(flags, "image_size", None), model.config.downsample
    if size is not None and size % down:
        raise CheckpointError(f"--image-size {size} is not a multiple of {flags.vq_ckpt}'s downsampling {down}: "
                              f"use {max(down, size // down * down)} or {(size // down + 1) * down}")


# Released keys whose names carry a config field, by named group.
_QUANTIZER = re.compile(r"^quantize_(?P<factor>.+)\.embedding\.weight$")
_ENCODER_RES = re.compile(r"^encoder\.conv_blocks\.(?P<level>\d+)\.res\.(?P<block>\d+)\.conv1\.weight$")
_LAYER = re.compile(r"^(?P<module>.+)\.transformer\.(?P<layer>\d+)\.ln_1\.weight$")


def _layer_counts(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Transformer depth of every adapter and head, keyed by its released prefix."""
    depth: dict[str, int] = {}
    for k in sd:
        m = _LAYER.match(k)
        if m:
            depth[m["module"]] = max(depth.get(m["module"], 0), int(m["layer"]) + 1)
    return depth


def infer_tokenizer_config(sd: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>",
                           **overrides) -> TokenizerConfig:
    """Rebuild the TokenizerConfig of released-layout weights (FQGAN's or LlamaGen's) from their keys and
    shapes."""
    llamagen = LLAMAGEN_CODEBOOK in sd
    names = ["vis"] if llamagen else [m["factor"] for m in map(_QUANTIZER.match, sd) if m]
    if not names or "encoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{path}: not FQGAN or LlamaGen tokenizer weights (no encoder.conv_in / quantize* "
                              f"keys; first keys: {list(sd)[:5]})")
    preset = next((p for p, fs in PRESET_FACTORS.items() if set(fs) == set(names)), None)
    if preset is not None:
        factors = list(preset_factors(preset))
    else:  # a custom factor set: visual first, then the rest in file order
        factors = [FactorConfig(n) for n in sorted(names, key=lambda n: n != "vis")]
    res_blocks: dict[int, set[int]] = {}
    for m in map(_ENCODER_RES.match, sd):
        if m:
            res_blocks.setdefault(int(m["level"]), set()).add(int(m["block"]))
    depth = _layer_counts(sd)
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        ch_mult = tuple(sd[f"encoder.conv_blocks.{level}.res.0.conv1.weight"].shape[0] // ch
                        for level in sorted(res_blocks))
        codebook = sd[LLAMAGEN_CODEBOOK if llamagen else f"quantize_{factors[0].name}.embedding.weight"]
        adapter = released_factor_prefixes(factors[0].name)["adapter"]
        positions = sd.get(f"{adapter}.positional_embedding")
        z_channels = sd["decoder.conv_in.weight"].shape[1]
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: incomplete FQGAN tokenizer weights (missing {e})") from None
    head_layers = 3
    for i, f in enumerate(factors):
        head = released_head_prefix(f.name)
        if f"{head}.class_embedding" in sd:
            factors[i] = dataclasses.replace(f, head_width=sd[f"{head}.class_embedding"].shape[-1])
            head_layers = depth.get(head, head_layers)
    downsample = 2 ** (len(ch_mult) - 1)
    fields = dict(factors=tuple(factors), ch_mult=ch_mult, ch=ch, num_res_blocks=len(res_blocks[0]),
                  z_channels=z_channels, codebook_size=codebook.shape[0], codebook_embed_dim=codebook.shape[1],
                  adapter_layers=depth.get(adapter, 0), head_layers=head_layers,
                  with_feature_heads=any(f"{released_head_prefix(f.name)}.class_embedding" in sd for f in factors))
    if positions is None:  # no adapters (LlamaGen): no learned positions tie the model to an image size
        fields.update(with_adapters=False, adapter_layers=TokenizerConfig.adapter_layers)
    else:
        fields["base_image_size"] = round(positions.shape[0] ** 0.5) * downsample
    fields.update(overrides)
    return TokenizerConfig(**fields)


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
        cfg = infer_tokenizer_config(sd, path, **overrides)
    if expect_factors is not None and cfg.num_factors != expect_factors:
        raise CheckpointError(f"{path}: holds {describe_tokenizer(cfg)}, but {expect_factors} factors were "
                              f"expected (use the {preset_name(cfg.num_factors)} entry point)")
    model = FactorizedTokenizer(cfg)
    with noting_stored_config(from_file):
        load_tokenizer_weights(model, sd, path)
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
    write_checkpoint(tokenizer_checkpoint(model, **extra), path, save_format)
