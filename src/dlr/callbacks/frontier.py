"""Feeds each RL batch's outcomes to the data module's depth frontier (data/frontier.py) and logs the
estimate. The runner adds it whenever the data module has a frontier, after the budget meter."""

from __future__ import annotations

import torch
from lightning import Callback

from dlr.ranks import gather_ranks, log_rank_zero
from dlr.rewards import CORRECT


class FrontierUpdate(Callback):
    """After each RL batch: every rank's (task, depth, K correctness scores) of that batch update the
    frontier, so all ranks hold the same estimate and draw by the same weights."""

    def __init__(self, frontier, log_every_n_steps: int = 1) -> None:
        self.frontier = frontier
        self.log_every_n_steps = log_every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        scores = getattr(pl_module, "last_scores", None)  # [B, K, 3]: correct, format, reward
        if scores is None or pl_module.stage != "rl":
            return
        tasks = self.frontier.tasks
        task_index = torch.tensor([tasks.index(r.task) if r.task in tasks else -1 for r in batch], dtype=torch.float64)
        depth = torch.tensor([r.depth for r in batch], dtype=torch.float64)
        local = torch.cat(
            [task_index[:, None], depth[:, None], scores[..., CORRECT].detach().cpu().double()], 1
        )  # [B, 2+K]
        rows = gather_ranks(trainer, local.flatten()).reshape(-1, local.shape[1])  # [world * B, 2 + K]
        known = rows[:, 0] >= 0
        rows = rows[known]
        self.frontier.update([tasks[int(i)] for i in rows[:, 0]], [int(d) for d in rows[:, 1]], rows[:, 2:].tolist())
        if trainer.global_step % self.log_every_n_steps == 0:
            log_rank_zero(trainer, self.metrics(rows))

    def metrics(self, rows: torch.Tensor) -> dict[str, float]:
        """The batch's depth mix and the estimated pass rate per (task, depth)."""
        metrics = {}
        for depth in self.frontier.depths:
            metrics[f"frontier/depth_share/d{depth}"] = float((rows[:, 1] == depth).double().mean())
            for task in self.frontier.tasks:
                metrics[f"frontier/pass_rate/{task}/d{depth}"] = self.frontier.pass_rate(task, depth)
        return metrics
