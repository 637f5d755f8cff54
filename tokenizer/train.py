"""The tokenizer training loop: one implementation behind ``vq_train_dual.py`` and ``vq_train_triple.py``, and
for LlamaGen's single codebook (``main(preset="single")``, ``--recipe llamagen-vq``: without semantic supervision
or disentanglement, which need a semantic factor and two factors).

Runs under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPUs) or as a plain ``python`` process. ``TrainConfig`` is
the command line; ``build`` turns it into everything a run trains with (a ``Trainer``); ``utils.training.train``
then runs the loop both trainers share, calling ``train_step``: the original's pair of updates, the tokenizer
(reconstruction, LPIPS, quantizer, disentanglement, semantic and, after ``--disc-start``, adversarial losses),
then the discriminator.

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
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tokenizer.losses import FQGANLoss, LossConfig, RealAndFake, build_discriminator
from tokenizer.models import (FactorizedTokenizer, TokenizerConfig, describe_tokenizer, infer_tokenizer_config,
                              load_tokenizer_weights, preset_factors, tokenizer_checkpoint, tokenizer_config)
from tokenizer.teachers import (TeacherUnavailableError, Teachers, load_teachers, teacher_field,
                                teacher_fields_outside, teacher_overrides_from_args)
from utils.argtypes import nonnegative_float, nonnegative_int, positive_int, unit_float
from utils.data import ResumableSampler, SafeImageDataset, collate_train, image_dataset, train_transform
from utils.distributed import is_distributed
from utils.ema import new_ema, update_ema
from utils.flags import alias, compile_flag, config_parser, flag, ignored, parse, require
from utils.images import save_grid
from utils.logs import MetricWriter
from utils.recipes import PRESET_SCRIPTS, RECIPE_PRESETS, TOKENIZER_RECIPES
from utils.resume import Position, resume_run
from utils.rng import seed_everything
from utils.run import Run, RunConfig, start_run
from utils.steps import accumulation, autocast_context, frozen, fused_kwargs, grad_scaler, optimizer_step
from utils.training import StepOutput, run_trainer, save_run_checkpoint

BAD_INPUT = (ValueError, FileNotFoundError, TeacherUnavailableError)  # one-line errors, raised by build()
ARCH = "architecture (defaults: the paper's; smaller values for CPU runs and tests)"


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """What a tokenizer run is asked to do, and the one declaration of its command line (``parse``): each field
    is a flag (``--disc-start`` -> ``disc_start``) with its default, check and help; checkpoints store the fields
    as their ``args``. ``resume="fixed"`` marks what a resumed run may not change."""
    IGNORED = (  # the original training scripts' flags that do nothing here
        ignored("--data-face-path", type=str, default=None),
        ignored("--cloud-save-path", type=str, default=None, help="checkpoints are written to --results-dir"),
        ignored("--dataset", type=str, default="imagenet", help="--data-path is an ImageFolder or tar shards"),
        ignored("--weight-decay", type=float, default=5e-2, help="Adam without decay, as the original trains"),
    )
    preset: str = "dual"  # the entry point's factor preset (not a flag)
    data_path: str = flag("", required=True, help="ImageFolder root of the training images, or tar shards")
    vq_model: str = flag("VQ-16", choices=("VQ-16", "VQ-8"), resume="fixed")
    vq_ckpt: Optional[str] = flag(None, resume="ignored", help="checkpoint to resume from (or to --finetune)")
    finetune: bool = flag(False, resume="ignored", help="start from --vq-ckpt's weights at step 0")
    codebook_size: int = flag(16384, type=positive_int, resume="fixed")
    codebook_embed_dim: int = flag(8, type=positive_int, resume="fixed")
    codebook_l2_norm: bool = flag(True, help="l2-normalised codes and features (--no-codebook-l2-norm: plain "
                                             "Euclidean codes)")
    codebook_weight: float = flag(1.0, type=nonnegative_float)
    entropy_loss_ratio: float = flag(0.0, type=nonnegative_float)
    commit_loss_beta: float = flag(0.25, type=nonnegative_float)
    reconstruction_weight: float = flag(1.0, type=nonnegative_float)
    reconstruction_loss: str = flag("l2", choices=("l2", "l1"))
    perceptual_weight: float = flag(1.0, type=nonnegative_float, help="LPIPS weight (0: no VGG needed)")
    disc_weight: float = flag(0.5, type=nonnegative_float)
    disc_start: int = flag(20000, type=nonnegative_int)
    disc_type: str = flag("patchgan", choices=("patchgan", "stylegan"), resume="fixed")
    disc_loss: str = flag("hinge", choices=("hinge", "vanilla", "non-saturating"))
    gen_loss: str = flag("hinge", choices=("hinge", "non-saturating"))
    disc_adaptive_weight: bool = flag(False, help="VQGAN gradient-norm GAN weighting")
    compile: bool = compile_flag(False, "torch.compile the tokenizer, LPIPS and the discriminator")
    channels_last: str = flag("auto", choices=("auto", "on", "off"),
                              help="channels-last memory layout for the convolutions (auto: on CUDA)")
    dropout_p: float = flag(0.0, type=unit_float)
    results_dir: str = flag("results_tokenizer_image", resume="ignored", help="where run folders are made")
    image_size: int = flag(256, type=positive_int, resume="fixed")
    epochs: int = flag(40, type=positive_int)
    global_batch_size: int = flag(128, type=positive_int, resume="fixed", help="images per optimizer step, all ranks")
    num_workers: int = flag(16, type=nonnegative_int)
    with_clip_supervision: bool = flag(
        False, action=argparse.BooleanOptionalAction, spelling="--clip-supervision", resume="fixed",
        aliases=(alias("--with_clip_supervision", action="store_true", help="= --clip-supervision"),),
        help="feature heads + semantic teachers (--no-clip-supervision turns a recipe's default off again)")
    with_disentanglement: bool = flag(
        False, action=argparse.BooleanOptionalAction, spelling="--disentanglement",
        aliases=(alias("--with_disentanglement", action="store_true", help="= --disentanglement"),),
        help="the disentanglement regulariser (weight --disentanglement-ratio)")
    semantic_weight: float = flag(0.5, type=nonnegative_float)
    disentanglement_ratio: float = flag(0.1, type=nonnegative_float)
    teacher_sem: Optional[str] = teacher_field("sem")
    teacher_sem_mid: Optional[str] = teacher_field("sem_mid")
    teacher_sem_high: Optional[str] = teacher_field("sem_high")
    teacher_image_size: int = flag(224, type=positive_int, help="input size of the semantic teachers")
    ch: int = flag(128, type=positive_int, group=ARCH, resume="fixed", help="base channels of the conv encoder/decoder")
    # as given ("1,2,2"): checkpoints compare it as the original string
    ch_mult: Optional[str] = flag(None, group=ARCH, resume="fixed",
                                  help="channel multipliers per level, e.g. 1,2,2 (default: --vq-model's)")
    num_res_blocks: int = flag(2, type=positive_int, group=ARCH, resume="fixed")
    z_channels: int = flag(256, type=positive_int, group=ARCH, resume="fixed")
    adapter_layers: int = flag(6, type=nonnegative_int, group=ARCH, resume="fixed")
    head_layers: int = flag(3, type=nonnegative_int, group=ARCH, resume="fixed")
    vgg_path: Optional[str] = flag(None, help="torchvision vgg16-397923af.pth for LPIPS")
    image_every: int = flag(0, type=nonnegative_int,
                            help="PNG grid of inputs/reconstructions every N steps (default 5 x --log-every)")

    def __post_init__(self):
        super().__post_init__()
        self.channel_multipliers()  # a malformed --ch-mult fails here
        require(not (self.finetune and not self.vq_ckpt), "--finetune starts from --vq-ckpt's weights: give one")
        factors = preset_factors(self.preset)
        require(not (self.with_clip_supervision and not any(f.head_width for f in factors)),
                f"--with_clip_supervision: the {self.preset} tokenizer has no semantic factor to supervise")
        require(not (self.with_disentanglement and len(factors) < 2),
                f"--with_disentanglement: the {self.preset} tokenizer has one factor, nothing to disentangle")
        wanted = RECIPE_PRESETS.get(self.recipe, self.preset) if self.recipe else self.preset
        require(wanted == self.preset, f"--recipe {self.recipe} trains a {wanted} tokenizer, not a {self.preset} "
                                       f"one: use {PRESET_SCRIPTS[wanted]}")

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


def command_line(preset: str) -> dict[str, Any]:
    """How ``vq_train_<preset>.py``'s parser is derived from ``TrainConfig``: only the preset's teacher flags."""
    kind = "a single-codebook (LlamaGen VQ)" if preset == "single" else f"an FQGAN-{preset}"
    return dict(description=f"Train {kind} tokenizer.", exclude=teacher_fields_outside(preset))


def get_parser(preset: str = "dual") -> argparse.ArgumentParser:
    return config_parser(TrainConfig, **command_line(preset))


def parse_config(argv=None, preset: str = "dual") -> TrainConfig:
    """The command line as a ``TrainConfig``: bad values stop with argparse's one-line error, bad combinations
    with a ValueError (one line in ``main``); the original's ignored flags print one line each."""
    return parse(TrainConfig, argv, **command_line(preset), recipes=TOKENIZER_RECIPES, preset=preset)


