"""The tokenizer training loop: one implementation behind ``vq_train_dual.py`` and ``vq_train_triple.py``.

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
from copy import deepcopy
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
from utils.argtypes import nonnegative_float, nonnegative_int, positive_float, positive_int, unit_float
from utils.checkpoint import extract_weights
from utils.data import ImageFolderSafe, ResumableSampler, collate_train, train_transform
from utils.distributed import is_distributed
from utils.ema import requires_grad, update_ema
from utils.images import save_grid
from utils.logging import MetricWriter
from utils.progress import MetricAverager, Throughput, report
from utils.rng import seed_everything
from utils.run import (Checkpoints, Position, Run, StopSignal, add_run_arguments, check_resumed_flags,
                       epoch_batches, fail, find_resume, finish_run, restore_position, save_run_checkpoint,
                       start_run)
from utils.steps import (NonFiniteGuard, accumulation, autocast_context, frozen, fused_kwargs, grad_scaler,
                         optimizer_step)

BAD_INPUT = (ValueError, FileNotFoundError, TeacherUnavailableError)  # one-line errors, raised by build()
# Flags a resumed run may not change: the saved data position and weights would be read with another meaning.
RESUME_FIXED = ("global_batch_size", "image_size", "global_seed", "vq_model", "codebook_size", "codebook_embed_dim",
                "ch", "ch_mult", "num_res_blocks", "z_channels", "adapter_layers", "head_layers",
                "with_clip_supervision", "disc_type")


def get_parser(preset: str) -> argparse.ArgumentParser:
    """The original training scripts' flags with their defaults, plus this project's additions."""
    p = argparse.ArgumentParser(description=f"Train an FQGAN-{preset} tokenizer.")
    p.add_argument("--data-path", type=str, required=True, help="ImageFolder root of the training images")
    p.add_argument("--data-face-path", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cloud-save-path", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-local-save", action="store_true", help="do not write checkpoints (debugging)")
    p.add_argument("--vq-model", type=str, choices=["VQ-16", "VQ-8"], default="VQ-16")
    p.add_argument("--vq-ckpt", type=str, default=None, help="checkpoint to resume from (or to --finetune)")
    p.add_argument("--finetune", action="store_true", help="start from --vq-ckpt's weights at step 0")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights (saved as 'ema')")
    p.add_argument("--codebook-size", type=int, default=16384)
    p.add_argument("--codebook-embed-dim", type=int, default=8)
    p.add_argument("--codebook-l2-norm", action="store_true", default=True)
    p.add_argument("--codebook-weight", type=float, default=1.0)
    p.add_argument("--entropy-loss-ratio", type=float, default=0.0)
    p.add_argument("--commit-loss-beta", type=float, default=0.25)
    p.add_argument("--reconstruction-weight", type=float, default=1.0)
    p.add_argument("--reconstruction-loss", type=str, choices=["l2", "l1"], default="l2")
    p.add_argument("--perceptual-weight", type=float, default=1.0, help="LPIPS weight (0: no VGG needed)")
    p.add_argument("--disc-weight", type=float, default=0.5)
    p.add_argument("--disc-start", type=int, default=20000)
    p.add_argument("--disc-type", type=str, choices=["patchgan", "stylegan"], default="patchgan")
    p.add_argument("--disc-loss", type=str, choices=["hinge", "vanilla", "non-saturating"], default="hinge")
    p.add_argument("--gen-loss", type=str, choices=["hinge", "non-saturating"], default="hinge")
    p.add_argument("--disc-adaptive-weight", action="store_true", help="VQGAN gradient-norm GAN weighting")
    p.add_argument("--compile", action="store_true", default=False,
                   help="torch.compile the tokenizer, LPIPS and the discriminator")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="channels-last memory layout for the convolutions (auto: on CUDA)")
    p.add_argument("--dropout-p", type=unit_float, default=0.0)
    p.add_argument("--results-dir", type=str, default="results_tokenizer_image")
    p.add_argument("--exp-name", type=str, required=True)
    p.add_argument("--dataset", type=str, default="imagenet")
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=5e-2, help="accepted; Adam without decay, as the original")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--max-grad-norm", type=nonnegative_float, default=1.0, help="0 disables clipping")
    p.add_argument("--global-batch-size", type=positive_int, default=128)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--num-workers", type=nonnegative_int, default=16)
    p.add_argument("--log-every", type=positive_int, default=100)
    p.add_argument("--ckpt-every", type=positive_int, default=5000)
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    p.add_argument("--mixed-precision", type=str, default="bf16", choices=["none", "fp16", "bf16"],
                   help="autocast dtype on GPU (CPU runs fp32)")
    p.add_argument("--with_clip_supervision", action="store_true", help="feature heads + semantic teachers")
    p.add_argument("--no-clip-supervision", dest="with_clip_supervision", action="store_false",
                   help="turn semantic supervision off again (e.g. after a launch script's defaults)")
    p.add_argument("--with_disentanglement", action="store_true")
    p.add_argument("--no-disentanglement", dest="with_disentanglement", action="store_false")
    p.add_argument("--semantic-weight", type=float, default=0.5)
    p.add_argument("--disentanglement-ratio", type=float, default=0.1)
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
    return p


def build_config(args, preset: str, base_image_size: int) -> TokenizerConfig:
    """The tokenizer config the flags describe (feature heads as wide as the preset's teachers)."""
    arch = dict(ch=args.ch, num_res_blocks=args.num_res_blocks, z_channels=args.z_channels,
                adapter_layers=args.adapter_layers, head_layers=args.head_layers)
    if args.ch_mult:
        try:
            arch["ch_mult"] = tuple(int(v) for v in args.ch_mult.split(","))
        except ValueError:
            raise ValueError(f"--ch-mult {args.ch_mult!r}: expected comma-separated integers, e.g. 1,2,2") from None
    cfg = tokenizer_config(
        preset, args.vq_model, codebook_size=args.codebook_size, codebook_embed_dim=args.codebook_embed_dim,
        codebook_l2_norm=args.codebook_l2_norm, commit_loss_beta=args.commit_loss_beta,
        entropy_loss_ratio=args.entropy_loss_ratio, dropout_p=args.dropout_p,
        with_feature_heads=args.with_clip_supervision,
        disentanglement_ratio=args.disentanglement_ratio if args.with_disentanglement else 0.0,
        base_image_size=base_image_size, **arch)
    return cfg


def fit_heads_to_teachers(cfg: TokenizerConfig, teachers: Teachers) -> TokenizerConfig:
    """Each feature head as wide as its teacher's class token (a teacher given with --teacher-* may differ)."""
    return cfg.replace(factors=tuple(dataclasses.replace(f, head_width=teachers[i].width) if i in teachers.factors()
                                     else f for i, f in enumerate(cfg.factors)))


def loss_config(args) -> LossConfig:
    """The loss the flags describe (the discriminator's shape included)."""
    return LossConfig(
        reconstruction_loss=args.reconstruction_loss, reconstruction_weight=args.reconstruction_weight,
        perceptual_weight=args.perceptual_weight, codebook_weight=args.codebook_weight,
        semantic_weight=args.semantic_weight if args.with_clip_supervision else 0.0,
        disc_weight=args.disc_weight, disc_start=args.disc_start, disc_type=args.disc_type,
        disc_loss=args.disc_loss, gen_loss=args.gen_loss, disc_adaptive_weight=args.disc_adaptive_weight,
        image_size=args.image_size, vgg_path=args.vgg_path)


@dataclass
class Trainer:
    """Everything a tokenizer run trains with, as ``build`` returns it."""
    args: argparse.Namespace
    run: Run
    config: TokenizerConfig
    model: FactorizedTokenizer
    train_model: nn.Module  # ``model`` compiled and/or DDP-wrapped: what the step calls
    ema: Optional[FactorizedTokenizer]
    teachers: Optional[Teachers]
    loss_fn: FQGANLoss
    disc: nn.Module  # the discriminator (saved, and stepped by its optimizer)
    run_disc: nn.Module  # ``disc`` as the generator step runs it (compiled or not), with its parameters frozen
    train_disc: nn.Module  # RealAndFake(``run_disc``), DDP-wrapped: the discriminator step, the only one training it
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
                                    optimizer_disc=self.optimizer_disc.state_dict(), args=self.args)

    def save(self, pos: Position) -> Optional[Path]:
        return save_run_checkpoint(self.run, pos, self.checkpoint(), bad_images=self.bad_images,
                               scaler=self.scaler.state_dict(), scaler_disc=self.scaler_disc.state_dict())


