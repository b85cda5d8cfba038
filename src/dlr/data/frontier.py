"""Training at the capability frontier: draw each training depth where the arm's own rewards differ.

A group-relative update learns nothing from a group whose K rewards are equal (its advantages are
zero): at a depth the arm always solves, or never does, every group is wasted. With p the arm's pass
rate at a depth, a group of K independent attempts has reward spread with probability
1 - p^K - (1 - p)^K. The frontier weights each depth by that probability plus a floor (so every depth
keeps being visited and its estimate stays fresh), from an online estimate of p per (task, depth):
decayed counts of correct attempts and attempts, with one prior success and one prior failure
(p = 0.5 before any attempt: the first batches are drawn uniformly).

The same rule serves both arms: each arm's own rollouts update its own estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def spread_probability(pass_rate: float, group_size: int) -> float:
    """Probability that `group_size` independent attempts with success rate `pass_rate` are not all
    equal: 1 - p^K - (1 - p)^K."""
    return 1.0 - pass_rate**group_size - (1.0 - pass_rate) ** group_size


@dataclass
class DepthFrontier:
    """Online pass-rate estimates per (task, depth) and the depth weights they give."""

    tasks: tuple[str, ...]
    min_depth: int
    max_depth: int
    floor: float = 0.05  # weight every depth keeps beside its spread probability
    decay: float = 0.9  # each update scales all earlier counts by this: the estimate follows the arm
    group_size: int = 4  # K attempts per question; set from the rollouts by `update`
    correct: dict[str, list[float]] = field(default_factory=dict)  # decayed correct attempts, by task, per depth
    attempts: dict[str, list[float]] = field(default_factory=dict)  # decayed attempts, by task, per depth

    def __post_init__(self) -> None:
        if not self.floor > 0:
            raise ValueError(f"data.frontier.floor must be > 0 (every depth must stay reachable), got {self.floor}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"data.frontier.decay must be in (0, 1], got {self.decay}")
        depths = self.max_depth - self.min_depth + 1
        for task in self.tasks:
            self.correct.setdefault(task, [0.0] * depths)
            self.attempts.setdefault(task, [0.0] * depths)

    @property
    def depths(self) -> range:
        return range(self.min_depth, self.max_depth + 1)

    def pass_rate(self, task: str, depth: int) -> float:
        """(correct + 1) / (attempts + 2): the estimate with one prior success and one prior failure."""
        i = depth - self.min_depth
        return (self.correct[task][i] + 1.0) / (self.attempts[task][i] + 2.0)

    def weights(self, task: str) -> list[float]:
        """Unnormalised draw weights of `task`'s depths, shallowest first."""
        return [self.floor + spread_probability(self.pass_rate(task, d), self.group_size) for d in self.depths]

    def update(self, tasks: Sequence[str], depths: Sequence[int], correct: Sequence[Sequence[float]]) -> None:
        """Fold in one batch: question i of task `tasks[i]` at depth `depths[i]` had attempts scored
        `correct[i]` (K values in [0, 1]). Questions outside the frontier's tasks or depths are ignored."""
        if not correct:
            return
        self.group_size = len(correct[0])
        for task in self.tasks:
            self.correct[task] = [c * self.decay for c in self.correct[task]]
            self.attempts[task] = [n * self.decay for n in self.attempts[task]]
        for task, depth, scores in zip(tasks, depths, correct, strict=True):
            if task in self.correct and self.min_depth <= depth <= self.max_depth:
                self.correct[task][depth - self.min_depth] += float(sum(scores))
                self.attempts[task][depth - self.min_depth] += float(len(scores))

    def state_dict(self) -> dict:
        return {"group_size": self.group_size, "correct": self.correct, "attempts": self.attempts}

    def load_state_dict(self, state: dict) -> None:
        self.group_size = state["group_size"]
        self.correct = {task: list(values) for task, values in state["correct"].items()}
        self.attempts = {task: list(values) for task, values in state["attempts"].items()}
