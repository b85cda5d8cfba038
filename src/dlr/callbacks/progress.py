"""The progress bar of step-bounded training on infinite streams: steps done out of the total and, when a
budget meter runs, the share of the budget spent. Lightning's own bar counts epochs (`Epoch 0/-2` with
max_epochs=-1), which a stream never finishes."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import CustomBarColumn, CustomTimeColumn
from rich.progress import TextColumn

from dlr.callbacks.budget import BudgetMeter


def budget_meter(trainer) -> BudgetMeter | None:
    return next((c for c in trainer.callbacks if isinstance(c, BudgetMeter)), None)


def step_description(trainer) -> str:
    """`step 3/10` (`step 3` without trainer.max_steps), then `· budget 40%` while a budget meter runs."""
    total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
    meter = budget_meter(trainer)
    budget = f" · budget {meter.fraction():.0%}" if meter is not None else ""
    return f"step {trainer.global_step}{total}{budget}"


def done_fraction(trainer) -> float | None:
    """How far training is towards its end, the budget or max_steps, whichever comes first; None: unknown."""
    meter = budget_meter(trainer)
    fractions = [meter.fraction()] if meter is not None else []
    if trainer.max_steps and trainer.max_steps > 0:
        fractions.append(trainer.global_step / trainer.max_steps)
    return min(1.0, max(fractions)) if fractions else None


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, described by `step_description` and filled to `done_fraction`."""

    def configure_columns(self, trainer) -> list:
        # No batch counter or it/s: the description counts the steps and the bar's unit is a fraction.
        return [
            TextColumn("[progress.description]{task.description}"),
            CustomBarColumn(
                complete_style=self.theme.progress_bar,
                finished_style=self.theme.progress_bar_finished,
                pulse_style=self.theme.progress_bar_pulse,
            ),
            CustomTimeColumn(style=self.theme.time),
        ]

    def _get_train_description(self, current_epoch: int) -> str:
        return step_description(self.trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_steps(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Not the parent's, which sets the bar to batch_idx + 1 of an endless epoch.
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:  # a resumed run starts mid-epoch, without on_train_epoch_start
            self._initialize_train_progress_bar_id()
        self._show_steps(trainer)
        self._update_metrics(trainer, pl_module)

    def _show_steps(self, trainer) -> None:
        if self.progress is None or self.train_progress_bar_id is None:
            return
        fraction = done_fraction(trainer)
        fill = {"total": 1.0, "completed": fraction} if fraction is not None else {}
        self.progress.update(self.train_progress_bar_id, description=step_description(trainer), **fill)
        self.refresh()
