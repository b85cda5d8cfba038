"""Logging metrics that are not produced at every step."""

from __future__ import annotations

import torch
from lightning import Trainer


def log_now(trainer: Trainer, metrics: dict[str, float | torch.Tensor]) -> None:
    """Send scalar metrics straight to the loggers at the current global step (rank zero only).

    Lightning's `self.log` re-emits the last value of every metric at each later logging step of the
    same epoch; training streams here have one endless epoch, so a metric logged only sometimes (one
    stage's losses, periodic diagnostics) would repeat a stale value for the rest of the run.
    """
    if not trainer.is_global_zero or not trainer.loggers:
        return
    values = {key: float(value) for key, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)
