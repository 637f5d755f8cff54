"""The command lines: every entry point's parser is derived from its config dataclass (one declaration per flag),
the compatibility flags (aliases set the config, ignored flags say so in one line, --help groups them), the seed's
command lines still parse, recipes, the batch split, one precision vocabulary, and the frozen configs refuse bad
combinations in one line."""
import argparse
import dataclasses
from typing import Optional

import pytest

from autoregressive import convert
from autoregressive.sample import sample_c2i
from autoregressive.train import extract_codes, train_c2i
from evaluations import evaluator
from tokenizer import factor_report, reconstruct, reconstruct_image, val_ddp
from tokenizer import train as tokenizer_train
from utils import shards
from utils.flags import COMPAT_GROUP, config_parser, fields_where, flag, flag_fields, output_values, parse, precision
from utils.run import RunError, batch_split

CONFIGS = {  # entry point -> (its config, its parser)
    "tokenizer/vq_train_dual.py": (tokenizer_train.TrainConfig, tokenizer_train.get_parser("dual")),
    "tokenizer/vq_train_triple.py": (tokenizer_train.TrainConfig, tokenizer_train.get_parser("triple")),
    "autoregressive/train/train_c2i_dual.py": (train_c2i.TrainConfig, config_parser(train_c2i.TrainConfig)),
    "autoregressive/train/extract_codes_c2i_dual_code.py": (extract_codes.ExtractConfig, config_parser(extract_codes.ExtractConfig)),
    "autoregressive/sample/sample_c2i_ddp_dual_code.py": (sample_c2i.SampleConfig, config_parser(sample_c2i.SampleConfig)),
    "tokenizer/reconstruction_vq_ddp_dual.py": (reconstruct.ReconstructConfig, config_parser(reconstruct.ReconstructConfig)),
    "tokenizer/val_ddp.py": (val_ddp.ValConfig, config_parser(val_ddp.ValConfig)),
    "tokenizer/factor_report.py": (factor_report.ReportConfig, config_parser(factor_report.ReportConfig)),
    "tokenizer/reconstruct_image.py": (reconstruct_image.ImageConfig, config_parser(reconstruct_image.ImageConfig)),
    "evaluations/evaluator.py": (evaluator.EvalConfig, config_parser(evaluator.EvalConfig)),
    "autoregressive/convert.py": (convert.ConvertConfig, config_parser(convert.ConvertConfig)),
    "python -m utils.shards": (shards.ShardsConfig, config_parser(shards.ShardsConfig)),
}

# the seed's command lines (its README and launch scripts), paths shortened
SEED_TOKENIZER = ["--data-path", "d", "--image-size", "256", "--vq-model", "VQ-16", "--global-batch-size", "256",
                  "--codebook-size", "16384", "--codebook-embed-dim", "8", "--entropy-loss-ratio", "0.03",
                  "--epochs", "40", "--lr", "2e-4", "--with_disentanglement", "--disentanglement-ratio", "0.1",
                  "--with_clip_supervision", "--semantic-weight", "0.5", "--exp-name", "FQGAN_Dual"]
SEED_FAR = ["--code-path", "c", "--image-size", "256", "--vocab-size", "16384", "--epochs", "300", "--dataset",
            "imagenet_dual_code", "--gpt-model", "FAR-B", "--ckpt-every", "125000", "--lr", "1e-4",
            "--global-batch-size", "256", "--exp-name", "far_base_dual_code_300epoch"]
TOK = ["--data-path", "d", "--exp-name", "e"]
FAR = ["--code-path", "c", "--exp-name", "e"]


def help_text(parser) -> str:
    return " ".join(parser.format_help().split())  # one line: argparse wraps at the terminal's width


def compat_rows(cls):
    return [row for _, meta in flag_fields(cls) for row in meta.aliases] + list(getattr(cls, "IGNORED", ()))


@pytest.mark.parametrize("script", sorted(CONFIGS))
def test_the_parser_is_the_config(script):
    """Every flag of the parser sets a field of the config (or is an ignored compatibility flag), and every field
    declared as a flag is on the command line: nothing is declared twice, nothing is dropped."""
    cls, parser = CONFIGS[script]
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    ignored = {row.dest for row in getattr(cls, "IGNORED", ())}
    fields = {f.name for f, _ in flag_fields(cls)}
    teachers_elsewhere = {"teacher_sem", "teacher_sem_mid", "teacher_sem_high"} - dests
    assert dests - ignored == fields - teachers_elsewhere, script


