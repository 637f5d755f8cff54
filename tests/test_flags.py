"""The command lines: every entry point's compatibility table (aliases set the config, ignored flags say so in one
line, --help groups them), the seed's command lines still parse, one precision vocabulary, and the trainers'
frozen configs refuse bad combinations in one line."""
import argparse
import dataclasses

import pytest

from autoregressive.sample import sample_c2i
from autoregressive.train import extract_codes, train_c2i
from tokenizer import reconstruct, val_ddp
from tokenizer import train as tokenizer_train
from utils.flags import COMPAT_GROUP, parser_dests, precision

PARSERS = {  # entry point -> (its parser, its compatibility table)
    "tokenizer/vq_train_dual.py": (tokenizer_train.get_parser("dual"), tokenizer_train.COMPAT),
    "tokenizer/vq_train_triple.py": (tokenizer_train.get_parser("triple"), tokenizer_train.COMPAT),
    "autoregressive/train/train_c2i_dual.py": (train_c2i.get_parser(2), train_c2i.COMPAT),
    "autoregressive/train/extract_codes_c2i_dual_code.py": (extract_codes.get_parser(2), extract_codes.COMPAT),
    "autoregressive/sample/sample_c2i_ddp_dual_code.py": (sample_c2i.get_parser(2), sample_c2i.COMPAT),
    "tokenizer/reconstruction_vq_ddp_dual.py": (reconstruct.get_parser(2), reconstruct.COMPAT),
    "tokenizer/val_ddp.py": (val_ddp.get_parser(), val_ddp.COMPAT),
}

# the seed's command lines (its README and launch scripts), paths shortened
SEED_TOKENIZER = ["--data-path", "d", "--image-size", "256", "--vq-model", "VQ-16", "--global-batch-size", "256",
                  "--codebook-size", "16384", "--codebook-embed-dim", "8", "--entropy-loss-ratio", "0.03",
                  "--epochs", "40", "--lr", "2e-4", "--with_disentanglement", "--disentanglement-ratio", "0.1",
                  "--with_clip_supervision", "--semantic-weight", "0.5", "--exp-name", "FQGAN_Dual"]
SEED_FAR = ["--code-path", "c", "--image-size", "256", "--vocab-size", "16384", "--epochs", "300", "--dataset",
            "imagenet_dual_code", "--gpt-model", "FAR-B", "--ckpt-every", "125000", "--lr", "1e-4",
            "--global-batch-size", "256", "--exp-name", "far_base_dual_code_300epoch"]


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_help_lists_the_compatibility_flags_in_their_own_group(script):
    parser, table = PARSERS[script]
    text = parser.format_help()
    assert COMPAT_GROUP in text, script
    group = text[text.index(COMPAT_GROUP):]
    for row in table:
        assert row.flag in group, (script, row.flag)
        assert f"  {row.flag}" not in text[:text.index(COMPAT_GROUP)], (script, row.flag)  # listed once, there


def test_ignored_flag_prints_one_line_and_only_when_given(capsys):
    base = ["--data-path", "d", "--exp-name", "e"]
    cfg = tokenizer_train.parse_config(base + ["--cloud-save-path", "s3://bucket", "--weight-decay", "0.05"])
    out = capsys.readouterr().out.splitlines()
    assert out == ["--cloud-save-path is accepted for compatibility and ignored"]  # 0.05 is --weight-decay's default
    assert not hasattr(cfg, "cloud_save_path") and "cloud_save_path" not in vars(cfg.namespace())
    train_c2i.parse_config(SEED_FAR, 2)
    assert capsys.readouterr().out.splitlines() == ["--dataset is accepted for compatibility and ignored"]
    tokenizer_train.parse_config(base)
    assert capsys.readouterr().out == ""


