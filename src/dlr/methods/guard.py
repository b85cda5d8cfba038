"""Non-finite guard shared by the RL modules: a non-finite loss or gradient skips the step and is
counted; after `max_consecutive` in a row the run stops with a clear error that says which checkpoint,
if any, it can resume from. `debug.inject_nonfinite_at_step` turns the loss into NaN on purpose, to test
exactly that."""

from __future__ import annotations

from pathlib import Path

import torch


def finite_on_every_rank(trainer, loss: torch.Tensor) -> bool:
    """Whether `loss` is finite here and on every other rank. Under DDP a backward is a collective, so
    the ranks must agree before it: one rank's NaN skips the backward everywhere."""
    return trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)  # as is on one device


class NonFiniteTraining(RuntimeError):
    """Training produced only non-finite losses or gradients for too long."""


class NonFiniteGuard:
    def __init__(self, max_consecutive: int, inject_at_step: int | None = None, inject_times: int = 1) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {max_consecutive}")
        self.max_consecutive, self.inject_at_step, self.inject_left = max_consecutive, inject_at_step, inject_times
        self.skipped, self.consecutive = 0, 0

    def inject(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss, or NaN while a fault is being injected at this optimizer step."""
        if self.inject_at_step is not None and step == self.inject_at_step and self.inject_left > 0:
            return loss * float("nan")
        return loss

    def end_injection_batch(self, step: int) -> None:
        """One batch at the injection step is over (a skipped step keeps the step number)."""
        if self.inject_at_step is not None and step == self.inject_at_step and self.inject_left > 0:
            self.inject_left -= 1

    def record(self, finite: bool, step: int, last_checkpoint: str | None = None) -> bool:
        """Count a finite or skipped step; raise after too many skipped in a row, saying whether
        `last_checkpoint` (the newest checkpoint saved; None or "" when none was) is there to resume from.
        Returns `finite`."""
        if finite:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            if last_checkpoint and Path(last_checkpoint).is_file():
                kept = (
                    f"the last checkpoint, {last_checkpoint}, is kept. Lower the learning rate or method.grad_clip, "
                    f"then resume from it with ckpt_path={last_checkpoint}"
                )
            else:
                kept = (
                    "no checkpoint was saved before it (callbacks.model_checkpoint.every_n_train_steps sets how "
                    "often one is). Lower the learning rate or method.grad_clip and start again"
                )
            raise NonFiniteTraining(
                f"{self.consecutive} consecutive optimizer steps had a non-finite loss or gradient (at step {step}); "
                f"training stopped and {kept}"
            )
        return False