@pytest.mark.parametrize("script", sorted(CONFIGS))
def test_help_lists_the_compatibility_flags_in_their_own_group(script):
    cls, parser = CONFIGS[script]
    text = parser.format_help()
    rows = compat_rows(cls)
    if not rows:
        assert COMPAT_GROUP not in text
        return
    group = text[text.index(COMPAT_GROUP):]
    for row in rows:
        assert row.flag in group, (script, row.flag)
        assert f"  {row.flag}" not in text[:text.index(COMPAT_GROUP)], (script, row.flag)  # listed once, there


def test_changing_a_default_in_the_config_changes_the_command_line_and_nothing_else():
    """The one declaration: a config with one default changed gives a --help that says so and a parse that
    returns it, with no other edit."""
    base = sample_c2i.SampleConfig
    field = next(f for f in dataclasses.fields(base) if f.name == "num_fid_samples")
    patched = dataclasses.make_dataclass(
        "Patched", [("num_fid_samples", int, dataclasses.field(default=12345, metadata=field.metadata))],
        bases=(base,), frozen=True)
    args = ["--vq-ckpt", "t.pt", "--gpt-ckpt", "g.pt"]
    assert "--num-fid-samples NUM_FID_SAMPLES (default: 50000)" in help_text(config_parser(base))
    assert "--num-fid-samples NUM_FID_SAMPLES (default: 12345)" in help_text(config_parser(patched))
    assert parse(patched, args).num_fid_samples == 12345 and parse(base, args).num_fid_samples == 50000
    assert parse(patched, args + ["--num-fid-samples", "7"]).num_fid_samples == 7


def test_ignored_flag_prints_one_line_and_only_when_given(capsys):
    cfg = tokenizer_train.parse_config(TOK + ["--cloud-save-path", "s3://bucket", "--weight-decay", "0.05"])
    out = capsys.readouterr().out.splitlines()
    assert out == ["--cloud-save-path is accepted for compatibility and ignored"]  # 0.05 is --weight-decay's default
    assert not hasattr(cfg, "cloud_save_path") and "cloud_save_path" not in vars(cfg.namespace())
    train_c2i.parse_config(SEED_FAR, 2)
    assert capsys.readouterr().out.splitlines() == ["--dataset is accepted for compatibility and ignored"]
    tokenizer_train.parse_config(TOK)
    assert capsys.readouterr().out == ""


def test_seed_command_lines_parse_onto_the_config(capsys):
    cfg = tokenizer_train.parse_config(SEED_TOKENIZER, "dual")
    assert cfg.with_clip_supervision and cfg.with_disentanglement and cfg.codebook_l2_norm
    assert (cfg.lr, cfg.global_batch_size, cfg.entropy_loss_ratio) == (2e-4, 256, 0.03)
    assert not tokenizer_train.parse_config(SEED_TOKENIZER + ["--no-clip-supervision"]).with_clip_supervision
    far = train_c2i.parse_config(SEED_FAR, 2)
    assert far.compile and far.gpt_model == "FAR-B" and far.ckpt_every == 125000
    extract = extract_codes.parse_config(
        ["--vq-ckpt", "t.pt", "--codebook-size", "16384", "--codebook-embed-dim", "8", "--data-path", "d",
         "--code-path", "c", "--ten-crop", "--crop-range", "1.1", "--image-size", "256"])
    assert extract.ten_crop and extract.codebook_size == 16384
    sample = sample_c2i.parse_config(
        ["--vq-ckpt", "t.pt", "--codebook-size", "16384", "--codebook-embed-dim", "8", "--gpt-ckpt", "g.pt",
         "--gpt-model", "FAR-B", "--image-size", "256", "--image-size-eval", "256", "--cfg-scale", "2.0",
         "--top-k", "0", "--top-p", "1.0", "--sample-dir", "s"])
    assert sample.precision == "bf16" and sample.cfg_scale == (2.0,) and sample.sweep == [(2.0,)]
    recon = reconstruct.parse_config(
        ["--data-path", "v", "--image-size", "256", "--vq-model", "VQ-16", "--vq-ckpt", "t.pt", "--codebook-size",
         "16384", "--codebook-embed-dim", "8", "--per-proc-batch-size", "128", "--with_clip_supervision",
         "--folder-name", "FQGAN_Dual_DS16"])
    assert recon.folder_name == "FQGAN_Dual_DS16"
    assert parse(val_ddp.ValConfig, ["--data-path", "v", "--image-size", "256",
                                     "--per-proc-batch-size", "128"]).image_size == 256


