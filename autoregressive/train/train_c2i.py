"""Training loop of the FAR generator on a code store; one implementation behind ``train_c2i_dual.py`` and
``train_c2i_triple.py`` (which only fix the factor count).

DDP by default, FSDP2 (``--fsdp``, ``fully_shard`` per transformer block) for FAR-L and larger; AdamW with weight
decay on matrices only; bf16 autocast on GPU; gradient clipping and accumulation; optional EMA. ``build`` turns
the flags into a ``Trainer``; ``main`` runs a plain loop of ``train_step``. Checkpoints are atomic, use the
released key names (``model``, ``ema``, ``optimizer``, ``steps``, ``args``) and carry what an exact resume needs
(epoch position and every rank's RNG state, which drives label and token dropout). SIGTERM or SIGUSR1
(preemption) stops every rank after its current step with such a checkpoint; non-finite steps are skipped.
"""
from __future__ import annotations

import argparse
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from autoregressive.data.code_store import CodeDataset, collate_codes
from autoregressive.models import FAR, FAR_models, describe_far, far_checkpoint, far_config, load_far_weights
from autoregressive.models.far import FARConfig, TransformerBlock
from utils.argtypes import nonnegative_float, nonnegative_int, positive_float, positive_int, unit_float
from utils.checkpoint import extract_weights
from utils.data import ResumableSampler
from utils.distributed import is_distributed
from utils.ema import requires_grad, update_ema
from utils.factors import preset_name
from utils.logging import MetricWriter
from utils.progress import MetricAverager, Throughput, report
from utils.rng import seed_everything
from utils.run import (Checkpoints, Position, Run, StopSignal, add_run_arguments, check_resumed_flags,
                       epoch_batches, fail, find_resume, finish_run, restore_position, save_run_checkpoint,
                       start_run)
from utils.steps import (NonFiniteGuard, accumulation, autocast_context, fused_kwargs, grad_scaler,
                         optimizer_step)

BAD_INPUT = (ValueError, FileNotFoundError)  # one-line errors, raised by build() (CodeStoreError included)
# Flags a resumed run may not change: the saved data position and weights would be read with another meaning.
RESUME_FIXED = ("global_batch_size", "image_size", "downsample_size", "global_seed", "gpt_model", "vocab_size",
                "num_classes", "cls_token_num")


def get_parser(num_factors: int) -> argparse.ArgumentParser:
    name = preset_name(num_factors)
    p = argparse.ArgumentParser(description=f"Train a class-conditional FAR generator on {name} codes.")
    p.add_argument("--code-path", type=str, required=True, help="code store from extract_codes_c2i_*_code.py")
    p.add_argument("--exp-name", type=str, required=True)
    p.add_argument("--no-local-save", action="store_true")
    p.add_argument("--gpt-model", type=str, choices=list(FAR_models), default="FAR-B")
    p.add_argument("--gpt-ckpt", type=str, default=None, help="checkpoint to resume from")
    p.add_argument("--gpt-type", type=str, choices=["c2i"], default="c2i")
    p.add_argument("--vocab-size", type=positive_int, default=16384)
    p.add_argument("--ema", action="store_true")
    p.add_argument("--cls-token-num", type=positive_int, default=1)
    p.add_argument("--dropout-p", type=unit_float, default=0.1, help="residual and FFN dropout")
    p.add_argument("--token-dropout-p", type=unit_float, default=0.1)
    p.add_argument("--drop-path-rate", type=unit_float, default=0.0, help="stochastic depth (turns dropout-p off)")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile (CPU runs never compile)")
    p.add_argument("--results-dir", type=str, default="results")
    p.add_argument("--dataset", type=str, default="imagenet_code", help="accepted for the original command lines")
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--downsample-size", type=int, choices=[4, 8, 16], default=16)
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--epochs", type=positive_int, default=300)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=5e-2)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--max-grad-norm", type=nonnegative_float, default=1.0)
    p.add_argument("--global-batch-size", type=positive_int, default=256)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--num-workers", type=nonnegative_int, default=4,
                   help="loader workers (the code store rarely needs any)")
    p.add_argument("--log-every", type=positive_int, default=100)
    p.add_argument("--ckpt-every", type=positive_int, default=5000)
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    p.add_argument("--mixed-precision", type=str, default="bf16", choices=["none", "fp16", "bf16"])
    # this project's additions
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP)")
    p.add_argument("--max-steps", type=nonnegative_int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--ema-decay", type=unit_float, default=0.9999)
    add_run_arguments(p)
    return p


def create_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and embeddings) only; fused (see utils.steps.optimizer_step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), **fused_kwargs(torch.optim.AdamW))


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