def test_seed_command_lines_parse_onto_the_config(capsys):
    cfg = tokenizer_train.parse_config(SEED_TOKENIZER, "dual")
    assert cfg.with_clip_supervision and cfg.with_disentanglement and cfg.codebook_l2_norm
    assert (cfg.lr, cfg.global_batch_size, cfg.entropy_loss_ratio) == (2e-4, 256, 0.03)
    assert not tokenizer_train.parse_config(SEED_TOKENIZER + ["--no-clip-supervision"]).with_clip_supervision
    far = train_c2i.parse_config(SEED_FAR, 2)
    assert far.compile and far.gpt_model == "FAR-B" and far.ckpt_every == 125000
    extract = extract_codes.get_parser(2).parse_args(
        ["--vq-ckpt", "t.pt", "--codebook-size", "16384", "--codebook-embed-dim", "8", "--data-path", "d",
         "--code-path", "c", "--ten-crop", "--crop-range", "1.1", "--image-size", "256"])
    assert extract.ten_crop
    sample = sample_c2i.get_parser(2).parse_args(
        ["--vq-ckpt", "t.pt", "--codebook-size", "16384", "--codebook-embed-dim", "8", "--gpt-ckpt", "g.pt",
         "--gpt-model", "FAR-B", "--image-size", "256", "--image-size-eval", "256", "--cfg-scale", "2.0",
         "--top-k", "0", "--top-p", "1.0", "--sample-dir", "s"])
    assert sample.precision == "bf16" and sample.cfg_scale == [2.0]
    recon = reconstruct.get_parser(2).parse_args(
        ["--data-path", "v", "--image-size", "256", "--vq-model", "VQ-16", "--vq-ckpt", "t.pt", "--codebook-size",
         "16384", "--codebook-embed-dim", "8", "--per-proc-batch-size", "128", "--with_clip_supervision",
         "--folder-name", "FQGAN_Dual_DS16"])
    assert recon.folder_name == "FQGAN_Dual_DS16"
    assert val_ddp.get_parser().parse_args(["--data-path", "v", "--image-size", "256",
                                            "--per-proc-batch-size", "128"]).image_size == 256


def test_no_codebook_l2_norm_turns_it_off():
    base = ["--data-path", "d", "--exp-name", "e"]
    assert tokenizer_train.parse_config(base).codebook_l2_norm
    cfg = tokenizer_train.parse_config(base + ["--no-codebook-l2-norm"])
    assert not cfg.codebook_l2_norm
    assert not tokenizer_train.build_config(cfg, "dual", 256).codebook_l2_norm


def test_every_flag_lands_in_the_config():
    """A flag the parser takes but the config lacks would be silently dropped."""
    for parser, table, cls in ((tokenizer_train.get_parser("triple"), tokenizer_train.COMPAT,
                                tokenizer_train.TrainConfig),
                               (train_c2i.get_parser(3), train_c2i.COMPAT, train_c2i.TrainConfig)):
        dropped = {row.dest for row in table if row.ignored}
        assert parser_dests(parser) - dropped <= {f.name for f in dataclasses.fields(cls)}


def test_one_precision_vocabulary():
    for spelling, name in (("none", "fp32"), ("float32", "fp32"), ("fp32", "fp32"), ("bfloat16", "bf16"),
                           ("bf16", "bf16"), ("float16", "fp16"), ("fp16", "fp16")):
        assert precision(spelling) == name
    with pytest.raises(argparse.ArgumentTypeError, match="not a precision"):
        precision("int8")
    base = ["--data-path", "d", "--exp-name", "e"]
    assert tokenizer_train.parse_config(base + ["--mixed-precision", "none"]).mixed_precision == "fp32"
    assert train_c2i.parse_config(["--code-path", "c", "--exp-name", "e", "--mixed-precision", "bfloat16"],
                                  2).mixed_precision == "bf16"
    assert not train_c2i.parse_config(["--code-path", "c", "--exp-name", "e", "--no-compile"], 2).compile


@pytest.mark.parametrize("flags,message", [
    (["--beta1", "1.5"], "--beta1 1.5: must be in [0, 1)"),
    (["--ch-mult", "1,x"], "--ch-mult '1,x': expected comma-separated integers"),
    (["--finetune"], "--finetune starts from --vq-ckpt's weights"),
    (["--global-batch-size", "6", "--gradient-accumulation-steps", "4"], "--global-batch-size 6 is not divisible"),
])
def test_tokenizer_config_refuses_bad_combinations_in_one_line(flags, message):
    with pytest.raises(ValueError) as e:
        tokenizer_train.parse_config(["--data-path", "d", "--exp-name", "e", *flags])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_far_config_refuses_bad_combinations_in_one_line(capsys):
    base = ["--code-path", "c", "--exp-name", "e"]
    with pytest.raises(ValueError, match="not combined with --fsdp"):
        train_c2i.parse_config(base + ["--fsdp", "--ema"], 2)
    with pytest.raises(ValueError, match="--image-size 250 is not a multiple of --downsample-size 16"):
        train_c2i.parse_config(base + ["--image-size", "250"], 2)
    with pytest.raises(SystemExit) as e:  # main: one line, no traceback
        train_c2i.main(base + ["--fsdp", "--ema"], 2)
    assert str(e.value).startswith("error: --ema keeps a full copy") and "\n" not in str(e.value)
    cfg = train_c2i.parse_config(base, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
