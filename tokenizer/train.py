"""The tokenizer training loop: one implementation behind ``vq_train_dual.py`` and ``vq_train_triple.py``, and
for LlamaGen's single codebook (``main(preset="single")``: LlamaGen's recipe, without semantic supervision or
disentanglement, which need a semantic factor and two factors).

Runs under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPUs) or as a plain ``python`` process. ``build`` turns
the flags into everything a run trains with (a ``Trainer``); ``main`` then runs a plain loop of
``train_step``: each step is the original's pair of updates, the tokenizer (reconstruction, LPIPS, quantizer,
disentanglement, semantic and, after ``--disc-start``, adversarial losses), then the discriminator.

Checkpoints are written atomically in the released layout and carry what an exact resume needs:
``--vq-ckpt`` (or ``--auto-resume``) continues at the saved step, mid-epoch, with the same data order,
augmentations and RNG state, so on CPU a resumed run's losses equal an uninterrupted run's. SIGTERM or
SIGUSR1 (preemption) stops every rank after its current step with such a checkpoint. A step whose loss or
gradient is not finite is skipped and counted; ``--max-nonfinite-steps`` in a row stop the run.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tokenizer.losses import FQGANLoss, LossConfig, RealAndFake, build_discriminator
from tokenizer.models import (FactorizedTokenizer, TokenizerConfig, describe_tokenizer, infer_tokenizer_config,
                              load_tokenizer_weights, preset_factors, tokenizer_checkpoint, tokenizer_config)
from tokenizer.teachers import (TeacherUnavailableError, Teachers, add_teacher_arguments, load_teachers,
                                teacher_overrides_from_args)
from utils.argtypes import finite_float, nonnegative_float, nonnegative_int, positive_float, positive_int, unit_float
from utils.checkpoint import extract_weights
from utils.data import ImageFolderSafe, ResumableSampler, collate_train, train_transform
from utils.distributed import is_distributed
from utils.ema import new_ema, update_ema
from utils.flags import (add_compat_flags, add_compile_argument, add_precision_argument, alias, from_flags, ignored,
                         parse_flags, require)
from utils.images import save_grid
from utils.logs import MetricWriter
from utils.progress import MetricAverager, Throughput, report
from utils.rng import seed_everything
from utils.run import (Checkpoints, Position, Run, RunConfig, StopSignal, add_run_arguments, check_resumed_flags,
                       epoch_batches, fail, find_resume, finish_run, restore_position, save_run_checkpoint,
                       start_run)
from utils.steps import (NonFiniteGuard, accumulation, autocast_context, frozen, fused_kwargs, grad_scaler,
                         optimizer_step)

BAD_INPUT = (ValueError, FileNotFoundError, TeacherUnavailableError)  # one-line errors, raised by build()
# Flags a resumed run may not change: the saved data position and weights would be read with another meaning.
RESUME_FIXED = ("global_batch_size", "image_size", "global_seed", "vq_model", "codebook_size", "codebook_embed_dim",
                "ch", "ch_mult", "num_res_blocks", "z_channels", "adapter_layers", "head_layers",
                "with_clip_supervision", "disc_type")


# The original training scripts' flags that this project spells otherwise or does not use (see utils/flags.py).
COMPAT = (
    alias("--with_clip_supervision", dest="with_clip_supervision", action="store_true",
          help="= --clip-supervision"),
    alias("--with_disentanglement", dest="with_disentanglement", action="store_true", help="= --disentanglement"),
    ignored("--data-face-path", type=str, default=None),
    ignored("--cloud-save-path", type=str, default=None, help="checkpoints are written to --results-dir"),
    ignored("--dataset", type=str, default="imagenet", help="--data-path is an ImageFolder"),
    ignored("--weight-decay", type=float, default=5e-2, help="Adam without decay, as the original trains"),
)


def get_parser(preset: str) -> argparse.ArgumentParser:
    """The original training scripts' flags with their defaults, plus this project's additions."""
    kind = "a single-codebook (LlamaGen VQ)" if preset == "single" else f"an FQGAN-{preset}"
    p = argparse.ArgumentParser(description=f"Train {kind} tokenizer.")
    p.add_argument("--data-path", type=str, required=True, help="ImageFolder root of the training images")
    p.add_argument("--no-local-save", action="store_true", help="do not write checkpoints (debugging)")
    p.add_argument("--vq-model", type=str, choices=["VQ-16", "VQ-8"], default="VQ-16")
    p.add_argument("--vq-ckpt", type=str, default=None, help="checkpoint to resume from (or to --finetune)")
    p.add_argument("--finetune", action="store_true", help="start from --vq-ckpt's weights at step 0")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights (saved as 'ema')")
    p.add_argument("--codebook-size", type=int, default=16384)
    p.add_argument("--codebook-embed-dim", type=int, default=8)
    p.add_argument("--codebook-l2-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="l2-normalised codes and features (--no-codebook-l2-norm: plain Euclidean codes)")
    p.add_argument("--codebook-weight", type=nonnegative_float, default=1.0)
    p.add_argument("--entropy-loss-ratio", type=nonnegative_float, default=0.0)
    p.add_argument("--commit-loss-beta", type=nonnegative_float, default=0.25)
    p.add_argument("--reconstruction-weight", type=nonnegative_float, default=1.0)
    p.add_argument("--reconstruction-loss", type=str, choices=["l2", "l1"], default="l2")
    p.add_argument("--perceptual-weight", type=nonnegative_float, default=1.0,
                   help="LPIPS weight (0: no VGG needed)")
    p.add_argument("--disc-weight", type=nonnegative_float, default=0.5)
    p.add_argument("--disc-start", type=nonnegative_int, default=20000)
    p.add_argument("--disc-type", type=str, choices=["patchgan", "stylegan"], default="patchgan")
    p.add_argument("--disc-loss", type=str, choices=["hinge", "vanilla", "non-saturating"], default="hinge")
    p.add_argument("--gen-loss", type=str, choices=["hinge", "non-saturating"], default="hinge")
    p.add_argument("--disc-adaptive-weight", action="store_true", help="VQGAN gradient-norm GAN weighting")
    add_compile_argument(p, False, "torch.compile the tokenizer, LPIPS and the discriminator")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="channels-last memory layout for the convolutions (auto: on CUDA)")
    p.add_argument("--dropout-p", type=unit_float, default=0.0)
    p.add_argument("--results-dir", type=str, default="results_tokenizer_image")
    p.add_argument("--exp-name", type=str, required=True)
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--beta1", type=finite_float, default=0.9)
    p.add_argument("--beta2", type=finite_float, default=0.95)
    p.add_argument("--max-grad-norm", type=nonnegative_float, default=1.0, help="0 disables clipping")
    p.add_argument("--global-batch-size", type=positive_int, default=128)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--num-workers", type=nonnegative_int, default=16)
    p.add_argument("--log-every", type=positive_int, default=100)
    p.add_argument("--ckpt-every", type=positive_int, default=5000)
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    add_precision_argument(p, "--mixed-precision", "bf16", "autocast dtype on GPU (CPU runs fp32)")
    p.add_argument("--clip-supervision", dest="with_clip_supervision", action=argparse.BooleanOptionalAction,
                   default=False, help="feature heads + semantic teachers (--no-clip-supervision turns a launch "
                                       "script's default off again)")
    p.add_argument("--disentanglement", dest="with_disentanglement", action=argparse.BooleanOptionalAction,
                   default=False, help="the disentanglement regulariser (weight --disentanglement-ratio)")
    p.add_argument("--semantic-weight", type=nonnegative_float, default=0.5)
    p.add_argument("--disentanglement-ratio", type=nonnegative_float, default=0.1)
    # this project's additions
    add_teacher_arguments(p, preset_factors(preset))
    p.add_argument("--teacher-image-size", type=positive_int, default=224, help="input size of the semantic teachers")
    arch = p.add_argument_group("architecture (defaults: the paper's; smaller values for CPU runs and tests)")
    arch.add_argument("--ch", type=int, default=128, help="base channels of the conv encoder/decoder")
    arch.add_argument("--ch-mult", type=str, default=None,
                      help="channel multipliers per level, e.g. 1,2,2 (default: --vq-model's)")
    arch.add_argument("--num-res-blocks", type=int, default=2)
    arch.add_argument("--z-channels", type=int, default=256)
    arch.add_argument("--adapter-layers", type=int, default=6)
    arch.add_argument("--head-layers", type=int, default=3)
    p.add_argument("--vgg-path", type=str, default=None, help="torchvision vgg16-397923af.pth for LPIPS")
    p.add_argument("--max-steps", type=nonnegative_int, default=0,
                   help="stop after this many steps (0: run all epochs)")
    p.add_argument("--image-every", type=nonnegative_int, default=0,
                   help="PNG grid of inputs/reconstructions every N steps (default 5 x --log-every)")
    p.add_argument("--ema-decay", type=unit_float, default=0.9999)
    add_run_arguments(p)
    add_compat_flags(p, COMPAT)
    return p


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """What a tokenizer run is asked to do: the command line's flags, parsed once and checked (``parse_config``).
    Field names are the flags' (``--disc-start`` -> ``disc_start``); checkpoints store them as their ``args``."""
    data_path: str = ""
    vq_model: str = "VQ-16"
    vq_ckpt: Optional[str] = None
    finetune: bool = False
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_weight: float = 1.0
    entropy_loss_ratio: float = 0.0
    commit_loss_beta: float = 0.25
    reconstruction_weight: float = 1.0
    reconstruction_loss: str = "l2"
    perceptual_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 20000
    disc_type: str = "patchgan"
    disc_loss: str = "hinge"
    gen_loss: str = "hinge"
    disc_adaptive_weight: bool = False
    compile: bool = False
    channels_last: str = "auto"
    dropout_p: float = 0.0
    results_dir: str = "results_tokenizer_image"
    image_size: int = 256
    epochs: int = 40
    global_batch_size: int = 128
    num_workers: int = 16
    with_clip_supervision: bool = False
    with_disentanglement: bool = False
    semantic_weight: float = 0.5
    disentanglement_ratio: float = 0.1
    teacher_sem: Optional[str] = None
    teacher_sem_mid: Optional[str] = None
    teacher_sem_high: Optional[str] = None
    teacher_image_size: int = 224
    ch: int = 128
    ch_mult: Optional[str] = None  # as given ("1,2,2"): checkpoints compare it as the original string
    num_res_blocks: int = 2
    z_channels: int = 256
    adapter_layers: int = 6
    head_layers: int = 3
    vgg_path: Optional[str] = None
    image_every: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.channel_multipliers()  # a malformed --ch-mult fails here
        require(not (self.finetune and not self.vq_ckpt), "--finetune starts from --vq-ckpt's weights: give one")

    def channel_multipliers(self) -> Optional[tuple[int, ...]]:
        if not self.ch_mult:
            return None
        try:  # the values themselves are the model config's to check
            return tuple(int(v) for v in self.ch_mult.split(","))
        except ValueError:
            raise ValueError(f"--ch-mult {self.ch_mult!r}: expected comma-separated integers, e.g. 1,2,2") from None

    @property
    def semantic(self) -> bool:
        """Semantic supervision with a loss: the feature heads train and the teachers are needed."""
        return self.with_clip_supervision and self.semantic_weight > 0

    @property
    def image_every_steps(self) -> int:
        return self.image_every or 5 * self.log_every


