"""Training loop of the FAR generator on a code store; one implementation behind ``train_c2i_dual.py`` and
``train_c2i_triple.py`` (which only fix the factor count), and itself LlamaGen's ``train_c2i.py``: run as a
script it takes the factor count from the code store, so it trains LlamaGen's GPT (``--gpt-model GPT-B`` ...
``GPT-7B``) on single-codebook codes as well as FAR on factorised ones.

    torchrun --nproc_per_node=8 autoregressive/train/train_c2i.py --code-path codes/vq16_384 \
        --image-size 384 --gpt-model GPT-B --cloud-save-path unused

DDP by default, FSDP2 (``--fsdp``, ``fully_shard`` per transformer block) for FAR-L and larger; AdamW with weight
decay on matrices only; bf16 autocast on GPU; gradient clipping and accumulation; optional EMA. ``build`` turns
the flags into a ``Trainer``; ``main`` runs a plain loop of ``train_step``. Checkpoints are atomic, use the
released key names (``model``, ``ema``, ``optimizer``, ``steps``, ``args``) and carry what an exact resume needs
(epoch position and every rank's RNG state, which drives label and token dropout). SIGTERM or SIGUSR1
(preemption) stops every rank after its current step with such a checkpoint; non-finite steps are skipped.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from autoregressive.data.code_store import CodeDataset, collate_codes, read_manifest
from autoregressive.models import FAR, MODELS, describe_far, far_checkpoint, far_config, load_far_weights
from autoregressive.models.far import FARConfig, TransformerBlock
from utils.argtypes import finite_float, nonnegative_float, nonnegative_int, positive_float, positive_int, unit_float
from utils.checkpoint import extract_weights
from utils.data import ResumableSampler
from utils.distributed import is_distributed
from utils.ema import new_ema, update_ema
from utils.factors import preset_name
from utils.flags import (add_compat_flags, add_compile_argument, add_precision_argument, from_flags, ignored,
                         parse_flags, require)
from utils.logs import MetricWriter
from utils.progress import MetricAverager, Throughput, report
from utils.rng import seed_everything
from utils.run import (Checkpoints, Position, Run, RunConfig, StopSignal, add_run_arguments, check_resumed_flags,
                       epoch_batches, fail, find_resume, finish_run, restore_position, save_run_checkpoint,
                       start_run)
from utils.steps import (NonFiniteGuard, accumulation, autocast_context, fused_kwargs, grad_scaler,
                         optimizer_step)

BAD_INPUT = (ValueError, FileNotFoundError)  # one-line errors, raised by build() (CodeStoreError included)
# Flags a resumed run may not change: the saved data position and weights would be read with another meaning.
RESUME_FIXED = ("global_batch_size", "image_size", "downsample_size", "global_seed", "gpt_model", "vocab_size",
                "num_classes", "cls_token_num")


# The original training scripts' flags that this project does not use (see utils/flags.py).
COMPAT = (
    ignored("--gpt-type", type=str, choices=["c2i"], default="c2i", help="class-conditional is the only type"),
    ignored("--dataset", type=str, default="imagenet_code", help="--code-path is a code store"),
    ignored("--cloud-save-path", type=str, default=None, help="LlamaGen's copy of every checkpoint; they are "
                                                               "written to --results-dir"),
)


def get_parser(num_factors: Optional[int]) -> argparse.ArgumentParser:
    codes = "a code store (its factor count decides)" if num_factors is None else f"{preset_name(num_factors)} codes"
    p = argparse.ArgumentParser(description=f"Train a class-conditional FAR generator (or LlamaGen GPT) on {codes}.")
    p.add_argument("--code-path", type=str, required=True, help="code store from extract_codes_c2i_*_code.py")
    p.add_argument("--exp-name", type=str, required=True)
    p.add_argument("--no-local-save", action="store_true")
    p.add_argument("--gpt-model", type=str, choices=list(MODELS), default="FAR-B",
                   help="FAR-* (any factor count) or LlamaGen's GPT-* (single-codebook codes)")
    p.add_argument("--gpt-ckpt", type=str, default=None, help="checkpoint to resume from")
    p.add_argument("--vocab-size", type=positive_int, default=16384)
    p.add_argument("--ema", action="store_true")
    p.add_argument("--cls-token-num", type=positive_int, default=1)
    p.add_argument("--dropout-p", type=unit_float, default=0.1, help="residual and FFN dropout")
    p.add_argument("--token-dropout-p", type=unit_float, default=0.1)
    p.add_argument("--drop-path-rate", type=unit_float, default=0.0, help="stochastic depth (turns dropout-p off)")
    add_compile_argument(p, True, "torch.compile the model on GPU (CPU runs never compile)")
    p.add_argument("--results-dir", type=str, default="results")
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--downsample-size", type=int, choices=[4, 8, 16], default=16)
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--epochs", type=positive_int, default=300)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--weight-decay", type=nonnegative_float, default=5e-2)
    p.add_argument("--beta1", type=finite_float, default=0.9)
    p.add_argument("--beta2", type=finite_float, default=0.95)
    p.add_argument("--max-grad-norm", type=nonnegative_float, default=1.0)
    p.add_argument("--global-batch-size", type=positive_int, default=256)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--num-workers", type=nonnegative_int, default=4,
                   help="loader workers (the code store rarely needs any)")
    p.add_argument("--log-every", type=positive_int, default=100)
    p.add_argument("--ckpt-every", type=positive_int, default=5000)
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    add_precision_argument(p, "--mixed-precision", "bf16", "autocast dtype on GPU (CPU runs fp32)")
    # this project's additions
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP)")
    p.add_argument("--max-steps", type=nonnegative_int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--ema-decay", type=unit_float, default=0.9999)
    add_run_arguments(p)
    add_compat_flags(p, COMPAT)
    return p


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """What a FAR run is asked to do: the command line's flags, parsed once and checked (``parse_config``).
    Field names are the flags' (``--gpt-model`` -> ``gpt_model``); checkpoints store them as their ``args``."""
    code_path: str = ""
    gpt_model: str = "FAR-B"
    gpt_ckpt: Optional[str] = None
    vocab_size: int = 16384
    cls_token_num: int = 1
    dropout_p: float = 0.1
    token_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    compile: bool = True
    image_size: int = 256
    downsample_size: int = 16
    num_classes: int = 1000
    epochs: int = 300
    weight_decay: float = 5e-2
    num_workers: int = 4
    fsdp: bool = False

    def __post_init__(self):
        super().__post_init__()
        require(self.image_size % self.downsample_size == 0,
                f"--image-size {self.image_size} is not a multiple of --downsample-size {self.downsample_size}")
        require(not (self.fsdp and self.ema),
                "--ema keeps a full copy of the weights on every rank; it is not combined with --fsdp")

    @property
    def grid(self) -> int:
        """Tokens per side of an image."""
        return self.image_size // self.downsample_size


