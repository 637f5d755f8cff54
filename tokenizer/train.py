"""The tokenizer training loop: one implementation behind ``vq_train_dual.py`` and ``vq_train_triple.py``.

Runs under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPUs) or as a plain ``python`` process. Each step is the
original's pair of updates: the tokenizer (reconstruction, LPIPS, quantizer, disentanglement, semantic and,
after ``--disc-start``, adversarial losses), then the discriminator. Checkpoints are written atomically in the
released layout and carry what an exact resume needs: ``--vq-ckpt`` (or ``--auto-resume``) continues at the
saved step, mid-epoch, with the same data order, augmentations and RNG state, so on CPU a resumed run's losses
equal an uninterrupted run's.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from contextlib import nullcontext
from copy import deepcopy
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from tokenizer.losses import FQGANLoss, LossConfig, MissingWeightsError
from tokenizer.models import (FactorizedTokenizer, describe, infer_config, load_released_state_dict,
                              tokenizer_checkpoint, tokenizer_config)
from tokenizer.models.fqgan import PRESETS
from tokenizer.teachers import (TeacherUnavailableError, add_teacher_arguments, load_teachers,
                                teacher_overrides_from_args)
from utils.checkpoint import CheckpointError, add_unsafe_load_argument, atomic_save, extract_weights, load_file
from utils.data import ImageFolderSafe, ResumableSampler, collate_train, train_transform
from utils.distributed import barrier, cleanup, is_distributed
from utils.ema import requires_grad, update_ema
from utils.images import save_grid
from utils.logging import MetricWriter
from utils.training import (MetricAverager, Throughput, autocast_context, epoch_loader, fail, find_resume, frozen,
                            grad_scaler, report, restore_position, resume_entry, seed_everything, start_run)


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
    p.add_argument("--compile", action="store_true", default=False)
    p.add_argument("--dropout-p", type=float, default=0.0)
    p.add_argument("--results-dir", type=str, default="results_tokenizer_image")
    p.add_argument("--exp-name", type=str, required=True)
    p.add_argument("--dataset", type=str, default="imagenet")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=5e-2, help="accepted; Adam without decay, as the original")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--global-batch-size", type=int, default=128)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=16)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=5000)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
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
    add_teacher_arguments(p, PRESETS[preset])
    p.add_argument("--teacher-image-size", type=int, default=224, help="input size of the semantic teachers")
    arch = p.add_argument_group("architecture (defaults: the paper's; smaller values for CPU runs and tests)")
    arch.add_argument("--ch", type=int, default=128, help="base channels of the conv encoder/decoder")
    arch.add_argument("--ch-mult", type=str, default=None,
                      help="channel multipliers per level, e.g. 1,2,2 (default: --vq-model's)")
    arch.add_argument("--num-res-blocks", type=int, default=2)
    arch.add_argument("--z-channels", type=int, default=256)
    arch.add_argument("--adapter-layers", type=int, default=6)
    arch.add_argument("--head-layers", type=int, default=3)
    p.add_argument("--vgg-path", type=str, default=None, help="torchvision vgg16-397923af.pth for LPIPS")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--image-every", type=int, default=0, help="PNG grid of inputs/reconstructions every N steps "
                                                              "(default 5 x --log-every)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--auto-resume", action="store_true", help="resume from the newest checkpoint of this run")
    p.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (if installed)")
    add_unsafe_load_argument(p)
    return p


def build_config(args, preset: str, base_image_size: int, head_widths: Optional[dict[int, int]] = None):
    """The tokenizer config the flags describe. ``head_widths`` (factor -> width) sizes each feature head
    to its teacher's class token."""
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
    if head_widths:
        cfg = cfg.replace(factors=tuple(dataclasses.replace(f, head_width=head_widths.get(i, f.head_width))
                                        for i, f in enumerate(cfg.factors)))
    return cfg