def parse_config(argv=None, preset: str = "dual") -> TrainConfig:
    """The command line as a ``TrainConfig``: bad values stop with argparse's one-line error, bad combinations
    with a ValueError (one line in ``main``); the original's ignored flags print one line each."""
    return from_flags(TrainConfig, parse_flags(get_parser(preset), COMPAT, argv))


def build_config(cfg: TrainConfig, preset: str, base_image_size: int) -> TokenizerConfig:
    """The tokenizer config the flags describe (feature heads as wide as the preset's teachers)."""
    arch = dict(ch=cfg.ch, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
                adapter_layers=cfg.adapter_layers, head_layers=cfg.head_layers)
    if cfg.ch_mult:
        arch["ch_mult"] = cfg.channel_multipliers()
    return tokenizer_config(
        preset, cfg.vq_model, codebook_size=cfg.codebook_size, codebook_embed_dim=cfg.codebook_embed_dim,
        codebook_l2_norm=cfg.codebook_l2_norm, commit_loss_beta=cfg.commit_loss_beta,
        entropy_loss_ratio=cfg.entropy_loss_ratio, dropout_p=cfg.dropout_p,
        with_feature_heads=cfg.with_clip_supervision,
        disentanglement_ratio=cfg.disentanglement_ratio if cfg.with_disentanglement else 0.0,
        base_image_size=base_image_size, **arch)


