"""What both RL arms share (docs/design.md §4): manual optimization with the non-finite guard, hand
gradient accumulation and clipping, compute charging, rollout scoring and the reward metrics logged
under TRL's names. An arm subclasses `RLModule` and writes `train_batch` (one RL step) on top of it.

One RL step reads: the arm's module, `losses.py`, `models/generation.py`, and this file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning import LightningModule
from torchmetrics import Metric

from dlr.accounting import ModelCost, generation_flops, pass_flops
from dlr.data.schema import Record
from dlr.methods.checkpointing import TrainableStateCheckpoints
from dlr.methods.guard import NonFiniteGuard, finite_on_every_rank
from dlr.ranks import log_now
from dlr.rewards import CORRECT, FORMAT, TOTAL, RewardConfig


class RewardStatistics(Metric):
    """TRL's reward metrics of the batches since the last reset, reduced over ranks by torchmetrics:
    each the mean over every rank's completions (or groups), weighted by their number."""

    full_state_update = False
    NAMES = (
        "train/reward",
        "train/reward_std",  # mean over groups of the group's std
        "train/rewards/correct/mean",
        "train/rewards/format/mean",
        "train/frac_reward_zero_std",  # groups whose rewards are all equal
    )

    def __init__(self) -> None:
        super().__init__()
        # float64 sums of (batch mean x count): one batch's mean comes back bit for bit
        self.add_state("sums", default=torch.zeros(len(self.NAMES), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(len(self.NAMES), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, zero_spread: torch.Tensor) -> None:
        """scores: [B, K, 3] (correct, format, total); zero_spread: [B] groups with equal rewards."""
        rewards = scores[..., TOTAL]  # [B, K]
        B, K = rewards.shape
        means = torch.stack(
            [
                rewards.mean(),
                rewards.std(dim=1).mean() if K > 1 else rewards.new_zeros(()),
                scores[..., CORRECT].mean(),
                scores[..., FORMAT].mean(),
                zero_spread.float().mean(),
            ]
        )
        counts = torch.tensor([B * K, B, B * K, B * K, B], dtype=torch.float64, device=self.sums.device)
        self.sums += means.to(torch.float64) * counts
        self.counts += counts

    def compute(self) -> dict[str, float]:
        return dict(zip(self.NAMES, (self.sums / self.counts).tolist(), strict=True))


class RLModule(TrainableStateCheckpoints, LightningModule):
    """Base of the RL arms. Subclasses set `arm_name`, `stage`, `is_backbone_key`, `protected_sha256`
    (for the checkpoints) and `main_cost`, and implement `train_batch`. The budget meter reads
    `flops_spent`, `generated_tokens`, `main_decoded_sequences`, `main_forward_positions`,
    `last_reward`, `last_grad_norm`, `last_rollout` and `stage` after each batch; `last_scores`
    [B, K, 3] holds the batch's scored completions, question-major."""

    arm_name: str
    # the ModelCost of the main model as the arm runs it (DLR: the frozen main; GRPO: the main with its
    # adapters, its policy): passes charged with this very object are counted as the main model's work
    main_cost: ModelCost

    def __init__(self, settings, reward: RewardConfig) -> None:
        super().__init__()
        self.automatic_optimization = False  # accumulation, clipping and skipping are done by hand
        self.strict_loading = False  # checkpoints leave out the backbone weights (checkpointing.py)
        self.settings, self.reward = settings, reward
        # compute spent on training, for the budget meter (docs/design.md §5); evaluation is not counted
        self.register_buffer("flops_spent", torch.zeros((), dtype=torch.float64))
        self.register_buffer("generated_tokens", torch.zeros((), dtype=torch.long))  # TRL's num_tokens
        # the main model's work (docs/design.md §5): sequences it generated, and token positions it read in
        # forward passes. The meter charges what they grow by in a batch, so they need not survive a resume.
        self.main_decoded_sequences, self.main_forward_positions = 0, 0
        self.last_reward: float | None = None
        self.last_grad_norm: float | None = None
        self.last_rollout = None  # latent chains of the last batch (DLR's Rollout); None: no latents
        self.last_scores: torch.Tensor | None = None  # [B, K, 3] (correct, format, total) of the last batch
        self.reward_statistics = RewardStatistics()  # reduced over ranks when logged
        self._pending_backwards = 0
        self.guard = NonFiniteGuard(settings.max_consecutive_nonfinite)  # runner/arms.py may arm fault injection

    # --- one batch ----------------------------------------------------------------------------

    def training_step(self, batch: list[Record], batch_idx: int) -> None:
        step = self.trainer.global_step
        self.train_batch(batch)
        self.guard.end_injection_batch(step)

    def train_batch(self, records: list[Record]) -> None:
        raise NotImplementedError

    # --- compute ------------------------------------------------------------------------------

    def charge(self, cost: ModelCost, tokens: int, logit_tokens: int, backward: str = "none") -> None:
        """Add one pass of a model over `tokens` positions, with logits at `logit_tokens` of them, to the
        FLOPs spent (docs/design.md §5); a pass of the main model (`main_cost`) adds its positions to the
        main model's forward positions (its backward, if any, is in the FLOPs alone)."""
        self.flops_spent += pass_flops(cost, tokens, logit_tokens, backward)
        if cost is self.main_cost:
            self.main_forward_positions += tokens

    def charge_generation(self, cost: ModelCost, rows: int, prompt_tokens: int, new_tokens: int) -> None:
        """Add `rows` cached generations of `new_tokens` after `prompt_tokens` to the FLOPs spent; by the
        main model, `rows` decoded sequences and the P + N - 1 positions each reads (the prefill, then
        one cached step per new token but the last)."""
        self.flops_spent += generation_flops(cost, rows, prompt_tokens, new_tokens)
        if cost is self.main_cost and new_tokens > 0:
            self.main_decoded_sequences += rows
            self.main_forward_positions += rows * (prompt_tokens + new_tokens - 1)

    # --- guarded optimization -----------------------------------------------------------------

    def backward_if_finite(self, loss: torch.Tensor) -> bool:
        """Backpropagate `loss` (scaled for accumulation) unless it is non-finite on some rank; a
        non-finite loss is never backpropagated. Returns whether it was."""
        loss = self.guard.inject(loss, self.trainer.global_step)
        if not finite_on_every_rank(self.trainer, loss):
            return False
        self.manual_backward(loss / self.settings.accumulate_grad_batches)
        return True

    def step_if_due(self, optimizer, finite: bool) -> torch.Tensor | None:
        """Step after `accumulate_grad_batches` windows, clipping each parameter group on its own (a
        large critic error cannot shrink the policy's step). A non-finite loss in the window
        (`finite` false) drops the window; a non-finite gradient norm skips the step; both are
        counted. Returns the first group's norm before clipping when a step was due, else None."""
        step = self.trainer.global_step
        if not finite:
            self._pending_backwards = 0
            optimizer.zero_grad(set_to_none=True)
            self._skip(step)
            return None
        self._pending_backwards += 1
        if self._pending_backwards < self.settings.accumulate_grad_batches:
            return None
        self._pending_backwards = 0
        norms = [
            torch.nn.utils.clip_grad_norm_([p for p in group["params"] if p.grad is not None], self.settings.grad_clip)
            for group in optimizer.param_groups
        ]
        if all(torch.isfinite(n) for n in norms):
            self.guard.record(True, step)
            optimizer.step()
        else:
            self._skip(step)
        optimizer.zero_grad(set_to_none=True)
        return norms[0]

    def _skip(self, step: int) -> None:
        """A non-finite step: counted and logged; the guard stops the run after too many in a row."""
        log_now(self.trainer, {"train/skipped_nonfinite_steps": float(self.guard.skipped + 1)})
        saved = self.trainer.checkpoint_callback.last_model_path if self.trainer.checkpoint_callback else ""
        self.guard.record(False, step, saved or self.trainer.ckpt_path)  # a resumed run's start is one too

    # --- rewards and metrics ------------------------------------------------------------------

    def score_rollouts(self, records: Sequence[Record], completions: list[str]) -> torch.Tensor:
        """Scores [B, K, 3] (correct, format, total) of K completions per record, question-major."""
        k = len(completions) // len(records)
        golds = [r.answer for r in records for _ in range(k)]
        tasks = [r.task for r in records for _ in range(k)]
        return self.reward.score_batch(completions, golds, tasks).reshape(len(records), k, 3).to(self.device)

    def finish_rl_batch(
        self, scores: torch.Tensor, zero_spread: torch.Tensor, grad_norm: torch.Tensor | None, logs: dict
    ) -> None:
        """Record what the meter and the callbacks read after an RL batch and log its metrics, the
        reward statistics (`RewardStatistics`) among them. zero_spread: [B] groups with equal rewards."""
        self.last_scores = scores.detach()
        self.last_reward = float(scores[..., TOTAL].mean())
        self.last_grad_norm = float(grad_norm) if grad_norm is not None else None
        self.reward_statistics.update(self.last_scores, zero_spread)
        if self.logging_step(grad_norm):
            log_now(self.trainer, {**logs, "train/grad_norm": grad_norm}, reduced=self.reward_statistics.compute())
        self.reward_statistics.reset()  # each logged row is its own batch's
        self.log("reward", self.last_reward, prog_bar=True, logger=False, batch_size=scores.shape[0])

    def log_step(self, logs: dict[str, torch.Tensor], grad_norm: torch.Tensor | None) -> None:
        """Log this batch's metrics when an optimizer step was taken on a logging step."""
        if self.logging_step(grad_norm):
            log_now(self.trainer, {**logs, "train/grad_norm": grad_norm})

    def logging_step(self, grad_norm: torch.Tensor | None) -> bool:
        """Whether this batch took an optimizer step (the same on every rank) on a logging step."""
        return grad_norm is not None and self.trainer.global_step % self.trainer.log_every_n_steps == 0