def test_no_codebook_l2_norm_turns_it_off():
    assert tokenizer_train.parse_config(TOK).codebook_l2_norm
    cfg = tokenizer_train.parse_config(TOK + ["--no-codebook-l2-norm"])
    assert not cfg.codebook_l2_norm
    assert not tokenizer_train.build_config(cfg, 256).codebook_l2_norm


def test_what_a_resume_may_change_is_declared_on_the_fields():
    assert set(fields_where(tokenizer_train.TrainConfig, resume="fixed")) == {
        "global_batch_size", "image_size", "global_seed", "vq_model", "codebook_size", "codebook_embed_dim", "ch",
        "ch_mult", "num_res_blocks", "z_channels", "adapter_layers", "head_layers", "with_clip_supervision",
        "disc_type"}
    assert set(fields_where(train_c2i.TrainConfig, resume="fixed")) == {
        "global_batch_size", "image_size", "downsample_size", "global_seed", "gpt_model", "vocab_size",
        "num_classes", "cls_token_num"}
    assert {"auto_resume", "vq_ckpt", "finetune", "unsafe_load", "wandb"} <= set(
        fields_where(tokenizer_train.TrainConfig, resume="ignored"))


def test_resumable_outputs_are_keyed_by_what_changes_them():
    """A sampler rerun that changes only a speed flag resumes; one that changes the images does not."""
    args = ["--vq-ckpt", "t.pt", "--gpt-ckpt", "g.pt"]
    key = output_values(sample_c2i.parse_config(args))
    for speed in (["--per-proc-batch-size", "8"], ["--no-compile"], ["--attention", "reductions"],
                  ["--decode-precision", "fp32"], ["--fid-ref", "r.npz"], ["--unsafe-load"]):
        assert output_values(sample_c2i.parse_config(args + speed)) == key, speed
    for change in (["--cfg-scale", "2.0"], ["--global-seed", "1"], ["--top-k", "5"], ["--ema"]):
        assert output_values(sample_c2i.parse_config(args + change)) != key, change
    extract = ["--vq-ckpt", "t.pt", "--data-path", "d", "--code-path", "c"]
    assert output_values(extract_codes.parse_config(extract + ["--batch-size", "3"])) == \
        output_values(extract_codes.parse_config(extract))
    assert output_values(extract_codes.parse_config(extract + ["--ten-crop"])) != \
        output_values(extract_codes.parse_config(extract))


def test_help_shows_the_defaults_and_every_count_is_checked(capsys):
    text = help_text(config_parser(reconstruct.ReconstructConfig))
    assert "--sample-dir SAMPLE_DIR (default: reconstructions)" in text
    assert "--per-proc-batch-size PER_PROC_BATCH_SIZE (default: 32)" in text
    for flags in (["--per-proc-batch-size", "0"], ["--num-workers", "-1"]):
        with pytest.raises(SystemExit) as e:
            reconstruct.parse_config(["--data-path", "v", "--vq-ckpt", "t.pt", *flags])
        assert e.value.code == 2 and "must be >=" in capsys.readouterr().err