def fit_heads_to_teachers(cfg: TokenizerConfig, teachers: Teachers) -> TokenizerConfig:
    """Each feature head as wide as its teacher's class token (a teacher given with --teacher-* may differ)."""
    return cfg.replace(factors=tuple(dataclasses.replace(f, head_width=teachers[i].width) if i in teachers.factors()
                                     else f for i, f in enumerate(cfg.factors)))


def loss_config(cfg: TrainConfig) -> LossConfig:
    """The loss the flags describe (the discriminator's shape included)."""
    return LossConfig(
        reconstruction_loss=cfg.reconstruction_loss, reconstruction_weight=cfg.reconstruction_weight,
        perceptual_weight=cfg.perceptual_weight, codebook_weight=cfg.codebook_weight,
        semantic_weight=cfg.semantic_weight if cfg.with_clip_supervision else 0.0,
        disc_weight=cfg.disc_weight, disc_start=cfg.disc_start, disc_type=cfg.disc_type,
        disc_loss=cfg.disc_loss, gen_loss=cfg.gen_loss, disc_adaptive_weight=cfg.disc_adaptive_weight,
        image_size=cfg.image_size, vgg_path=cfg.vgg_path)


@dataclass
class Trainer:
    """Everything a tokenizer run trains with, as ``build`` returns it. One handle per role: ``model`` and
    ``disc`` are the modules whose weights are saved and stepped (compiled in place with --compile, so the
    generator step judges with ``disc`` itself); ``train_model`` and ``train_disc`` are what each update runs
    (DDP-wrapped under torchrun; ``train_disc`` runs ``disc`` on real and fake images in one call)."""
    cfg: TrainConfig
    run: Run
    config: TokenizerConfig
    model: FactorizedTokenizer
    train_model: nn.Module
    ema: Optional[FactorizedTokenizer]
    teachers: Optional[Teachers]
    loss_fn: FQGANLoss
    disc: nn.Module
    train_disc: nn.Module
    optimizer: torch.optim.Optimizer
    optimizer_disc: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scaler_disc: torch.amp.GradScaler
    dataset: ImageFolderSafe
    sampler: ResumableSampler
    total_steps: int
    start: Position
    bad_images: int = 0

    def checkpoint(self) -> dict:
        """Models and optimizers in the released layout (steps and resume state are added when saving)."""
        return tokenizer_checkpoint(self.model, self.ema, optimizer=self.optimizer.state_dict(),
                                    discriminator=self.disc.state_dict(),
                                    optimizer_disc=self.optimizer_disc.state_dict(), args=self.cfg.namespace())

    def save(self, pos: Position) -> Optional[Path]:
        return save_run_checkpoint(self.run, pos, self.checkpoint(), bad_images=self.bad_images,
                                   scaler=self.scaler.state_dict(), scaler_disc=self.scaler_disc.state_dict())