def build_config(cfg: TrainConfig, base_image_size: int) -> TokenizerConfig:
    """The tokenizer config the flags describe (feature heads as wide as the preset's teachers)."""
    arch = dict(ch=cfg.ch, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
                adapter_layers=cfg.adapter_layers, head_layers=cfg.head_layers)
    if cfg.ch_mult:
        arch["ch_mult"] = cfg.channel_multipliers()
    return tokenizer_config(
        cfg.preset, cfg.vq_model, codebook_size=cfg.codebook_size, codebook_embed_dim=cfg.codebook_embed_dim,
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
    dataset: SafeImageDataset
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

    # what the shared loop (utils.training.train) calls
    project = "fqgan-tokenizer"
    collate = staticmethod(collate_train)

    def step(self, batch: Any, step: int) -> StepOutput:
        images, _, n_bad = batch
        images = images.to(self.run.info.device, non_blocking=True)
        logs, skipped, recon = train_step(self, images, step)
        self.bad_images += n_bad
        return StepOutput(logs, skipped, len(images), preview=(images, recon))

    def status(self) -> dict[str, float]:
        return {"lr": self.optimizer.param_groups[0]["lr"], "bad_images": self.bad_images}

    def progress_parts(self, avg: dict[str, float], nonfinite: int) -> list[str]:
        return progress_parts(avg, self.model.factor_names, self.bad_images, nonfinite)

    def after_step(self, pos: Position, batch: Any, out: StepOutput, writer: MetricWriter) -> None:
        """Every --image-every steps (rank 0): a PNG grid of inputs above their reconstructions."""
        if not self.run.info.is_main or pos.step % self.cfg.image_every_steps:
            return
        images, recon = out.preview
        shown = images[-len(recon):][:8]
        grid = save_grid(torch.cat([shown.float(), recon[:8].float()]).cpu(),
                         self.run.exp_dir / "images" / f"{pos.step:07d}.png", nrow=len(shown))
        writer.image("train/inputs_and_reconstructions", grid, pos.step)


def build(cfg: TrainConfig) -> Trainer:
    """Everything the flags describe, resumed from a checkpoint when asked. Every file from outside (checkpoint,
    teachers, VGG16 weights, data) is checked here, before any training; problems raise one of BAD_INPUT."""
    run = start_run(cfg, cfg.vq_model)
    device, world, log = run.info.device, run.info.world_size, run.logger

    # The checkpoint to resume from is read first: its learned positions fix the model's base image size. The run
    # folder's own checkpoints win over --vq-ckpt / --finetune, which only seed a fresh run.
    resume = resume_run(cfg, run.ckpt_dir, run.exp_dir, cfg.vq_ckpt, "--vq-ckpt", log, finetune=cfg.finetune)
    weights = resume.weights() if resume.found else None
    config, teachers = model_and_teachers(cfg, infer_tokenizer_config(weights, resume.path).base_image_size
                                          if weights else cfg.image_size, device)
    model = FactorizedTokenizer(config)
    try:
        loss_fn = FQGANLoss(loss_config(cfg), model.factor_names).to(device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (or pass --perceptual-weight 0 to train without LPIPS)") from None
    lc = loss_fn.config
    disc = build_discriminator(lc.disc_type, lc.disc_in_channels, lc.disc_dim, lc.disc_num_layers, lc.image_size)
    dataset = image_dataset(cfg.data_path, train_transform(cfg.image_size), cfg.image_size,
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
    if resume.found:
        load_tokenizer_weights(model, weights, resume.path, allow_missing_heads=not resume.exact)
        if ema is not None:
            load_tokenizer_weights(ema, resume.ema_weights(), resume.path, allow_missing_heads=not resume.exact)
        resume.load_states({"optimizer": optimizer, "discriminator": disc, "optimizer_disc": optimizer_disc}, log)
        start, state = resume.position(sampler.batches_per_epoch, {"scaler": scaler, "scaler_disc": scaler_disc}, log)
        bad_images = state.get("bad_images", 0)
        resume.announce(start, log)
    elif ema is not None:
        update_ema(ema, model, decay=0)

    train_model, train_disc = prepare_modules(cfg, device, model, disc, loss_fn,
                                              unused=bool(config.head_factors) and not lc.semantic_weight)
    if run.info.is_main:
        (run.exp_dir / "images").mkdir(parents=True, exist_ok=True)
    return Trainer(cfg=cfg, run=run, config=config, model=model, train_model=train_model, ema=ema,
                   teachers=teachers, loss_fn=loss_fn, disc=disc, train_disc=train_disc, optimizer=optimizer,
                   optimizer_disc=optimizer_disc, scaler=scaler, scaler_disc=scaler_disc, dataset=dataset,
                   sampler=sampler, total_steps=total_steps, start=start, bad_images=bad_images)


def model_and_teachers(cfg: TrainConfig, base_image_size: int,
                       device: torch.device) -> tuple[TokenizerConfig, Optional[Teachers]]:
    """The tokenizer's config and, with semantic supervision, its teachers (loaded and checked here)."""
    config, teachers = build_config(cfg, base_image_size), None
    if cfg.semantic:  # heads without loss (weight 0) need no teachers
        teachers = load_teachers(config, teacher_overrides_from_args(cfg, config), check_width=False,
                                 image_size=cfg.teacher_image_size).to(device)
        config = fit_heads_to_teachers(config, teachers)
    if cfg.image_size % config.downsample:
        raise ValueError(f"--image-size {cfg.image_size} is not a multiple of the downsampling factor "
                         f"{config.downsample}")
    return config, teachers


def describe_setup(cfg: TrainConfig, log, config: TokenizerConfig, model: nn.Module, teachers: Optional[Teachers],
                   disc: nn.Module, dataset: SafeImageDataset, sampler: ResumableSampler, total_steps: int,
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
    """``vq_train_<preset>.py``: parse, build (every input checked), train (``utils.training``)."""
    return run_trainer(lambda: parse_config(argv, preset), build, BAD_INPUT)
