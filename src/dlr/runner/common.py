"""Config helpers every runner job uses: the run folder, model and prompt settings, the Trainer with the
configured callbacks and loggers, the devices, atomic JSON results."""

from __future__ import annotations

import json
import logging
import os
import platform
import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

from dlr.callbacks.flush_logs import FlushLogsOnCheckpoint
from dlr.callbacks.progress import StepProgressBar
from dlr.models.backbones import ModelSpec, PromptFormat, resolve_path
from dlr.rewards import RewardConfig


def output_dir(cfg: DictConfig) -> Path:
    """The run folder: Hydra's when Hydra runs us, else `paths.output_dir` (tests, notebooks)."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def is_rank_zero() -> bool:
    """Rank 0 writes results and runs evaluations. A DDP child process knows its rank from the
    environment from its start, before any Trainer exists."""
    return rank_zero_only.rank == 0


def check_writable(folder: Path) -> None:
    """Fail at start, not after an hour of training, when results could not be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe_{os.getpid()}"  # DDP processes probe the same folder at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SystemExit(
            f"error: the run folder {folder} is not writable ({err}); set paths.log_dir to a writable folder"
        ) from err


def model_spec(node: DictConfig, root_dir: str) -> ModelSpec:
    fields = OmegaConf.to_container(node, resolve=True)
    fields["name_or_path"] = resolve_path(fields["name_or_path"], root_dir)
    return ModelSpec(**fields)


def prompt_format(cfg: DictConfig) -> PromptFormat:
    return PromptFormat(**OmegaConf.to_container(cfg.backbone.prompt, resolve=True))


def reward_config(cfg: DictConfig) -> RewardConfig:
    fields = OmegaConf.to_container(cfg.reward, resolve=True)
    return RewardConfig(**{k: v for k, v in fields.items() if v is not None})  # null = the default


def instantiate_list(group: DictConfig | None) -> list:
    """Instantiate every entry of a callbacks/logger group that has a `_target_`."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None, **overrides) -> L.Trainer:
    """The Trainer of `cfg.trainer` with the configured loggers and callbacks; `extra_callbacks` go first."""
    loggers = instantiate_list(cfg.get("logger"))
    callbacks = list(extra_callbacks or []) + instantiate_list(cfg.get("callbacks")) + [FlushLogsOnCheckpoint()]
    if not loggers:  # Lightning refuses a learning-rate monitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(StepProgressBar())  # Lightning's default would count epochs, which a stream never ends
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)


# Warnings whose cause we know and that ask nothing of a user, matched at the start of their message.
KNOWN_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own call into torch's pytree
    r"`is_gradient_checkpointing` is deprecated",  # transformers calling its own renamed method
    r"Found \d+ module\(s\) in eval mode",  # the frozen main model stays in eval mode by design
)


def quiet_logs() -> None:
    """One line per message: Lightning's loggers print through Hydra's console and `train.log` handlers
    instead of also through their own (every INFO line came twice), without the litlogger advert; the
    known harmless warnings above are hidden."""
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡 Tip")
    )


def rl_ddp_strategy(module: L.LightningModule) -> DDPStrategy:
    """What `trainer.strategy=ddp` builds for an RL arm. The modules' buffers are per-rank counters
    (FLOPs, tokens) that DDP must not overwrite with rank 0's at every forward; a module whose steps
    leave some parameters without a gradient says so. Between arms rank 0 evaluates alone while the
    other ranks wait in a collective, so the timeout is hours, not DDP's 30 minutes."""
    # Lightning deprecates the flag but keeps it for rank-local buffers, which these are.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    return DDPStrategy(
        find_unused_parameters=module.ddp_unused_parameters, broadcast_buffers=False, timeout=timedelta(hours=4)
    )


def write_json(path: Path, payload) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)  # atomic: a reader never sees half a file


def evaluation_device(accelerator: str) -> str:
    """The device `trainer.accelerator` asks for, for work done outside Lightning's loop."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def device_name(accelerator: str) -> str:
    if evaluation_device(accelerator) == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({model}, {torch.get_num_threads()} threads)"


def project_path(path: str, root_dir: str) -> Path:
    """A relative path is taken from the project root (Hydra runs in the run folder)."""
    return Path(path) if Path(path).is_absolute() else Path(root_dir) / path