def build(cfg: TrainConfig, preset: str) -> Trainer:
    """Everything the flags describe, resumed from a checkpoint when asked. Every file from outside (checkpoint,
    teachers, VGG16 weights, data) is checked here, before any training; problems raise one of BAD_INPUT."""
    run = start_run(cfg, cfg.vq_model)
    device, world, log = run.info.device, run.info.world_size, run.logger

    # The checkpoint to resume from is read first: its learned positions fix the model's base image size. The run
    # folder's own checkpoints win over --vq-ckpt / --finetune, which only seed a fresh run.
    resume = find_resume(cfg.vq_ckpt, run, "--vq-ckpt")
    resume_path, ckpt = resume.path, resume.ckpt
    finetune = cfg.finetune and not resume.own
    if ckpt is not None and not finetune:
        check_resumed_flags(ckpt, cfg.namespace(), RESUME_FIXED, resume_path, log)
    weights = extract_weights(ckpt, resume_path, prefer=("model", "ema", "state_dict"))[0] if ckpt else None
    config, teachers = model_and_teachers(cfg, preset, infer_tokenizer_config(weights, resume_path).base_image_size
                                          if weights else cfg.image_size, device)
    model = FactorizedTokenizer(config)
    try:
        loss_fn = FQGANLoss(loss_config(cfg), model.factor_names).to(device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (or pass --perceptual-weight 0 to train without LPIPS)") from None
    lc = loss_fn.config
    disc = build_discriminator(lc.disc_type, lc.disc_in_channels, lc.disc_dim, lc.disc_num_layers, lc.image_size)
    dataset = ImageFolderSafe(cfg.data_path, train_transform(cfg.image_size), cfg.image_size,
                              seed=cfg.global_seed, fallback=True)
    sampler = ResumableSampler(len(dataset), run.micro_batch * run.accum, run.info.rank, world, cfg.global_seed)
    total_steps = cfg.total_steps(sampler.batches_per_epoch)
    describe_setup(cfg, log, config, model, teachers, disc, dataset, sampler, total_steps, device)

    model.to(device)
    disc.to(device)
    ema = new_ema(model) if cfg.ema else None
    seed_everything(cfg.global_seed * world + run.info.rank)  # from here on every rank draws its own randomness
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused_kwargs(torch.optim.Adam))
    optimizer = torch.optim.Adam(model.parameters(), **adam)
    optimizer_disc = torch.optim.Adam(disc.parameters(), **adam)
    scaler, scaler_disc = grad_scaler(device, cfg.mixed_precision), grad_scaler(device, cfg.mixed_precision)

    start, bad_images = Position(), 0
    if ckpt is not None:
        load_tokenizer_weights(model, weights, resume_path, allow_missing_heads=finetune)
        if ema is not None:
            load_tokenizer_weights(ema, ckpt.get("ema") or weights, resume_path, allow_missing_heads=finetune)
        for name, obj in (("optimizer", optimizer), ("discriminator", disc), ("optimizer_disc", optimizer_disc)):
            if name in ckpt:
                obj.load_state_dict(ckpt[name])
            else:
                log.warning(f"{resume_path} has no '{name}'; it starts fresh")
        if not finetune:
            start, state = restore_position(ckpt, sampler.batches_per_epoch,
                                            {"scaler": scaler, "scaler_disc": scaler_disc}, log)
            bad_images = state.get("bad_images", 0)
        log.info(f"Resumed from {resume_path}: step {start.step}, epoch {start.epoch}, batch {start.batch}"
                 + (" (finetune: step counter reset)" if finetune else ""))
    elif ema is not None:
        update_ema(ema, model, decay=0)

    train_model, train_disc = prepare_modules(cfg, device, model, disc, loss_fn,
                                              unused=bool(config.head_factors) and not lc.semantic_weight)
    return Trainer(cfg=cfg, run=run, config=config, model=model, train_model=train_model, ema=ema,
                   teachers=teachers, loss_fn=loss_fn, disc=disc, train_disc=train_disc, optimizer=optimizer,
                   optimizer_disc=optimizer_disc, scaler=scaler, scaler_disc=scaler_disc, dataset=dataset,
                   sampler=sampler, total_steps=total_steps, start=start, bad_images=bad_images)


