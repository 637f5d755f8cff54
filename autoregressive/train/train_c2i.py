"""Training loop of the FAR generator on a code store; one implementation behind ``train_c2i_dual.py`` and
``train_c2i_triple.py`` (which only fix the factor count), and itself LlamaGen's ``train_c2i.py``: run as a
script it takes the factor count from the code store, so it trains LlamaGen's GPT (``--gpt-model GPT-B`` ...
``GPT-7B``) on single-codebook codes as well as FAR on factorised ones.

    torchrun --nproc_per_node=8 autoregressive/train/train_c2i.py --code-path codes/vq16_384 \
        --image-size 384 --gpt-model GPT-B --cloud-save-path unused

DDP by default, FSDP2 (``--fsdp``, ``fully_shard`` per transformer block) for FAR-L and larger; AdamW with weight
decay on matrices only; bf16 autocast on GPU; gradient clipping and accumulation; optional EMA. ``TrainConfig`` is
the command line; ``build`` turns it into a ``Trainer``; ``utils.training.train`` runs the loop both trainers
share, calling ``train_step``. Checkpoints are atomic, use the
released key names (``model``, ``ema``, ``optimizer``, ``steps``, ``args``) and carry what an exact resume needs
(epoch position and every rank's RNG state, which drives label and token dropout). SIGTERM or SIGUSR1
(preemption) stops every rank after its current step with such a checkpoint; non-finite steps are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from autoregressive.data.code_store import CodeDataset, collate_codes
from autoregressive.models import FAR, MODELS, describe_far, far_checkpoint, far_config, load_far_weights
from autoregressive.models.far import FARConfig, TransformerBlock
from utils.argtypes import nonnegative_float, nonnegative_int, positive_int, unit_float
from utils.data import ResumableSampler
from utils.distributed import is_distributed
from utils.ema import new_ema, update_ema
from utils.factors import preset_name
from utils.flags import compile_flag, flag, ignored, parse, require
from utils.logs import MetricWriter
from utils.recipes import FAR_RECIPES
from utils.resume import Position, resume_run
from utils.rng import seed_everything
from utils.run import Run, RunConfig, start_run
from utils.steps import accumulation, autocast_context, fused_kwargs, grad_scaler, optimizer_step
from utils.training import StepOutput, run_trainer, save_run_checkpoint

BAD_INPUT = (ValueError, FileNotFoundError)  # one-line errors, raised by build() (CodeStoreError included)


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """What a FAR run is asked to do, and the one declaration of its command line (``parse_config``): each field is
    a flag (``--gpt-model`` -> ``gpt_model``); checkpoints store the fields as their ``args``.
    ``resume="fixed"`` marks what a resumed run may not change."""
    IGNORED = (  # the original training scripts' flags that this project does not use
        ignored("--gpt-type", type=str, choices=["c2i"], default="c2i", help="class-conditional is the only type"),
        ignored("--dataset", type=str, default="imagenet_code", help="--code-path is a code store"),
        ignored("--cloud-save-path", type=str, default=None, help="LlamaGen's copy of every checkpoint; they are "
                                                                   "written to --results-dir"),
    )
    num_factors: Optional[int] = 2  # the entry point's factor count (not a flag; None: the code store's)
    code_path: str = flag("", required=True, help="code store from extract_codes_c2i_*_code.py")
    gpt_model: str = flag("FAR-B", choices=tuple(MODELS), resume="fixed",
                          help="FAR-* (any factor count) or LlamaGen's GPT-* (single-codebook codes)")
    gpt_ckpt: Optional[str] = flag(None, resume="ignored", help="checkpoint to resume from")
    vocab_size: int = flag(16384, type=positive_int, resume="fixed")
    cls_token_num: int = flag(1, type=positive_int, resume="fixed")
    dropout_p: float = flag(0.1, type=unit_float, help="residual and FFN dropout")
    token_dropout_p: float = flag(0.1, type=unit_float)
    drop_path_rate: float = flag(0.0, type=unit_float, help="stochastic depth (turns dropout-p off)")
    compile: bool = compile_flag(True, "torch.compile the model on GPU (CPU runs never compile)")
    image_size: int = flag(256, type=positive_int, resume="fixed")
    downsample_size: int = flag(16, type=int, choices=(4, 8, 16), resume="fixed")
    num_classes: int = flag(1000, type=positive_int, resume="fixed")
    epochs: int = flag(300, type=positive_int)
    weight_decay: float = flag(5e-2, type=nonnegative_float)
    num_workers: int = flag(4, type=nonnegative_int, help="loader workers (the code store rarely needs any)")
    fsdp: bool = flag(False, help="shard parameters, gradients and optimizer state (FSDP)")

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
    with a ValueError (one line in ``main``); the original's ignored flags print one line each. ``num_factors``
    None: the code store's."""
    codes = "a code store (its factor count decides)" if num_factors is None else f"{preset_name(num_factors)} codes"
    return parse(TrainConfig, argv, f"Train a class-conditional FAR generator (or LlamaGen GPT) on {codes}.",
                 recipes=FAR_RECIPES, num_factors=num_factors)


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
        return save_run_checkpoint(self.run, pos, ckpt, scaler=self.scaler.state_dict(),
                                   code_store=self.dataset.info.identity())

    # what the shared loop (utils.training.train) calls
    project = "fqgan-far"
    collate = staticmethod(collate_codes)

    def step(self, batch: Any, step: int) -> StepOutput:
        codes, labels = batch
        device = self.run.info.device
        logs, skipped = train_step(self, codes.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        return StepOutput(logs, skipped, len(codes))

    def status(self) -> dict[str, float]:
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    def progress_parts(self, avg: dict[str, float], nonfinite: int) -> list[str]:
        return ([f"loss={avg['loss']:.4f}"] + [f"{n}={avg[f'loss_{n}']:.4f}" for n in self.config.factor_names]
                + [f"grad={avg['grad_norm']:.3f}"] + ([f"skipped {nonfinite} non-finite steps"] if nonfinite else []))

    def after_step(self, pos: Position, batch: Any, out: StepOutput, writer: MetricWriter) -> None:
        pass


def check_code_store(trained: Optional[dict], now: dict, ckpt: str, code_path: str) -> None:
    """A resumed run trains on the codes it was trained on: the store's identity recorded in the checkpoint (its
    tokenizer's content key, grid, factors, images ...) must equal the store's at --code-path now. Checkpoints
    from before the record have none and are not checked."""
    if trained is None:
        return
    changed = [f"{k} {trained.get(k)} -> {now.get(k)}" for k in sorted(set(trained) | set(now))
               if trained.get(k) != now.get(k)]
    if changed:
        raise ValueError(f"--code-path {code_path} is not the code store {ckpt} was trained on ("
                         + ", ".join(changed) + "): resume with the original codes, or train with a new --exp-name")


def build(cfg: TrainConfig) -> Trainer:
    """Everything the flags describe, resumed from a checkpoint when asked; problems raise one of BAD_INPUT."""
    run = start_run(cfg, cfg.gpt_model)
    device, world, log = run.info.device, run.info.world_size, run.logger
    if cfg.fsdp and not is_distributed():
        raise ValueError("--fsdp needs a torchrun launch (several processes)")
    dataset = CodeDataset(cfg.code_path, seed=cfg.global_seed, expect_factors=cfg.num_factors,
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
        config = far_config(cfg.gpt_model, dataset.info.num_factors, vocab_size=cfg.vocab_size,
                            block_size=grid * grid, num_classes=cfg.num_classes, cls_token_num=cfg.cls_token_num,
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
    resume = resume_run(cfg, run.ckpt_dir, run.exp_dir, cfg.gpt_ckpt, "--gpt-ckpt", log)
    start, opt_state = Position(), None
    if resume.found:
        load_far_weights(model, resume.weights(), resume.path)
        if ema is not None:
            load_far_weights(ema, resume.ema_weights(), resume.path)
        opt_state = resume.ckpt.get("optimizer")  # loaded after sharding, below
        start, state = resume.position(sampler.batches_per_epoch, {"scaler": scaler}, log)
        check_code_store(state.get("code_store"), dataset.info.identity(), resume.path, cfg.code_path)
        resume.announce(start, log)
    elif ema is not None:
        update_ema(ema, model, decay=0)
    del resume  # the checkpoint's tensors: not kept beside the model for the whole run

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
    """``train_c2i_<preset>.py``: parse, build (every input checked), train (``utils.training``). ``num_factors``
    None reads the factor count from ``--code-path`` (this script's own entry, LlamaGen's ``train_c2i.py``)."""
    return run_trainer(lambda: parse_config(argv, num_factors), build, BAD_INPUT)


if __name__ == "__main__":
    main(num_factors=None)
