"""Logging metrics that are not produced at every step."""

from __future__ import annotations

import torch
from lightning import Callback, Trainer


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


class RolloutDiagnostic(Callback):
    """Base of callbacks that measure a DLR module's last stage-2 rollout every `every_n_steps` steps."""

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"{type(self).__name__}.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.measured_step = -1  # with gradient accumulation several batches share a step: measure once

    def due_rollout(self, trainer: Trainer, pl_module):
        """The rollout to measure now, or None (no stage-2 rollout yet, not a measuring step, or measured)."""
        rollout = getattr(pl_module, "last_rollout", None)
        step = trainer.global_step
        if rollout is None or pl_module.stage != "rl" or step % self.every_n_steps or step == self.measured_step:
            return None
        self.measured_step = step
        return rollout
