"""What the rollout diagnostics (reward_filter.py, latent_diversity.py) share: when to measure."""

from __future__ import annotations

from lightning import Callback, Trainer


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
