"""Console + file logging on rank 0, and a scalar writer for TensorBoard (wandb only when asked for)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional


def create_logger(log_dir: Optional[str | os.PathLike] = None, is_main: bool = True,
                  name: str = "fqgan") -> logging.Logger:
    """Rank 0 logs to the console and to ``log_dir/log.txt``; other ranks log warnings and errors only."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if is_main and log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(log_dir) / "log.txt")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def _tensorboard_without_tensorflow() -> None:
    """TensorBoard's writer imports TensorFlow when it is installed (the FID evaluator needs it), which costs
    seconds and floods the log. TensorBoard's own switch for its TF-free stub is an importable
    ``tensorboard.compat.notf`` module; provide one."""
    import types

    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


class MetricWriter:
    """Scalars and images to TensorBoard (and wandb when ``use_wandb`` and it is installed). A no-op off rank 0.
    ``purge_step``: a run resumed at step S passes S + 1, so events an earlier session logged after S are hidden."""

    def __init__(self, log_dir: Optional[str | os.PathLike], enabled: bool = True, use_wandb: bool = False,
                 wandb_project: str = "fqgan", run_name: Optional[str] = None, config: Any = None,
                 logger: Optional[logging.Logger] = None, purge_step: Optional[int] = None):
        self.tb = None
        self.wandb = None
        if not enabled or log_dir is None:
            return
        _tensorboard_without_tensorflow()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events of earlier sessions from that step on (a resumed run's steps are
        # then shown once, not also as the dead run logged them after its last checkpoint)
        self.tb = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        if use_wandb:
            try:
                import wandb
            except ImportError:
                if logger:
                    logger.warning("--wandb was given but wandb is not installed (pip install wandb); "
                                   "logging to TensorBoard only")
            else:
                self.wandb = wandb
                wandb.init(project=wandb_project, name=run_name, config=vars(config) if hasattr(config, "__dict__")
                           else config, dir=str(log_dir))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log({k: float(v) for k, v in values.items()}, step=step)

    def image(self, tag: str, hwc, step: int) -> None:
        """``hwc``: a uint8 array (H, W, 3), e.g. what ``utils.images.save_grid`` returns."""
        if self.tb is not None:
            self.tb.add_image(tag, hwc, step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.log({tag: self.wandb.Image(hwc)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
