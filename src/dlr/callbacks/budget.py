"""The compute budget of an RL arm (docs/design.md §5): device-seconds, estimated FLOPs, generated tokens and peak
memory of everything the arm runs after the common start, and the main model's share of the work (sequences
it decoded, positions it read) with the questions trained on; evaluation is excluded. The arm stops when
its budget is spent, and is evaluated at fixed fractions of it.

Only the time between `on_train_batch_start` and `on_train_batch_end` is charged, and the meter must
be the first callback (the orchestrator puts it there): its start hook runs before any other
callback's and its end hook before diagnostics and evaluations run.

Under DDP every rank measures its own batch and the meter adds up all ranks' seconds, FLOPs, tokens and counts:
a budget is the same total compute on one device or several (device-seconds on GPUs, where a rank's
wall time includes waiting for the others; CPU-seconds on the CPU, as one process's threads add up).
Every rank then holds the same totals, so all of them stop at the same batch.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from lightning import Callback

from dlr.accounting import BUDGET_KINDS, BudgetedModule, peak_memory_bytes
from dlr.callbacks.latent_diversity import mean_pairwise_cosine_distance
from dlr.ranks import gather_ranks, log_rank_zero, on_rank_zero
from dlr.rewards import TOTAL
from dlr.scoring import DepthScore, accuracy_by_depth, overall_accuracy, scores_as_dicts


@dataclass
class BudgetPoint:
    """One evaluation on the way: how much was spent, and the scores."""

    fraction: float  # of the budget
    seconds: float
    flops: float
    generated_tokens: int
    scores: list[DepthScore]


@dataclass
class BudgetTrace:
    """Per-batch records as [budget fraction after the batch, value] pairs, for curves against compute;
    a batch that has no such value (DLR's alignment stage has no reward) adds no pair."""

    reward: list[list[float]] = field(default_factory=list)
    grad_norm: list[list[float]] = field(default_factory=list)
    diversity: list[list[float]] = field(default_factory=list)  # DLR: mean pairwise cosine distance of the G latents
    # share of the batch's groups (one per question) whose K rewards are all equal: zero advantage
    frac_reward_zero_std: list[list[float]] = field(default_factory=list)


# the module's counters the meter charges by what they grow in a batch, after the clock in `_batch_start`
COUNTERS = ("flops_spent", "generated_tokens", "main_decoded_sequences", "main_forward_positions")


class BudgetMeter(Callback):
    """Charges each training batch to the budget; evaluates at `eval_fractions`; stops at 100%.

    `pl_module` is a `BudgetedModule` (accounting.py): the meter reads its counters before and after
    each batch and its last reward, gradient norm and rollout after it. `evaluate(pl_module)` returns the
    scores to record (its time is not charged; under DDP it runs on rank 0 and the other ranks record no
    scores).
    """

    def __init__(
        self,
        kind: str,
        amount: float,
        evaluate: Callable | None = None,
        eval_fractions: tuple[float, ...] = tuple(i / 10 for i in range(1, 11)),
        clock: Callable[[], float] | None = None,
        include_alignment: bool = True,
    ) -> None:
        if kind not in BUDGET_KINDS:
            raise ValueError(f"budget.kind must be one of {BUDGET_KINDS}, got {kind!r}")
        if not amount > 0:
            raise ValueError(f"budget.amount must be > 0, got {amount}")
        self.kind, self.amount, self.evaluate = kind, float(amount), evaluate
        self.eval_fractions = sorted(eval_fractions)
        self.clock = clock
        self.seconds, self.flops, self.generated_tokens = 0.0, 0.0, 0  # charged so far, all ranks
        # charged batches' questions, and the main model's decoded sequences and forward positions, all ranks
        self.questions, self.main_decoded_sequences, self.main_forward_positions = 0, 0, 0
        # DLR's stage-1 batches (`pl_module.stage == "alignment"`): charged, or set aside and reported
        self.include_alignment = include_alignment
        self.alignment_seconds, self.alignment_flops = 0.0, 0.0
        self._batch_stage = "rl"
        self.points, self.trace = [], BudgetTrace()
        self.peak_memory = 0  # bytes, the largest of any rank
        self._batch_start: tuple[float, ...] | None = None  # clock, then the module's counters (COUNTERS)

    def _now(self, device: torch.device) -> float:
        if self.clock is not None:
            return self.clock()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return time.process_time()  # CPU: process time, all threads, unaffected by other processes

    def spent(self) -> float:
        return self.seconds if self.kind == "seconds" else self.flops

    def fraction(self) -> float:
        return self.spent() / self.amount

    def on_train_batch_start(self, trainer, pl_module: BudgetedModule, batch, batch_idx) -> None:
        self._batch_stage = pl_module.stage
        self._batch_start = (self._now(pl_module.device), *(float(getattr(pl_module, c)) for c in COUNTERS))

    def on_train_batch_end(self, trainer, pl_module: BudgetedModule, outputs, batch, batch_idx) -> None:
        clock, *counters = self._batch_start
        elapsed = self._now(pl_module.device) - clock  # first: what follows is not charged
        grown = [float(getattr(pl_module, c)) - start for c, start in zip(COUNTERS, counters, strict=True)]
        rollout = pl_module.last_rollout
        diversity = float("nan")
        if rollout is not None:
            diversity = float(mean_pairwise_cosine_distance(rollout.z))
        zero_spread = float("nan")
        scores = pl_module.last_scores if self._batch_stage == "rl" else None
        if scores is not None:  # [B, K, 3]: a group has no spread when its largest reward is its smallest
            rewards = scores[..., TOTAL]
            zero_spread = float((rewards.amax(1) == rewards.amin(1)).double().mean())
        optional = [pl_module.last_reward, pl_module.last_grad_norm]
        local = torch.tensor(
            [
                elapsed,
                grown[0],  # FLOPs
                grown[1],  # generated tokens
                peak_memory_bytes(pl_module.device),
                *[float("nan") if value is None else float(value) for value in optional],
                diversity,
                zero_spread,
                len(batch),  # questions
                grown[2],  # the main model's decoded sequences
                grown[3],  # and forward positions
            ],
            dtype=torch.float64,
        )
        ranks = gather_ranks(trainer, local)  # [world_size, 11]
        self.peak_memory = max(self.peak_memory, int(ranks[:, 3].max()))
        if self._batch_stage == "alignment" and not self.include_alignment:
            self.alignment_seconds += float(ranks[:, 0].sum())
            self.alignment_flops += float(ranks[:, 1].sum())
            return
        self.seconds += float(ranks[:, 0].sum())
        self.flops += float(ranks[:, 1].sum())
        self.generated_tokens += int(ranks[:, 2].sum())
        self.questions += int(ranks[:, 8].sum())
        self.main_decoded_sequences += int(ranks[:, 9].sum())
        self.main_forward_positions += int(ranks[:, 10].sum())
        fraction = self.fraction()
        series_columns = (
            (self.trace.reward, 4),
            (self.trace.grad_norm, 5),
            (self.trace.diversity, 6),
            (self.trace.frac_reward_zero_std, 7),
        )
        for series, column in series_columns:
            if not ranks[:, column].isnan().all():  # the batch had this value: the mean over ranks
                series.append([fraction, float(ranks[:, column].nanmean())])
        log_rank_zero(
            trainer,
            {
                "budget/seconds": self.seconds,
                "budget/flops": self.flops,
                "budget/generated_tokens": self.generated_tokens,
                "budget/fraction": fraction,
                "budget/peak_memory_gb": self.peak_memory / 2**30,
            },
        )
        crossed = [f for f in self.eval_fractions if fraction >= f]
        if crossed:  # one evaluation serves every fraction this batch crossed
            self.eval_fractions = self.eval_fractions[len(crossed) :]
            self.record(pl_module, crossed[0], trainer)
            for f in crossed[1:]:
                self.points.append(dataclasses.replace(self.points[-1], fraction=f))
                self.log_point(trainer, self.points[-1])
        if fraction >= 1.0:
            trainer.should_stop = True

    def record(self, pl_module: BudgetedModule, fraction: float, trainer=None) -> None:
        """Evaluate now (uncharged) and keep the scores with what has been spent. With a trainer, on
        rank 0 only (other ranks wait, then record no scores)."""
        evaluate = (lambda: self.evaluate(pl_module)) if self.evaluate is not None else list
        scores = on_rank_zero(trainer, evaluate) if trainer is not None else evaluate()
        self.points.append(BudgetPoint(fraction, self.seconds, self.flops, self.generated_tokens, scores or []))
        if trainer is not None:
            self.log_point(trainer, self.points[-1])

    @staticmethod
    def log_point(trainer, point: BudgetPoint) -> None:
        """The headline curve in TensorBoard beside the training metrics: test accuracy, overall and by depth."""
        if point.scores:
            by_depth = {f"test/accuracy_depth_{d}": a for d, a in accuracy_by_depth(point.scores).items()}
            metrics = {"test/accuracy": overall_accuracy(point.scores), "test/budget_fraction": point.fraction}
            log_rank_zero(trainer, {**metrics, **by_depth})

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0 and len(self.points) == 1:  # the start, evaluated before the trainer existed
            self.log_point(trainer, self.points[0])

    def state_dict(self) -> dict:
        """Spent seconds, pending evaluations and records survive a resume."""
        points = [{**asdict(p), "scores": scores_as_dicts(p.scores)} for p in self.points]
        return {
            "seconds": self.seconds,
            "flops": self.flops,
            "generated_tokens": self.generated_tokens,
            "main_model": [self.questions, self.main_decoded_sequences, self.main_forward_positions],
            "alignment": [self.alignment_seconds, self.alignment_flops],
            "eval_fractions": self.eval_fractions,
            "peak_memory": self.peak_memory,
            "points": points,
            "trace": asdict(self.trace),
        }

    def load_state_dict(self, state: dict) -> None:
        self.seconds, self.flops, self.generated_tokens = state["seconds"], state["flops"], state["generated_tokens"]
        self.eval_fractions, self.peak_memory = state["eval_fractions"], state["peak_memory"]
        self.alignment_seconds, self.alignment_flops = state.get("alignment", (0.0, 0.0))
        # a checkpoint from before the main model's work was counted: counted from the resume on
        self.questions, self.main_decoded_sequences, self.main_forward_positions = state.get("main_model", (0, 0, 0))
        self.points = [BudgetPoint(**{**p, "scores": [DepthScore(**s) for s in p["scores"]]}) for p in state["points"]]
        self.trace = BudgetTrace(**state["trace"])  # a checkpoint from before a series existed starts it empty

    def grad_norm_cv(self) -> float:
        """Coefficient of variation of the gradient norm over the arm's steps (0 when too few)."""
        norms = [g for _, g in self.trace.grad_norm if g > 0]
        if len(norms) < 2 or statistics.mean(norms) == 0:
            return 0.0
        return statistics.stdev(norms) / statistics.mean(norms)
