"""Training loop of the FAR generator on a code store; one implementation behind ``train_c2i_dual.py`` and
``train_c2i_triple.py`` (which only fix the factor count).

DDP by default, FSDP2 (``--fsdp``, ``fully_shard`` per transformer block) for FAR-L and larger; AdamW with weight
decay on matrices only; bf16 autocast on GPU; gradient clipping and accumulation; optional EMA. Checkpoints are
atomic, use the released key names (``model``, ``ema``, ``optimizer``, ``steps``, ``args``) and carry what an
exact resume needs (epoch position and every rank's RNG state, which drives label and token dropout).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
from contextlib import nullcontext
from copy import deepcopy
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from autoregressive.data.code_store import CodeDataset, CodeStoreError, collate_codes
from autoregressive.models import FAR, FAR_models, describe, far_checkpoint, far_config, load_released_state_dict
from autoregressive.models.far import TransformerBlock
from utils.checkpoint import CheckpointError, add_unsafe_load_argument, atomic_save, extract_weights, load_file
from utils.data import ResumableSampler
from utils.distributed import barrier, cleanup, is_distributed
from utils.ema import requires_grad, update_ema
from utils.logging import MetricWriter
from utils.training import (MetricAverager, Throughput, autocast_context, epoch_loader, fail, find_resume,
                            grad_scaler, report, restore_position, resume_entry, seed_everything, start_run)


def get_parser(num_factors: int) -> argparse.ArgumentParser:
    name = {2: "dual", 3: "triple"}.get(num_factors, f"{num_factors}-factor")
    p = argparse.ArgumentParser(description=f"Train a class-conditional FAR generator on {name} codes.")
    p.add_argument("--code-path", type=str, required=True, help="code store from extract_codes_c2i_*_code.py")
    p.add_argument("--exp-name", type=str, required=True)
    p.add_argument("--no-local-save", action="store_true")
    p.add_argument("--gpt-model", type=str, choices=list(FAR_models), default="FAR-B")
    p.add_argument("--gpt-ckpt", type=str, default=None, help="checkpoint to resume from")
    p.add_argument("--gpt-type", type=str, choices=["c2i"], default="c2i")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--ema", action="store_true")
    p.add_argument("--cls-token-num", type=int, default=1)
    p.add_argument("--dropout-p", type=float, default=0.1, help="residual and FFN dropout")
    p.add_argument("--token-dropout-p", type=float, default=0.1)
    p.add_argument("--drop-path-rate", type=float, default=0.0, help="stochastic depth (turns dropout-p off)")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile (CPU runs never compile)")
    p.add_argument("--results-dir", type=str, default="results")
    p.add_argument("--dataset", type=str, default="imagenet_code", help="accepted for the original command lines")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--downsample-size", type=int, choices=[4, 8, 16], default=16)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=5e-2)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=4, help="loader workers (the code store rarely needs any)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=5000)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--mixed-precision", type=str, default="bf16", choices=["none", "fp16", "bf16"])
    # this project's additions
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--auto-resume", action="store_true", help="resume from the newest checkpoint of this run")
    p.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--wandb", action="store_true")
    add_unsafe_load_argument(p)
    return p


def create_optimizer(model: torch.nn.Module, args, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and embeddings) only; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters \
        else {}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), **extra)


def shard_fsdp(model: FAR) -> FAR:
    """Fully shard (FSDP2) every transformer block, then the rest; in place. Works on GPUs (NCCL) and, for
    tests, on CPUs (gloo)."""
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if isinstance(m, TransformerBlock):
            fully_shard(m)
    fully_shard(model)
    return model


def full_state(model: FAR, optimizer, fsdp: bool):
    """(model state dict, optimizer state dict), gathered to full CPU tensors on rank 0 under FSDP
    (collective; other ranks get empty dicts)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def main(argv=None, num_factors: int = 2) -> Optional[Path]:
    args = get_parser(num_factors).parse_args(argv)
    run = start_run(args, args.gpt_model)
    info, logger, micro_batch, accum = run.info, run.logger, run.micro_batch, run.accum
    device, world = info.device, info.world_size

    try:
        dataset = CodeDataset(args.code_path, seed=args.global_seed, expect_factors=num_factors,
                              vocab_size=args.vocab_size)
    except CodeStoreError as e:
        fail(e)
    grid = args.image_size // args.downsample_size
    if dataset.info.tokens != grid * grid:
        fail(f"--code-path {args.code_path} holds {dataset.info.grid[0]}x{dataset.info.grid[1]} codes per image, "
             f"but --image-size {args.image_size} / --downsample-size {args.downsample_size} gives {grid}x{grid}")
    if dataset.info.num_classes > args.num_classes:
        fail(f"--code-path {args.code_path} has {dataset.info.num_classes} classes, more than --num-classes "
             f"{args.num_classes}")
    dropout = 0.0 if args.drop_path_rate > 0 else args.dropout_p
    config = far_config(args.gpt_model, num_factors, vocab_size=args.vocab_size, block_size=grid * grid,
                        num_classes=args.num_classes, cls_token_num=args.cls_token_num,
                        resid_dropout_p=dropout, ffn_dropout_p=dropout, token_dropout_p=args.token_dropout_p,
                        drop_path_rate=args.drop_path_rate)
    model = FAR(config).to(device)
    logger.info(f"Generator: {describe(config)}; {model.num_params():,} parameters")
    ema = None
    if args.ema:
        ema = deepcopy(model).eval()
        requires_grad(ema, False)
    seed_everything(args.global_seed * world + info.rank)  # from here on every rank draws its own randomness
    optimizer = create_optimizer(model, args, device)
    scaler = grad_scaler(device, args.mixed_precision)
    try:
        sampler = ResumableSampler(len(dataset), micro_batch * accum, info.rank, world, args.global_seed)
    except ValueError as e:
        fail(f"--code-path {args.code_path}: {e}")
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    logger.info(f"Codes: {len(dataset):,} images x {dataset.info.num_augs} views, {dataset.info.num_classes} "
                f"classes ({args.code_path}); {steps_per_epoch} steps per epoch, {total_steps} steps in all")

    # ---- resume
    resume_path = find_resume(args.gpt_ckpt, args.auto_resume, run.ckpt_dir)
    train_steps, start_epoch, start_batch, opt_state = 0, 0, 0, None
    if resume_path:
        try:
            ckpt = load_file(resume_path)
            weights, _ = extract_weights(ckpt, resume_path, prefer=("model", "ema", "state_dict"))
            load_released_state_dict(model, weights, resume_path)
            if ema is not None:
                load_released_state_dict(ema, ckpt.get("ema") or weights, resume_path)
        except CheckpointError as e:
            fail(e)
        opt_state = ckpt.get("optimizer")
        train_steps, start_epoch, start_batch, _ = restore_position(ckpt, steps_per_epoch, {"scaler": scaler}, logger)
        logger.info(f"Resumed from {resume_path}: step {train_steps}, epoch {start_epoch}, batch {start_batch}")
        del ckpt
    elif ema is not None:
        update_ema(ema, model, decay=0)

    run_model = model
    if args.fsdp:
        if not is_distributed():
            fail("--fsdp needs a torchrun launch (several processes)")
        if ema is not None:
            fail("--ema keeps a full copy of the weights on every rank; it is not combined with --fsdp")
        shard_fsdp(model)
        optimizer = create_optimizer(model, args, device)  # over the sharded parameters
        if opt_state is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, opt_state, options=StateDictOptions(full_state_dict=True))
            opt_state = None
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    if not args.no_compile and device.type == "cuda":
        logger.info("compiling the model... (--no-compile to skip)")
        run_model = torch.compile(run_model)
    if is_distributed() and not args.fsdp:
        run_model = DDP(run_model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    autocast = autocast_context(device, args.mixed_precision)
    writer = MetricWriter(run.exp_dir / "tensorboard", info.is_main, args.wandb, "fqgan-far", args.exp_name, args,
                          logger)
    throughput, averager = Throughput(device), MetricAverager()
    saved_step, last_saved = -1, None

    def save(epoch: int, batch_in_epoch: int) -> None:
        nonlocal saved_step, last_saved
        saved_step = train_steps
        weights, opt_state = full_state(model, optimizer, args.fsdp)
        resume = resume_entry(epoch, batch_in_epoch, scaler=scaler.state_dict())
        if info.is_main and not args.no_local_save:
            ckpt = far_checkpoint(model, ema, optimizer=opt_state, steps=train_steps, args=args,
                                  config=dataclasses.asdict(config), resume=resume)
            ckpt["model"] = weights
            last_saved = atomic_save(ckpt, run.ckpt_dir / f"{train_steps:07d}.pt")
            logger.info(f"Saved checkpoint to {last_saved}")
        barrier()

    logger.info(f"Training for {args.epochs} epochs ({total_steps - train_steps} steps to go)...")
    epoch = start_epoch
    for epoch in range(start_epoch, args.epochs):
        if train_steps >= total_steps:
            break
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        dataset.set_epoch(epoch)
        loader = epoch_loader(dataset, sampler, micro_batch * accum, args.num_workers, collate_codes, device,
                              args.global_seed)
        batch_in_epoch = start_batch if epoch == start_epoch else 0
        for codes, labels in loader:
            if train_steps >= total_steps:
                break
            codes = codes.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            losses = []
            for j, (c, y) in enumerate(zip(codes.split(micro_batch), labels.split(micro_batch))):
                last = j == accum - 1
                if args.fsdp:
                    model.set_requires_gradient_sync(last)
                ctx = run_model.no_sync() if (not last and isinstance(run_model, DDP)) else nullcontext()
                with ctx, autocast():
                    out = run_model(c, y, targets=c)
                scaler.scale(out.loss / accum).backward()
                losses.append(out.losses.detach())
            scaler.unscale_(optimizer)
            clip = args.max_grad_norm if args.max_grad_norm else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                update_ema(ema, model, args.ema_decay)
            train_steps += 1
            batch_in_epoch += 1
            throughput.update(len(codes) * world)

            per_factor = torch.stack(losses).mean(0).tolist()
            averager.add({"loss": sum(per_factor) / len(per_factor), "grad_norm": float(grad_norm),
                          **{f"loss_{n}": v for n, v in zip(config.factor_names, per_factor)}})
            if train_steps % args.log_every == 0 or train_steps == total_steps:
                avg = averager.reduce()
                avg["lr"] = optimizer.param_groups[0]["lr"]
                parts = [f"loss={avg['loss']:.4f}"] + [f"{n}={avg[f'loss_{n}']:.4f}" for n in config.factor_names] \
                    + [f"grad={avg['grad_norm']:.3f}"]
                report(run, writer, train_steps, total_steps, epoch, avg, throughput.report(total_steps - train_steps),
                       parts)
            if train_steps % args.ckpt_every == 0:
                save(epoch, batch_in_epoch)
        start_batch = 0
    if saved_step != train_steps:
        save(train_steps // steps_per_epoch, train_steps % steps_per_epoch)
    writer.close()
    logger.info("Done!")
    cleanup()
    return last_saved