def model_and_teachers(cfg: TrainConfig, preset: str, base_image_size: int,
                       device: torch.device) -> tuple[TokenizerConfig, Optional[Teachers]]:
    """The tokenizer's config and, with semantic supervision, its teachers (loaded and checked here)."""
    config, teachers = build_config(cfg, preset, base_image_size), None
    if cfg.with_clip_supervision and not config.head_factors:
        raise ValueError(f"--with_clip_supervision: the {preset} tokenizer has no semantic factor to supervise")
    if cfg.with_disentanglement and config.num_factors < 2:
        raise ValueError(f"--with_disentanglement: the {preset} tokenizer has one factor, nothing to disentangle")
    if cfg.semantic:  # heads without loss (weight 0) need no teachers
        teachers = load_teachers(config, teacher_overrides_from_args(cfg, config), check_width=False,
                                 image_size=cfg.teacher_image_size).to(device)
        config = fit_heads_to_teachers(config, teachers)
    if cfg.image_size % config.downsample:
        raise ValueError(f"--image-size {cfg.image_size} is not a multiple of the downsampling factor "
                         f"{config.downsample}")
    return config, teachers


def describe_setup(cfg: TrainConfig, log, config: TokenizerConfig, model: nn.Module, teachers: Optional[Teachers],
                   disc: nn.Module, dataset: ImageFolderSafe, sampler: ResumableSampler, total_steps: int,
                   device: torch.device) -> None:
    log.info(f"Tokenizer: {describe_tokenizer(config)}; {sum(p.numel() for p in model.parameters()):,} parameters")
    if config.disentanglement_ratio:
        log.info(f"Disentanglement ratio: {config.disentanglement_ratio}")
    for i in teachers.factors() if teachers is not None else []:
        log.info(f"Teacher of factor {config.factors[i].name}: {teachers[i].name} (width {teachers[i].width})")
    if teachers is None:
        log.info("No semantic supervision (pass --with_clip_supervision to train the feature heads)")
    if not cfg.perceptual_weight:
        log.info("LPIPS off (--perceptual-weight 0); with VGG16 weights available, use --perceptual-weight 1")
    log.info(f"Discriminator ({cfg.disc_type}): {sum(p.numel() for p in disc.parameters()):,} parameters")
    log.info(f"Dataset: {len(dataset):,} images in {len(dataset.classes)} classes ({cfg.data_path}); "
             f"{sampler.batches_per_epoch} steps per epoch, {total_steps} steps in all")
    if device.type != "cuda" and cfg.mixed_precision != "fp32":
        log.info("CPU run: training in fp32 (--mixed-precision applies on GPU)")