def parse_config(argv=None, num_factors: Optional[int] = 2) -> TrainConfig:
    """The command line as a ``TrainConfig``: bad values stop with argparse's one-line error, bad combinations
    with a ValueError (one line in ``main``); the original's ignored flags print one line each."""
    return from_flags(TrainConfig, parse_flags(get_parser(num_factors), COMPAT, argv))


def create_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and embeddings) only; fused (see utils.steps.optimizer_step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused_kwargs(torch.optim.AdamW))


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
    cfg: TrainConfig
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
        weights, opt_state = full_state(self.model, self.optimizer, self.cfg.fsdp)
        ckpt = far_checkpoint(self.model, self.ema, optimizer=opt_state, args=self.cfg.namespace())
        ckpt["model"] = weights
        return save_run_checkpoint(self.run, pos, ckpt, scaler=self.scaler.state_dict())


def build(cfg: TrainConfig, num_factors: int) -> Trainer:
    """Everything the flags describe, resumed from a checkpoint when asked; problems raise one of BAD_INPUT."""
    run = start_run(cfg, cfg.gpt_model)
    device, world, log = run.info.device, run.info.world_size, run.logger
    if cfg.fsdp and not is_distributed():
        raise ValueError("--fsdp needs a torchrun launch (several processes)")
    dataset = CodeDataset(cfg.code_path, seed=cfg.global_seed, expect_factors=num_factors,
                          vocab_size=cfg.vocab_size)
    grid = cfg.grid
    if dataset.info.tokens != grid * grid:
        raise ValueError(f"--code-path {cfg.code_path} holds {dataset.info.grid[0]}x{dataset.info.grid[1]} codes "
                         f"per image, but --image-size {cfg.image_size} / --downsample-size "
                         f"{cfg.downsample_size} gives {grid}x{grid}")
    if dataset.info.num_classes > cfg.num_classes:
        raise ValueError(f"--code-path {cfg.code_path} has {dataset.info.num_classes} classes, more than "
                         f"--num-classes {cfg.num_classes}")
    try:
        sampler = ResumableSampler(len(dataset), run.micro_batch * run.accum, run.info.rank, world,
                                   cfg.global_seed)
    except ValueError as e:
        raise ValueError(f"--code-path {cfg.code_path}: {e}") from None
    total_steps = cfg.total_steps(sampler.batches_per_epoch)
    dropout = 0.0 if cfg.drop_path_rate > 0 else cfg.dropout_p
    try:
        config = far_config(cfg.gpt_model, num_factors, vocab_size=cfg.vocab_size, block_size=grid * grid,
                            num_classes=cfg.num_classes, cls_token_num=cfg.cls_token_num,
                            resid_dropout_p=dropout, ffn_dropout_p=dropout, token_dropout_p=cfg.token_dropout_p,
                            drop_path_rate=cfg.drop_path_rate)
    except ValueError as e:
        raise ValueError(f"--gpt-model {cfg.gpt_model} on --code-path {cfg.code_path}: {e}") from None
    model = FAR(config).to(device)
    log.info(f"Generator: {describe_far(config)}; {model.num_params():,} parameters")
    log.info(f"Codes: {len(dataset):,} images x {dataset.info.num_augs} views, {dataset.info.num_classes} "
             f"classes ({cfg.code_path}); {sampler.batches_per_epoch} steps per epoch, {total_steps} steps in all")
    ema = new_ema(model) if cfg.ema else None
    seed_everything(cfg.global_seed * world + run.info.rank)  # from here on every rank draws its own randomness
    scaler = grad_scaler(device, cfg.mixed_precision)

    # The run folder's own checkpoints win over --gpt-ckpt, which only seeds a fresh run.
    resume = find_resume(cfg.gpt_ckpt, run, "--gpt-ckpt")
    resume_path, ckpt = resume.path, resume.ckpt
    start, opt_state = Position(), None
    if ckpt is not None:
        check_resumed_flags(ckpt, cfg.namespace(), RESUME_FIXED, resume_path, log)
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

    if cfg.fsdp:
        shard_fsdp(model)
    optimizer = create_optimizer(model, cfg)  # after sharding: over the sharded parameters
    if opt_state is not None:
        load_optimizer_state(model, optimizer, opt_state, cfg.fsdp)
    train_model = model
    if cfg.compile and device.type == "cuda":
        log.info("compiling the model... (--no-compile to skip)")
        train_model = torch.compile(train_model)
    if is_distributed() and not cfg.fsdp:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    return Trainer(cfg=cfg, run=run, config=config, model=model, train_model=train_model, ema=ema,
                   optimizer=optimizer, scaler=scaler, dataset=dataset, sampler=sampler, total_steps=total_steps,
                   start=start)