def test_recipes_set_defaults_that_flags_override(capsys):
    cfg = tokenizer_train.parse_config(TOK + ["--recipe", "fqgan-dual"], "dual")
    assert (cfg.lr, cfg.global_batch_size, cfg.micro_batch_size, cfg.entropy_loss_ratio) == (2e-4, 256, 32, 0.03)
    assert cfg.with_clip_supervision and cfg.with_disentanglement and cfg.recipe == "fqgan-dual"
    cfg = tokenizer_train.parse_config(TOK + ["--recipe", "fqgan-dual", "--lr", "1e-3", "--no-clip-supervision"])
    assert cfg.lr == 1e-3 and not cfg.with_clip_supervision and cfg.epochs == 40
    assert train_c2i.parse_config(FAR + ["--recipe", "far"], 3).ckpt_every == 125000
    with pytest.raises(ValueError, match=r"--recipe fqgan-triple trains a triple tokenizer, not a dual one: "
                                         r"use tokenizer/vq_train_triple.py"):
        tokenizer_train.parse_config(TOK + ["--recipe", "fqgan-triple"], "dual")
    single = tokenizer_train.parse_config(TOK + ["--recipe", "llamagen-vq"], "single")
    assert (single.global_batch_size, single.lr, single.with_clip_supervision) == (128, 1e-4, False)
    with pytest.raises(SystemExit) as e:
        tokenizer_train.parse_config(TOK + ["--recipe", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("world,extra,split", [
    (1, [], (8, 32)), (8, [], (1, 32)), (16, [], (1, 16)), (2, ["--gradient-accumulation-steps", "2"], (2, 64)),
])
def test_the_batch_split_keeps_the_recipes_forward_pass(world, extra, split):
    cfg = tokenizer_train.parse_config(TOK + ["--recipe", "fqgan-dual", *extra])
    s = batch_split(cfg, world)
    assert (s.accum, s.micro) == split and s.world * s.accum * s.micro == 256


def test_a_batch_that_does_not_split_is_one_line():
    cfg = tokenizer_train.parse_config(TOK + ["--recipe", "fqgan-dual"])
    with pytest.raises(RunError) as e:
        batch_split(cfg, 3)
    assert str(e.value) == ("--global-batch-size 256 is not divisible by 3 processes x 2 accumulation steps (give "
                            "--gradient-accumulation-steps, or a number of processes that divides it)")


def test_one_precision_vocabulary():
    for spelling, name in (("none", "fp32"), ("float32", "fp32"), ("fp32", "fp32"), ("bfloat16", "bf16"),
                           ("bf16", "bf16"), ("float16", "fp16"), ("fp16", "fp16")):
        assert precision(spelling) == name
    with pytest.raises(argparse.ArgumentTypeError, match="not a precision"):
        precision("int8")
    assert tokenizer_train.parse_config(TOK + ["--mixed-precision", "none"]).mixed_precision == "fp32"
    assert train_c2i.parse_config(FAR + ["--mixed-precision", "bfloat16"], 2).mixed_precision == "bf16"
    assert not train_c2i.parse_config(FAR + ["--no-compile"], 2).compile


@pytest.mark.parametrize("flags,message", [
    (["--beta1", "1.5"], "--beta1 1.5: must be in [0, 1)"),
    (["--ch-mult", "1,x"], "--ch-mult '1,x': expected comma-separated integers"),
    (["--finetune"], "--finetune starts from --vq-ckpt's weights"),
    (["--global-batch-size", "6", "--gradient-accumulation-steps", "4"], "--global-batch-size 6 is not divisible"),
])
def test_tokenizer_config_refuses_bad_combinations_in_one_line(flags, message):
    with pytest.raises(ValueError) as e:
        tokenizer_train.parse_config(TOK + flags)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_far_config_refuses_bad_combinations_in_one_line(capsys):
    with pytest.raises(ValueError, match="not combined with --fsdp"):
        train_c2i.parse_config(FAR + ["--fsdp", "--ema"], 2)
    with pytest.raises(ValueError, match="--image-size 250 is not a multiple of --downsample-size 16"):
        train_c2i.parse_config(FAR + ["--image-size", "250"], 2)
    with pytest.raises(SystemExit) as e:  # main: one line, no traceback
        train_c2i.main(FAR + ["--fsdp", "--ema"], 2)
    assert str(e.value).startswith("error: --ema keeps a full copy") and "\n" not in str(e.value)
    cfg = train_c2i.parse_config(FAR, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


def test_sampler_checks_its_combinations_before_any_work(capsys):
    base = ["--vq-ckpt", "t.pt", "--gpt-ckpt", "g.pt"]
    for flags, message in ((["--no-save-npz"], "error: --no-save-npz keeps nothing but the grid without --fid-ref"),
                           (["--cfg-scales", "1.5,x"], "error: --cfg-scales 1.5,x: expected comma-separated numbers")):
        with pytest.raises(SystemExit) as e:
            sample_c2i.main(base + flags)
        assert str(e.value).startswith(message)
    assert sample_c2i.parse_config(base + ["--cfg-scales", "1.5, 2"]).sweep == [(1.5,), (2.0,)]


def test_a_flag_field_of_any_kind():
    """The field kinds the configs use: a required value, a switch, a tri-state switch, a list, a positional."""
    @dataclasses.dataclass(frozen=True)
    class C:
        path: str = flag(positional=True, help="input")
        name: str = flag("", required=True)
        on: bool = flag(False)
        auto: Optional[bool] = flag(None, action=argparse.BooleanOptionalAction)
        sizes: tuple = flag((1, 2), type=int, nargs="+")
    c = parse(C, ["p", "--name", "n", "--on", "--no-auto", "--sizes", "3"])
    assert c == C("p", "n", True, False, (3,))
    assert parse(C, ["p", "--name", "n"]) == C("p", "n", False, None, (1, 2))