def prepare_modules(cfg: TrainConfig, device: torch.device, model: nn.Module, disc: nn.Module, loss_fn: FQGANLoss,
                    unused: bool) -> tuple[nn.Module, nn.Module]:
    """Memory layout, compilation (in place: the tokenizer, LPIPS and the discriminator; the loss arithmetic
    around them stays eager) and DDP. Returns what the two updates run: (train_model, train_disc). ``unused``:
    feature heads without semantic loss leave parameters without gradients."""
    if channels_last(cfg.channels_last, device):  # NHWC convolutions: what cuDNN's bf16 kernels run fastest
        for m in (model, disc, loss_fn):
            m.to(memory_format=torch.channels_last)
    if cfg.compile:
        for m in (model, disc, loss_fn.perceptual):
            if m is not None:
                m.compile()
    train_model, train_disc = model, RealAndFake(disc)
    if is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        train_model = DDP(train_model, device_ids=ids, find_unused_parameters=unused)
        train_disc = DDP(train_disc, device_ids=ids)
    model.train()
    loss_fn.train()
    return train_model, train_disc


def channels_last(mode: str, device: torch.device) -> bool:
    """--channels-last: "on", "off" or "auto" (on CUDA)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def idle_discriminator_step(optimizer: torch.optim.Optimizer, disc: nn.Module) -> None:
    """Before --disc-start the original still steps the discriminator's Adam with all-zero gradients (its loss is
    0 * d_loss): the step counter advances while the weights stay put. Doing the same keeps Adam's bias
    correction, and so the first real discriminator updates, identical."""
    for p in disc.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()


def train_step(t: Trainer, images: torch.Tensor, step: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One tokenizer update, then one discriminator update, on ``images`` (this rank's batch, split into
    micro-batches). ``step`` is 1-based, like the original's global step. Returns the logs (device tensors),
    whether an update was skipped for non-finite gradients, and the last micro-batch's reconstructions."""
    cfg, autocast = t.cfg, autocast_context(t.run.info.device, t.cfg.mixed_precision)
    if channels_last(cfg.channels_last, images.device):
        images = images.contiguous(memory_format=torch.channels_last)
    micro = images.split(t.run.micro_batch)

    t.optimizer.zero_grad(set_to_none=True)
    recons = []
    for x, sync in accumulation(t.train_model, micro):
        with sync, autocast():
            out = t.train_model(x)
            with torch.no_grad():
                teacher_cls = t.teachers(x) if t.teachers is not None else None
            with frozen(t.disc):
                gen = t.loss_fn.generator_step(x, out, step, teacher_cls, t.model.decoder.last_layer, t.disc)
        t.scaler.scale(gen.loss / len(micro)).backward()
        recons.append(out.recon.detach())
    grad_norm, skipped = optimizer_step(t.optimizer, t.scaler, t.model.parameters(), cfg.max_grad_norm)
    if t.ema is not None:
        update_ema(t.ema, t.model, cfg.ema_decay)
    logs = {**gen.logs(), "grad_norm": grad_norm}

    t.optimizer_disc.zero_grad(set_to_none=True)
    if t.loss_fn.disc_factor(step) > 0:
        for (x, rec), sync in accumulation(t.train_disc, zip(micro, recons)):
            with sync, autocast():
                disc = t.loss_fn.discriminator_step(t.train_disc, x, rec, step)
            t.scaler_disc.scale(disc.loss / len(micro)).backward()
        _, disc_skipped = optimizer_step(t.optimizer_disc, t.scaler_disc, t.disc.parameters(), cfg.max_grad_norm)
        skipped = skipped | disc_skipped
        logs.update(disc.logs())
    else:
        idle_discriminator_step(t.optimizer_disc, t.disc)
    return logs, skipped, recons[-1]


