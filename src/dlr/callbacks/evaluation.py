"""Lightning hooks that evaluate by depth during training: periodically (warm start), after stage 1 (DLR)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from lightning import Callback

from dlr.ranks import log_rank_zero, on_rank_zero
from dlr.rewards import RewardConfig
from dlr.scoring import DepthScore, depth_table, evaluate_by_depth, scores_as_dicts


class PeriodicDepthEval(Callback):
    """Greedy accuracy by depth of `pl_module.<attr>` on a slice of the test set every N training steps.

    A cheap progress signal for long supervised runs; the full evaluation runs at the end.
    """

    def __init__(
        self,
        every_n_steps: int,
        per_depth: int,
        reward: Mapping,
        model_attr: str = "main",
        mode: str = "cot",
        max_new_tokens: int = 96,
    ) -> None:
        self.every_n_steps, self.per_depth = every_n_steps, per_depth
        self.reward = RewardConfig.from_dict(dict(reward))  # the run's `reward` config group
        self.model_attr, self.mode, self.max_new_tokens = model_attr, mode, max_new_tokens

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps:
            return
        on_rank_zero(trainer, lambda: self.evaluate(trainer, pl_module))

    def evaluate(self, trainer, pl_module) -> None:
        seen: dict[tuple[str, int], int] = defaultdict(int)
        records = []
        for r in trainer.datamodule.test_records():
            if seen[(r.task, r.depth)] < self.per_depth:
                seen[(r.task, r.depth)] += 1
                records.append(r)
        scores = evaluate_by_depth(
            getattr(pl_module, self.model_attr),
            pl_module.tokenizer,
            pl_module.fmt,
            records,
            label=f"{self.model_attr}/{self.mode}",
            mode=self.mode,
            max_new_tokens=self.max_new_tokens,
            batch_size=len(records),
            reward=self.reward,
        )
        log_rank_zero(trainer, {f"eval/{s.task}_acc_d{s.depth}": s.accuracy for s in scores})
        print(
            f"\nstep {trainer.global_step}: "
            + ", ".join(f"{s.task[0]}{s.depth}={100 * s.accuracy:.0f}%" for s in scores),
            flush=True,
        )


class AlignmentEval(Callback):
    """Evaluates a DLR module's latent chains on the full test set once, when stage 1 (latent
    alignment) ends and before stage 2 starts; the scores survive a resume in the checkpoint.
    It runs at the end of the last alignment batch, after a budget meter has stopped its clock."""

    LABEL = "dlr/after_alignment"

    def __init__(self, batch_size: int = 128) -> None:
        self.batch_size = batch_size
        self.scores: list[DepthScore] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.on_train_batch_end(trainer, pl_module, None, None, 0)  # alignment.steps=0: the untrained policy

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.scores is not None or pl_module.stage != "rl":
            return
        self.scores = on_rank_zero(trainer, lambda: self.evaluate(trainer, pl_module)) or []  # [] on other ranks

    def evaluate(self, trainer, pl_module) -> list[DepthScore]:
        scores = pl_module.evaluate_latent(trainer.datamodule.test_records(), self.LABEL, self.batch_size)
        log_rank_zero(trainer, {f"eval_alignment/{s.task}_acc_d{s.depth}": s.accuracy for s in scores})
        print(f"\nafter latent alignment:\n{depth_table(scores)}", flush=True)
        return scores

    def state_dict(self) -> dict:
        return {"scores": scores_as_dicts(self.scores) if self.scores is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.scores = [DepthScore(**s) for s in state["scores"]] if state.get("scores") is not None else None
