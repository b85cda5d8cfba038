"""How good the critic's pre-decode choice is (docs/design.md §7, stage 2 step 2): every N stage-2 steps, decode all G
sampled chains once more and compare the critic's top-K with the true top-K."""

from __future__ import annotations

import torch

from dlr.callbacks.rollout_diagnostic import RolloutDiagnostic
from dlr.ranks import log_now
from dlr.rewards import TOTAL


def filter_quality(predicted: torch.Tensor, rewards: torch.Tensor, keep: int) -> dict[str, torch.Tensor]:
    """Precision@K of the critic's picks, its expected value for K random picks, and the critic's MSE.

    predicted, rewards: [B, G]. Rewards take few values, so ties are frequent: a pick counts as a hit
    when its true reward is at least the K-th best reward of its question.
    """
    kth_best = rewards.topk(keep, dim=1).values[:, -1:]  # [B, 1]
    hits = rewards >= kth_best  # [B, G]
    picks = predicted.topk(keep, dim=1).indices  # [B, K]
    return {
        "precision_at_k": hits.gather(1, picks).float().mean(),
        "precision_at_k_random": hits.float().mean(),  # the expected precision of K random picks
        "critic_mse": (predicted - rewards).pow(2).mean(),
    }


class RewardFilter(RolloutDiagnostic):
    """Logs `filter/precision_at_k`, `filter/precision_at_k_random` and `filter/critic_mse` (over all G)."""

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__(every_n_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollout = self.due_rollout(trainer, pl_module)
        if rollout is None:
            return
        rewards = pl_module.decode_and_score(rollout.records, rollout.z, step_mask=rollout.step_mask)[..., TOTAL]
        quality = filter_quality(rollout.predicted, rewards, rollout.kept.shape[1])
        log_now(trainer, {f"filter/{k}": v for k, v in quality.items()})