def build(args, preset: str) -> Trainer:
    """Everything the flags describe, resumed from a checkpoint when asked. Every file from outside (checkpoint,
    teachers, VGG16 weights, data) is checked here, before any training; problems raise one of BAD_INPUT."""
    run = start_run(args, args.vq_model)
    device, world, log = run.info.device, run.info.world_size, run.logger

    # The checkpoint to resume from is read first: its learned positions fix the model's base image size. The run
    # folder's own checkpoints win over --vq-ckpt / --finetune, which only seed a fresh run.
    resume = find_resume(args.vq_ckpt, run, "--vq-ckpt")
    resume_path, ckpt = resume.path, resume.ckpt
    finetune = args.finetune and not resume.own
    if ckpt is not None and not finetune:
        check_resumed_flags(ckpt, args, RESUME_FIXED, resume_path, log)
    weights = extract_weights(ckpt, resume_path, prefer=("model", "ema", "state_dict"))[0] if ckpt else None
    config = build_config(args, preset, infer_tokenizer_config(weights, resume_path).base_image_size
                          if weights else args.image_size)
    teachers = None
    if args.with_clip_supervision and args.semantic_weight:  # heads without loss (weight 0) need no teachers
        teachers = load_teachers(config, teacher_overrides_from_args(args, config), check_width=False,
                                 image_size=args.teacher_image_size).to(device)
        config = fit_heads_to_teachers(config, teachers)
    if args.image_size % config.downsample:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of the downsampling factor "
                         f"{config.downsample}")
    model = FactorizedTokenizer(config)
    try:
        loss_fn = FQGANLoss(loss_config(args), model.factor_names).to(device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (or pass --perceptual-weight 0 to train without LPIPS)") from None
    cfg = loss_fn.config
    disc = build_discriminator(cfg.disc_type, cfg.disc_in_channels, cfg.disc_dim, cfg.disc_num_layers,
                               cfg.image_size)
    dataset = ImageFolderSafe(args.data_path, train_transform(args.image_size), args.image_size,
                              seed=args.global_seed, fallback=True)
    sampler = ResumableSampler(len(dataset), run.micro_batch * run.accum, run.info.rank, world, args.global_seed)
    total_steps = sampler.batches_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    log.info(f"Tokenizer: {describe_tokenizer(config)}; {sum(p.numel() for p in model.parameters()):,} parameters")
    if config.disentanglement_ratio:
        log.info(f"Disentanglement ratio: {config.disentanglement_ratio}")
    for i in teachers.factors() if teachers is not None else []:
        log.info(f"Teacher of factor {config.factors[i].name}: {teachers[i].name} (width {teachers[i].width})")
    if teachers is None:
        log.info("No semantic supervision (pass --with_clip_supervision to train the feature heads)")
    if not args.perceptual_weight:
        log.info("LPIPS off (--perceptual-weight 0); with VGG16 weights available, use --perceptual-weight 1")
    log.info(f"Discriminator ({args.disc_type}): {sum(p.numel() for p in disc.parameters()):,} parameters")
    log.info(f"Dataset: {len(dataset):,} images in {len(dataset.classes)} classes ({args.data_path}); "
             f"{sampler.batches_per_epoch} steps per epoch, {total_steps} steps in all")
    if device.type != "cuda" and args.mixed_precision != "none":
        log.info("CPU run: training in fp32 (--mixed-precision applies on GPU)")

    model.to(device)
    disc.to(device)
    ema = None
    if args.ema:
        ema = deepcopy(model).eval()
        requires_grad(ema, False)
    seed_everything(args.global_seed * world + run.info.rank)  # from here on every rank draws its own randomness
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), **fused_kwargs(torch.optim.Adam))
    optimizer = torch.optim.Adam(model.parameters(), **adam)
    optimizer_disc = torch.optim.Adam(disc.parameters(), **adam)
    scaler, scaler_disc = grad_scaler(device, args.mixed_precision), grad_scaler(device, args.mixed_precision)

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

    if channels_last(args, device):  # NHWC convolutions: what cuDNN's bf16 kernels run fastest
        for m in (model, disc, loss_fn):
            m.to(memory_format=torch.channels_last)
    train_model, run_disc = model, disc
    if args.compile:  # the tokenizer, LPIPS and the discriminator; the loss arithmetic around them stays eager
        train_model, run_disc = torch.compile(model), torch.compile(disc)
        if loss_fn.perceptual is not None:
            loss_fn.perceptual = torch.compile(loss_fn.perceptual)
    train_disc = RealAndFake(run_disc)
    if is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        # Heads without semantic loss would leave parameters without gradients.
        unused = bool(config.head_factors) and not cfg.semantic_weight
        train_model = DDP(train_model, device_ids=ids, find_unused_parameters=unused)
        train_disc = DDP(train_disc, device_ids=ids)
    model.train()
    loss_fn.train()
    return Trainer(args, run, config, model, train_model, ema, teachers, loss_fn, disc, run_disc, train_disc,
                   optimizer, optimizer_disc, scaler, scaler_disc, dataset, sampler, total_steps, start, bad_images)