def load_optimizer_state(model: FAR, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """A checkpoint's (full) optimizer state into ``optimizer``; scattered to the shards under FSDP."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


@dataclass
class Trainer:
    """Everything a FAR run trains with, as ``build`` returns it."""
    args: argparse.Namespace
    run: Run
    config: FARConfig
    model: FAR  # sharded in place under --fsdp
    train_model: nn.Module  # ``model`` compiled and/or DDP-wrapped: what the step calls
    ema: Optional[FAR]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: CodeDataset
    sampler: ResumableSampler
    total_steps: int
    start: Position

    def save(self, pos: Position) -> Optional[Path]:
        """A checkpoint at ``pos`` (collective: under FSDP every rank takes part in gathering the weights)."""
        weights, opt_state = full_state(self.model, self.optimizer, self.args.fsdp)
        ckpt = far_checkpoint(self.model, self.ema, optimizer=opt_state, args=self.args)
        ckpt["model"] = weights
        return save_run_checkpoint(self.run, pos, ckpt, scaler=self.scaler.state_dict())


def build(args, num_factors: int) -> Trainer:
    """Everything the flags describe, resumed from a checkpoint when asked; problems raise one of BAD_INPUT."""
    run = start_run(args, args.gpt_model)
    device, world, log = run.info.device, run.info.world_size, run.logger
    if args.fsdp and not is_distributed():
        raise ValueError("--fsdp needs a torchrun launch (several processes)")
    if args.fsdp and args.ema:
        raise ValueError("--ema keeps a full copy of the weights on every rank; it is not combined with --fsdp")
    dataset = CodeDataset(args.code_path, seed=args.global_seed, expect_factors=num_factors,
                          vocab_size=args.vocab_size)
    grid = args.image_size // args.downsample_size
    if dataset.info.tokens != grid * grid:
        raise ValueError(f"--code-path {args.code_path} holds {dataset.info.grid[0]}x{dataset.info.grid[1]} codes "
                         f"per image, but --image-size {args.image_size} / --downsample-size "
                         f"{args.downsample_size} gives {grid}x{grid}")
    if dataset.info.num_classes > args.num_classes:
        raise ValueError(f"--code-path {args.code_path} has {dataset.info.num_classes} classes, more than "
                         f"--num-classes {args.num_classes}")
    try:
        sampler = ResumableSampler(len(dataset), run.micro_batch * run.accum, run.info.rank, world,
                                   args.global_seed)
    except ValueError as e:
        raise ValueError(f"--code-path {args.code_path}: {e}") from None
    total_steps = sampler.batches_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    dropout = 0.0 if args.drop_path_rate > 0 else args.dropout_p
    config = far_config(args.gpt_model, num_factors, vocab_size=args.vocab_size, block_size=grid * grid,
                        num_classes=args.num_classes, cls_token_num=args.cls_token_num,
                        resid_dropout_p=dropout, ffn_dropout_p=dropout, token_dropout_p=args.token_dropout_p,
                        drop_path_rate=args.drop_path_rate)
    model = FAR(config).to(device)
    log.info(f"Generator: {describe_far(config)}; {model.num_params():,} parameters")
    log.info(f"Codes: {len(dataset):,} images x {dataset.info.num_augs} views, {dataset.info.num_classes} "
             f"classes ({args.code_path}); {sampler.batches_per_epoch} steps per epoch, {total_steps} steps in all")
    ema = None
    if args.ema:
        ema = deepcopy(model).eval()
        requires_grad(ema, False)
    seed_everything(args.global_seed * world + run.info.rank)  # from here on every rank draws its own randomness
    scaler = grad_scaler(device, args.mixed_precision)

    # The run folder's own checkpoints win over --gpt-ckpt, which only seeds a fresh run.
    resume = find_resume(args.gpt_ckpt, run, "--gpt-ckpt")
    resume_path, ckpt = resume.path, resume.ckpt
    start, opt_state = Position(), None
    if ckpt is not None:
        check_resumed_flags(ckpt, args, RESUME_FIXED, resume_path, log)
        weights, _ = extract_weights(ckpt, resume_path, prefer=("model", "ema", "state_dict"))
        load_far_weights(model, weights, resume_path)
        if ema is not None:
            load_far_weights(ema, ckpt.get("ema") or weights, resume_path)
        opt_state = ckpt.get("optimizer")
        start, _ = restore_position(ckpt, sampler.batches_per_epoch, {"scaler": scaler}, log)
        log.info(f"Resumed from {resume_path}: step {start.step}, epoch {start.epoch}, batch {start.batch}")
        del ckpt, weights
    elif ema is not None:
        update_ema(ema, model, decay=0)

    if args.fsdp:
        shard_fsdp(model)
    optimizer = create_optimizer(model, args)  # after sharding: over the sharded parameters
    if opt_state is not None:
        load_optimizer_state(model, optimizer, opt_state, args.fsdp)
    train_model = model
    if not args.no_compile and device.type == "cuda":
        log.info("compiling the model... (--no-compile to skip)")
        train_model = torch.compile(train_model)
    if is_distributed() and not args.fsdp:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    return Trainer(args, run, config, model, train_model, ema, optimizer, scaler, dataset, sampler, total_steps,
                   start)


def train_step(t: Trainer, codes: torch.Tensor, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """One optimizer update on this rank's batch (split into micro-batches). Returns the logs (device tensors)
    and whether the update was skipped for non-finite gradients."""
    args, autocast = t.args, autocast_context(t.run.info.device, t.args.mixed_precision)
    mb = t.run.micro_batch
    t.optimizer.zero_grad(set_to_none=True)
    losses = []
    for (c, y), sync in accumulation(t.train_model, zip(codes.split(mb), labels.split(mb))):
        with sync, autocast():
            out = t.train_model(c, y, targets=c)
        t.scaler.scale(out.loss / t.run.accum).backward()
        losses.append(out.losses.detach())
    grad_norm, skipped = optimizer_step(t.optimizer, t.scaler, t.model.parameters(), args.max_grad_norm)
    if t.ema is not None:
        update_ema(t.ema, t.model, args.ema_decay)
    per_factor = torch.stack(losses).mean(0)
    return {"loss": per_factor.mean(), "grad_norm": grad_norm,
            **{f"loss_{n}": per_factor[f] for f, n in enumerate(t.config.factor_names)}}, skipped


def main(argv=None, num_factors: int = 2) -> Optional[Path]:
    args = get_parser(num_factors).parse_args(argv)
    try:
        t = build(args, num_factors)
    except BAD_INPUT as e:
        fail(e)
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing to save (the stop signal is not set yet)
        fail("interrupted while setting up the run; no checkpoint was written")
    run, log, device = t.run, t.run.logger, t.run.info.device
    writer = MetricWriter(run.exp_dir / "tensorboard", run.info.is_main, args.wandb, "fqgan-far", args.exp_name,
                          args, log)
    throughput, averager = Throughput(device), MetricAverager(device)
    guard, stop = NonFiniteGuard(device, args.max_nonfinite_steps), StopSignal(args.stop_timeout)

    log.info(f"Training for {args.epochs} epochs ({t.total_steps - t.start.step} steps to go)...")
    pos, error, checkpoints = t.start, None, Checkpoints(t.save, args.ckpt_every, t.start)
    batches = epoch_batches(t.start, args.epochs, t.dataset, t.sampler, run.micro_batch * run.accum,
                            args.num_workers, collate_codes, device, args.global_seed)
    for epoch, done, (codes, labels) in batches:
        if pos.step >= t.total_steps:
            break
        logs, skipped = train_step(t, codes.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        pos = Position(pos.step + 1, epoch, done)
        guard.update(skipped)
        averager.add(logs)
        throughput.update(len(codes) * run.info.world_size)

        if pos.step % args.log_every == 0 or pos.step == t.total_steps:
            check = guard.check()
            avg = {**averager.reduce(), "lr": t.optimizer.param_groups[0]["lr"], "nonfinite_steps": check.skipped}
            parts = ([f"loss={avg['loss']:.4f}"] + [f"{n}={avg[f'loss_{n}']:.4f}" for n in t.config.factor_names]
                     + [f"grad={avg['grad_norm']:.3f}"]
                     + ([f"skipped {check.skipped} non-finite steps"] if check.skipped else []))
            report(log, writer, run.metrics_file, pos.step, t.total_steps, epoch, avg,
                   throughput.report(t.total_steps - pos.step), parts)
            if check.error:
                error = check.error
                break
        stopping = stop.requested()
        checkpoints.after_step(pos, stopping)
        if stopping:
            stop.announce(log, pos.step)
            break
    return finish_run(pos, error, checkpoints, (writer, stop), log)
