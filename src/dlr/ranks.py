"""Collectives and logging across DDP ranks, for any code that holds a trainer: gathering per-rank
values, logging scalars at the current step, running rank-0-only work.

Lightning's `self.log` re-emits the last value of every metric at each later logging step of the same
epoch; training streams here have one endless epoch, so a metric logged only sometimes (one stage's
losses, periodic diagnostics) would repeat a stale value for the rest of the run. These functions send
scalars straight to the loggers at the current global step instead.

They read a trainer's `world_size`, `strategy`, `is_global_zero`, `loggers` and `global_step` only, so
they run on a Lightning Trainer or on a stand-in; Lightning is imported for type checking alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from lightning import Trainer

T = TypeVar("T")


def gather_ranks(trainer: Trainer, values: torch.Tensor) -> torch.Tensor:
    """Every rank's `values` [n] as rows [world_size, n], rank 0 first; one row on one device. Under
    DDP this is a collective: every rank calls it at the same point with the same n."""
    if trainer.world_size == 1:
        return values[None]
    device = trainer.strategy.root_device  # NCCL gathers CUDA tensors only
    return trainer.strategy.all_gather(values.to(device)).reshape(-1, values.numel()).cpu()


def log_now(
    trainer: Trainer, metrics: dict[str, float | torch.Tensor], reduced: dict[str, float] | None = None
) -> None:
    """Log the mean over ranks of each metric (each rank measured its own shard) and, in the same row,
    the `reduced` values (a torchmetrics Metric's, already the same on every rank); rank 0 writes.
    A collective under DDP (see `gather_ranks`): every rank calls it with the same keys."""
    keys = sorted(metrics)
    values = gather_ranks(trainer, torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
    log_rank_zero(trainer, {**dict(zip(keys, values.mean(0).tolist(), strict=True)), **(reduced or {})})


def log_rank_zero(trainer: Trainer, metrics: dict[str, float | torch.Tensor]) -> None:
    """Log rank 0's values as they are: for work only rank 0 does (evaluations) or values that are
    already the same on every rank (the budget meter's reduced totals)."""
    if not trainer.is_global_zero or not trainer.loggers:
        return
    values = {key: float(value) for key, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)


def on_rank_zero(trainer: Trainer, work: Callable[[], T]) -> T | None:
    """Run `work` on rank 0 only (None elsewhere); the other ranks wait at a barrier here, outside any
    charged batch, instead of inside their next batch's first collective."""
    result = work() if trainer.is_global_zero else None
    trainer.strategy.barrier()  # a no-op on one device
    return result