def channels_last(args, device: torch.device) -> bool:
    return args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")


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
    args, autocast = t.args, autocast_context(t.run.info.device, t.args.mixed_precision)
    if channels_last(args, images.device):
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
                gen = t.loss_fn.generator_step(x, out, step, teacher_cls, t.model.decoder.last_layer, t.run_disc)
        t.scaler.scale(gen.loss / len(micro)).backward()
        recons.append(out.recon.detach())
    grad_norm, skipped = optimizer_step(t.optimizer, t.scaler, t.model.parameters(), args.max_grad_norm)
    if t.ema is not None:
        update_ema(t.ema, t.model, args.ema_decay)
    logs = {**gen.logs(), "grad_norm": grad_norm}

    t.optimizer_disc.zero_grad(set_to_none=True)
    if t.loss_fn.disc_factor(step) > 0:
        for (x, rec), sync in accumulation(t.train_disc, zip(micro, recons)):
            with sync, autocast():
                disc = t.loss_fn.discriminator_step(t.train_disc, x, rec, step)
            t.scaler_disc.scale(disc.loss / len(micro)).backward()
        _, disc_skipped = optimizer_step(t.optimizer_disc, t.scaler_disc, t.disc.parameters(), args.max_grad_norm)
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
    args = get_parser(preset).parse_args(argv)
    try:
        t = build(args, preset)
    except BAD_INPUT as e:
        fail(e)
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing to save (the stop signal is not set yet)
        fail("interrupted while setting up the run; no checkpoint was written")
    run, log, device = t.run, t.run.logger, t.run.info.device
    writer = MetricWriter(run.exp_dir / "tensorboard", run.info.is_main, args.wandb, "fqgan-tokenizer",
                          args.exp_name, args, log)
    if run.info.is_main:
        (run.exp_dir / "images").mkdir(parents=True, exist_ok=True)
    image_every = args.image_every or 5 * args.log_every
    throughput, averager = Throughput(device), MetricAverager(device)
    guard, stop = NonFiniteGuard(device, args.max_nonfinite_steps), StopSignal(args.stop_timeout)

    log.info(f"Training for {args.epochs} epochs ({t.total_steps - t.start.step} steps to go)...")
    pos, error, checkpoints = t.start, None, Checkpoints(t.save, args.ckpt_every, t.start)
    batches = epoch_batches(t.start, args.epochs, t.dataset, t.sampler, run.micro_batch * run.accum,
                            args.num_workers, collate_train, device, args.global_seed)
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

        if pos.step % args.log_every == 0 or pos.step == t.total_steps:
            check = guard.check()
            avg = {**averager.reduce(), "lr": t.optimizer.param_groups[0]["lr"], "bad_images": t.bad_images,
                   "nonfinite_steps": check.skipped}
            report(log, writer, run.metrics_file, pos.step, t.total_steps, epoch, avg,
                   throughput.report(t.total_steps - pos.step),
                   progress_parts(avg, t.model.factor_names, t.bad_images, check.skipped))
            if check.error:
                error = check.error
                break
        if run.info.is_main and pos.step % image_every == 0:
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


