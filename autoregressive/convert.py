"""Turn a checkpoint (a released ``.pt``, one of ours, or an ``hf://`` name) into a weights-only safetensors file.

    python -m autoregressive.convert fqgan_dual_ds16.pt fqgan_dual_ds16.safetensors
    python -m autoregressive.convert hf://ZechenBai/FQGAN/fqgan_dual_ds16.pt fqgan_dual_ds16.safetensors
    python -m autoregressive.convert far.pt far_ema.safetensors --ema

The output holds one set of weights (``"model"``, as the original code extraction and sampling read, or the
EMA weights with ``--ema``) and, in its metadata, which set that was and the full model config as JSON, so it
loads without pickle and without guessing the architecture (e.g. FAR's head count). A tokenizer or a FAR is
recognised from its weights; the model is built and the weights checked before anything is written.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from autoregressive.models import describe_far, far_checkpoint
from autoregressive.models.checkpoint import far_from_checkpoint, is_generator_weights
from tokenizer.models import describe_tokenizer, tokenizer_checkpoint
from tokenizer.models.checkpoint import tokenizer_from_checkpoint
from utils.checkpoint import (CheckpointError, extract_weights, load_file, resolve_checkpoint, unsafe_load_flag,
                              weight_preference, write_checkpoint)
from utils.flags import exits_on, flag, parse, require


@dataclass(frozen=True)
class ConvertConfig:
    """The converter's command line."""
    input: str = flag(positional=True, help="checkpoint file (.pt / .safetensors) or hf://owner/repo/file")
    output: str = flag(positional=True, help="the safetensors file to write (named .safetensors)")
    ema: bool = flag(False, help="take the EMA weights (default: 'model')")
    overwrite: bool = flag(False, help="replace an existing output file (never the input)")
    unsafe_load: bool = unsafe_load_flag()

    def __post_init__(self):
        require(Path(self.output).suffix == ".safetensors",
                f"output {self.output}: the converter writes a weights-only safetensors file; name it "
                f"{Path(self.output).with_suffix('.safetensors').name} (a .pt name would hide what it holds)")


def check_output(args: ConvertConfig, source: Path) -> None:
    """The output is never the input (a training checkpoint would become weights only), and an existing file is
    replaced only with --overwrite."""
    out = Path(args.output)
    if out.exists() and out.samefile(source):
        raise CheckpointError(f"output {out} is the input file: the converter never writes over its input; "
                              f"choose another output name")
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"output {out} exists; pass --overwrite to replace it")


def main(argv=None) -> Path:
    with exits_on(ValueError):
        args = parse(ConvertConfig, argv, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prefer = weight_preference(args.ema)
    try:
        check_output(args, resolve_checkpoint(args.input))
        ckpt = load_file(args.input)
        weights, _ = extract_weights(ckpt, args.input, prefer)
        if is_generator_weights(weights):
            model = far_from_checkpoint(ckpt, args.input, prefer=prefer)
            out, description = far_checkpoint(model), describe_far(model.config)
        else:
            model = tokenizer_from_checkpoint(ckpt, args.input, prefer=prefer)
            out, description = tokenizer_checkpoint(model), describe_tokenizer(model.config)
        which = model.loaded_from.weights or "model"
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    try:  # the weights under the name they had (model / ema), so the file's metadata says which they are
        write_checkpoint({which: out["model"], "config": out["config"]}, args.output, "safetensors", which)
    except OSError as e:
        sys.exit(f"error: {args.output}: cannot write it ({e.strerror or e})")
    print(f"Wrote {args.output}: {description}, from {model.loaded_from}")
    return Path(args.output)


if __name__ == "__main__":
    main()