def loss_config(args) -> LossConfig:
    return LossConfig(
        reconstruction_loss=args.reconstruction_loss, reconstruction_weight=args.reconstruction_weight,
        perceptual_weight=args.perceptual_weight, codebook_weight=args.codebook_weight,
        semantic_weight=args.semantic_weight if args.with_clip_supervision else 0.0,
        disc_weight=args.disc_weight, disc_start=args.disc_start, disc_type=args.disc_type,
        disc_loss=args.disc_loss, gen_loss=args.gen_loss, disc_adaptive_weight=args.disc_adaptive_weight,
        image_size=args.image_size, vgg_path=args.vgg_path)


class _Stop(Exception):
    pass


def main(argv=None, preset: str = "dual") -> Optional[Path]:
    args = get_parser(preset).parse_args(argv)
    run = start_run(args, args.vq_model)
    info, logger, micro_batch, accum = run.info, run.logger, run.micro_batch, run.accum
    device, world = info.device, info.world_size

    # ---- what to resume from (read before building, so the model matches the file)
    resume_path = find_resume(args.vq_ckpt, args.auto_resume, run.ckpt_dir)
    ckpt, weights, base_size = None, None, args.image_size
    if resume_path:
        try:
            ckpt = load_file(resume_path)
            weights, _ = extract_weights(ckpt, resume_path, prefer=("model", "ema", "state_dict"))
            base_size = infer_config(weights, resume_path).base_image_size
        except CheckpointError as e:
            fail(e)

    # ---- everything that needs files from outside, checked before any training
    teachers = None
    if args.with_clip_supervision:
        try:
            probe = build_config(args, preset, base_size)
            teachers = load_teachers(probe, teacher_overrides_from_args(args, probe), check_width=False,
                                     image_size=args.teacher_image_size).to(device)
        except (TeacherUnavailableError, ValueError) as e:
            fail(e)
    try:
        config = build_config(args, preset, base_size,
                              {i: teachers[i].width for i in teachers.factors()} if teachers else None)
    except ValueError as e:
        fail(e)
    if args.image_size % config.downsample:
        fail(f"--image-size {args.image_size} is not a multiple of the downsampling factor {config.downsample}")
    model = FactorizedTokenizer(config)
    logger.info(f"Tokenizer: {describe(config)}; {sum(p.numel() for p in model.parameters()):,} parameters")
    if config.disentanglement_ratio:
        logger.info(f"Disentanglement ratio: {config.disentanglement_ratio}")
    if teachers is not None:
        for i in teachers.factors():
            logger.info(f"Teacher of factor {config.factors[i].name}: {teachers[i].name} (width {teachers[i].width})")
    else:
        logger.info("No semantic supervision (pass --with_clip_supervision to train the feature heads)")
    try:
        loss_fn = FQGANLoss(loss_config(args), model.factor_names).to(device)
    except MissingWeightsError as e:
        fail(f"{e} (or pass --perceptual-weight 0 to train without LPIPS)")
    if not args.perceptual_weight:
        logger.info("LPIPS off (--perceptual-weight 0); with VGG16 weights available, use --perceptual-weight 1")
    disc = loss_fn.discriminator
    logger.info(f"Discriminator ({args.disc_type}): {sum(p.numel() for p in disc.parameters()):,} parameters")

    try:
        dataset = ImageFolderSafe(args.data_path, train_transform(args.image_size), args.image_size,
                                  seed=args.global_seed, fallback=True)
    except FileNotFoundError as e:
        fail(e)
    try:
        sampler = ResumableSampler(len(dataset), micro_batch * accum, info.rank, world, args.global_seed)
    except ValueError as e:
        fail(e)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    logger.info(f"Dataset: {len(dataset):,} images in {len(dataset.classes)} classes ({args.data_path}); "
                f"{steps_per_epoch} steps per epoch, {total_steps} steps in all")

    model.to(device)
    ema = None
    if args.ema:
        ema = deepcopy(model).eval()
        requires_grad(ema, False)
    seed_everything(args.global_seed * world + info.rank)  # from here on every rank draws its own randomness
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    optimizer_disc = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    scaler, scaler_disc = grad_scaler(device, args.mixed_precision), grad_scaler(device, args.mixed_precision)

    # ---- resume
    train_steps, start_epoch, start_batch, bad_images = 0, 0, 0, 0
    if ckpt is not None:
        try:
            load_released_state_dict(model, weights, resume_path, allow_missing_heads=args.finetune)
            if ema is not None:
                ema_w = ckpt.get("ema") or weights
                load_released_state_dict(ema, ema_w, resume_path, allow_missing_heads=args.finetune)
        except CheckpointError as e:
            fail(e)
        for name, obj in (("optimizer", optimizer), ("discriminator", disc), ("optimizer_disc", optimizer_disc)):
            if name in ckpt:
                obj.load_state_dict(ckpt[name])
            else:
                logger.warning(f"{resume_path} has no '{name}'; it starts fresh")
        if not args.finetune:
            train_steps, start_epoch, start_batch, state = restore_position(
                ckpt, steps_per_epoch, {"scaler": scaler, "scaler_disc": scaler_disc}, logger)
            bad_images = state.get("bad_images", 0)
        logger.info(f"Resumed from {resume_path}: step {train_steps}, epoch {start_epoch}, batch {start_batch}"
                    + (" (finetune: step counter reset)" if args.finetune else ""))
        del ckpt, weights
    elif ema is not None:
        update_ema(ema, model, decay=0)

    run_model = torch.compile(model) if args.compile else model
    if is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        # Heads without semantic loss would leave parameters without gradients.
        unused = bool(config.head_factors) and not loss_fn.config.semantic_weight
        run_model = DDP(run_model, device_ids=ids, find_unused_parameters=unused)
        disc_ddp = DDP(disc, device_ids=ids)
    else:
        disc_ddp = disc
    model.train()
    loss_fn.train()
    autocast = autocast_context(device, args.mixed_precision)
    if device.type != "cuda" and args.mixed_precision != "none":
        logger.info("CPU run: training in fp32 (--mixed-precision applies on GPU)")

    writer = MetricWriter(run.exp_dir / "tensorboard", info.is_main, args.wandb, "fqgan-tokenizer", args.exp_name,
                          args, logger)
    (run.exp_dir / "images").mkdir(parents=True, exist_ok=True) if info.is_main else None
    image_every = args.image_every or 5 * args.log_every
    throughput, averager = Throughput(device), MetricAverager()
    last_saved, saved_step = None, -1

    def save(epoch: int, batch_in_epoch: int) -> None:
        nonlocal last_saved, saved_step
        saved_step = train_steps  # on every rank: whether to save again is a collective decision
        resume = resume_entry(epoch, batch_in_epoch, bad_images=bad_images, scaler=scaler.state_dict(),
                              scaler_disc=scaler_disc.state_dict())
        if info.is_main and not args.no_local_save:
            ckpt_out = tokenizer_checkpoint(
                model, ema, optimizer=optimizer.state_dict(), discriminator=disc.state_dict(),
                optimizer_disc=optimizer_disc.state_dict(), steps=train_steps, args=args,
                config=dataclasses.asdict(config), resume=resume)
            last_saved = atomic_save(ckpt_out, run.ckpt_dir / f"{train_steps:07d}.pt")
            logger.info(f"Saved checkpoint to {last_saved}")
        barrier()

    def idle_disc_step() -> None:
        # Before --disc-start the original still steps the discriminator's Adam with all-zero gradients (its
        # loss is 0 * d_loss); the step counter advances while the weights stay put. Doing the same keeps
        # Adam's bias correction, and so the first real discriminator updates, identical.
        for p in disc.parameters():
            p.grad = torch.zeros_like(p)
        optimizer_disc.step()

    logger.info(f"Training for {args.epochs} epochs ({total_steps - train_steps} steps to go)...")
    try:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
            dataset.set_epoch(epoch)
            loader = epoch_loader(dataset, sampler, micro_batch * accum, args.num_workers, collate_train, device,
                                  args.global_seed)
            batch_in_epoch = start_batch if epoch == start_epoch else 0
            for x_all, _, n_bad in loader:
                if train_steps >= total_steps:
                    raise _Stop
                step = train_steps + 1  # 1-based, like the original's global_step
                bad_images += n_bad
                x_all = x_all.to(device, non_blocking=True)
                micro = x_all.split(micro_batch)

                # --- tokenizer update
                optimizer.zero_grad(set_to_none=True)
                recons, gen_logs = [], []
                for j, x in enumerate(micro):
                    sync = j == len(micro) - 1
                    ctx = run_model.no_sync() if (not sync and isinstance(run_model, DDP)) else nullcontext()
                    with ctx, autocast():
                        out = run_model(x)
                        teacher_cls = None
                        if teachers is not None:
                            with torch.no_grad():
                                teacher_cls = teachers(x)
                        with frozen(disc):
                            gl = loss_fn.generator_step(x, out, step, teacher_cls, model.decoder.last_layer)
                    scaler.scale(gl.loss / len(micro)).backward()
                    recons.append(out.recon.detach())
                    gen_logs.append(gl)
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), args.max_grad_norm if args.max_grad_norm else math.inf)
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    update_ema(ema, model, args.ema_decay)

                # --- discriminator update
                optimizer_disc.zero_grad(set_to_none=True)
                disc_logs = {}
                if loss_fn.disc_factor(step) > 0:
                    for j, (x, rec) in enumerate(zip(micro, recons)):
                        sync = j == len(micro) - 1
                        ctx = disc_ddp.no_sync() if (not sync and isinstance(disc_ddp, DDP)) else nullcontext()
                        with ctx, autocast():
                            dl = loss_fn.discriminator_step(x, rec, step, discriminator=disc_ddp)
                        scaler_disc.scale(dl.loss / len(micro)).backward()
                    scaler_disc.unscale_(optimizer_disc)
                    if args.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(disc.parameters(), args.max_grad_norm)
                    scaler_disc.step(optimizer_disc)
                    scaler_disc.update()
                    disc_logs = dl.logs()
                else:
                    idle_disc_step()

                train_steps += 1
                batch_in_epoch += 1
                throughput.update(len(x_all) * world)

                # --- logging
                logs = gen_logs[-1].logs()
                logs.update(disc_logs)
                logs["grad_norm"] = float(grad_norm)
                averager.add(logs)
                if train_steps % args.log_every == 0 or train_steps == total_steps:
                    avg = averager.reduce()
                    avg.update(lr=optimizer.param_groups[0]["lr"], bad_images=bad_images)
                    usage = " ".join(f"{n}={avg[f'codebook_usage_{n}']:.3f}" for n in model.factor_names)
                    parts = [f"loss={avg['loss']:.4f}", f"rec={avg['rec_loss']:.4f}"] + \
                        ([f"lpips={avg['perceptual_loss']:.4f}"] if "perceptual_loss" in avg else []) + \
                        [f"dis={avg['disentangle_loss']:.4f}", f"usage[{usage}]", f"grad={avg['grad_norm']:.3f}"] + \
                        ([f"skipped {bad_images} bad images"] if bad_images else [])
                    report(run, writer, train_steps, total_steps, epoch,
                           avg, throughput.report(total_steps - train_steps), parts)
                if info.is_main and train_steps % image_every == 0:
                    shown = micro[-1][:8]
                    grid = save_grid(torch.cat([shown.float(), recons[-1][:8].float()]).cpu(),
                                     run.exp_dir / "images" / f"{train_steps:07d}.png", nrow=len(shown))
                    writer.image("train/inputs_and_reconstructions", grid, train_steps)
                if train_steps % args.ckpt_every == 0:
                    save(epoch, batch_in_epoch)
            start_batch = 0
    except _Stop:
        pass
    except KeyboardInterrupt:
        logger.warning("Interrupted; the last checkpoint is where a rerun with --auto-resume continues")
        raise
    if saved_step != train_steps:
        epoch_now = train_steps // steps_per_epoch
        save(epoch_now, train_steps - epoch_now * steps_per_epoch)
    writer.close()
    logger.info("Done!")
    cleanup()
    return last_saved