def progress_parts(avg: dict[str, float], factor_names: list[str], bad_images: int, skipped: int) -> list[str]:
    usage = " ".join(f"{n}={avg[f'codebook_usage_{n}']:.3f}" for n in factor_names)
    return ([f"loss={avg['loss']:.4f}", f"rec={avg['rec_loss']:.4f}"]
            + ([f"lpips={avg['perceptual_loss']:.4f}"] if "perceptual_loss" in avg else [])
            + [f"dis={avg['disentangle_loss']:.4f}", f"usage[{usage}]", f"grad={avg['grad_norm']:.3f}"]
            + ([f"skipped {bad_images} bad images"] if bad_images else [])
            + ([f"skipped {skipped} non-finite steps"] if skipped else []))


def main(argv=None, preset: str = "dual") -> Optional[Path]:
    try:
        cfg = parse_config(argv, preset)
        t = build(cfg, preset)
    except BAD_INPUT as e:
        fail(e)
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing to save (the stop signal is not set yet)
        fail("interrupted while setting up the run; no checkpoint was written")
    run, log, device = t.run, t.run.logger, t.run.info.device
    writer = MetricWriter(run.exp_dir / "tensorboard", run.info.is_main, cfg.wandb, "fqgan-tokenizer",
                          cfg.exp_name, cfg.namespace(), log)
    if run.info.is_main:
        (run.exp_dir / "images").mkdir(parents=True, exist_ok=True)
    throughput, averager = Throughput(device), MetricAverager(device)
    guard, stop = NonFiniteGuard(device, cfg.max_nonfinite_steps), StopSignal(cfg.stop_timeout)

    log.info(f"Training for {cfg.epochs} epochs ({t.total_steps - t.start.step} steps to go)...")
    pos, error, checkpoints = t.start, None, Checkpoints(t.save, cfg.ckpt_every, t.start)
    batches = epoch_batches(t.start, cfg.epochs, t.dataset, t.sampler, run.micro_batch * run.accum,
                            cfg.num_workers, collate_train, device, cfg.global_seed)
    for epoch, done, (images, _, n_bad) in batches:
        if pos.step >= t.total_steps:
            break
        images = images.to(device, non_blocking=True)
        logs, skipped, recon = train_step(t, images, pos.step + 1)
        pos = Position(pos.step + 1, epoch, done)
        t.bad_images += n_bad
        guard.update(skipped)
        averager.add(logs)
        throughput.update(len(images) * run.info.world_size)

        if pos.step % cfg.log_every == 0 or pos.step == t.total_steps:
            check = guard.check()
            avg = {**averager.reduce(), "lr": t.optimizer.param_groups[0]["lr"], "bad_images": t.bad_images,
                   "nonfinite_steps": check.skipped}
            report(log, writer, run.metrics_file, pos.step, t.total_steps, epoch, avg,
                   throughput.report(t.total_steps - pos.step),
                   progress_parts(avg, t.model.factor_names, t.bad_images, check.skipped))
            if check.error:
                error = check.error
                break
        if run.info.is_main and pos.step % cfg.image_every_steps == 0:
            shown = images[-len(recon):][:8]
            grid = save_grid(torch.cat([shown.float(), recon[:8].float()]).cpu(),
                             run.exp_dir / "images" / f"{pos.step:07d}.png", nrow=len(shown))
            writer.image("train/inputs_and_reconstructions", grid, pos.step)
        stopping = stop.requested()
        checkpoints.after_step(pos, stopping)
        if stopping:
            stop.announce(log, pos.step)
            break
    return finish_run(pos, error, checkpoints, (writer, stop), log)