def train_step(t: Trainer, codes: torch.Tensor, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """One optimizer update on this rank's batch (split into micro-batches). Returns the logs (device tensors)
    and whether the update was skipped for non-finite gradients."""
    cfg, autocast = t.cfg, autocast_context(t.run.info.device, t.cfg.mixed_precision)
    mb = t.run.micro_batch
    t.optimizer.zero_grad(set_to_none=True)
    losses = []
    for (c, y), sync in accumulation(t.train_model, zip(codes.split(mb), labels.split(mb))):
        with sync, autocast():
            out = t.train_model(c, y, targets=c)
        t.scaler.scale(out.loss / t.run.accum).backward()
        losses.append(out.losses.detach())
    grad_norm, skipped = optimizer_step(t.optimizer, t.scaler, t.model.parameters(), cfg.max_grad_norm)
    if t.ema is not None:
        update_ema(t.ema, t.model, cfg.ema_decay)
    per_factor = torch.stack(losses).mean(0)
    return {"loss": per_factor.mean(), "grad_norm": grad_norm,
            **{f"loss_{n}": per_factor[f] for f, n in enumerate(t.config.factor_names)}}, skipped


def main(argv=None, num_factors: Optional[int] = 2) -> Optional[Path]:
    """Train; ``num_factors`` None reads the factor count from ``--code-path`` (the script's own entry)."""
    try:
        cfg = parse_config(argv, num_factors)
        if num_factors is None:
            num_factors = read_manifest(cfg.code_path).num_factors
        t = build(cfg, num_factors)
    except BAD_INPUT as e:
        fail(e)
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing to save (the stop signal is not set yet)
        fail("interrupted while setting up the run; no checkpoint was written")
    run, log, device = t.run, t.run.logger, t.run.info.device
    writer = MetricWriter(run.exp_dir / "tensorboard", run.info.is_main, cfg.wandb, "fqgan-far", cfg.exp_name,
                          cfg.namespace(), log)
    throughput, averager = Throughput(device), MetricAverager(device)
    guard, stop = NonFiniteGuard(device, cfg.max_nonfinite_steps), StopSignal(cfg.stop_timeout)

    log.info(f"Training for {cfg.epochs} epochs ({t.total_steps - t.start.step} steps to go)...")
    pos, error, checkpoints = t.start, None, Checkpoints(t.save, cfg.ckpt_every, t.start)
    batches = epoch_batches(t.start, cfg.epochs, t.dataset, t.sampler, run.micro_batch * run.accum,
                            cfg.num_workers, collate_codes, device, cfg.global_seed)
    for epoch, done, (codes, labels) in batches:
        if pos.step >= t.total_steps:
            break
        logs, skipped = train_step(t, codes.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        pos = Position(pos.step + 1, epoch, done)
        guard.update(skipped)
        averager.add(logs)
        throughput.update(len(codes) * run.info.world_size)

        if pos.step % cfg.log_every == 0 or pos.step == t.total_steps:
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


if __name__ == "__main__":
    main(num_factors=None)
