"""Format check and the dual reward `w_correct * correct + w_format * format` (docs/design.md §9).

Both components are 0 or 1 and independent: a well-formed wrong answer earns `w_format`, a correct
answer in a malformed completion earns `w_correct` (correctness uses the strict extractor).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass

import torch

from dlr.rewards.verify import DEFAULT_TIMEOUT_S, extract_answer, is_correct

# Optional reasoning without any `####`, ending in whitespace; then the one answer line
# `#### <token>` (token: no whitespace, no '#') and nothing but whitespace after it.
# Linear time: the reasoning loop cannot cross a `####`, so backtracking retries each position once.
DEFAULT_FORMAT_PATTERN = r"(?:(?:(?!####)[\s\S])*\s)?####[ \t]+[^\s#]+\s*"


@functools.lru_cache(maxsize=32)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def format_ok(completion: str, pattern: str = DEFAULT_FORMAT_PATTERN) -> bool:
    """Whether the whole completion matches `pattern` (re.fullmatch). Patterns are compiled once."""
    return _compiled(pattern).fullmatch(completion) is not None


# Columns of the score tensors (`score_batch`'s [N, 3], the arms' [B, K, 3]), in `RewardBreakdown`'s order.
CORRECT, FORMAT, TOTAL = 0, 1, 2
SCORE_COLUMNS = ("correct", "format", "total")


@dataclass(frozen=True)
class RewardBreakdown:
    correct: float  # 0.0 or 1.0
    format: float  # 0.0 or 1.0
    total: float  # w_correct * correct + w_format * format


@dataclass(frozen=True)
class RewardConfig:
    """Reward settings, built from the Hydra `reward` group (configs/reward/default.yaml, the one source
    of their values). Field names match `score`'s keyword arguments; `format_pattern` left out of the
    config (null there) is the default template."""

    w_correct: float
    w_format: float
    math_verify_timeout_s: float
    format_pattern: str = DEFAULT_FORMAT_PATTERN

    def __post_init__(self) -> None:
        for key in ("w_correct", "w_format", "math_verify_timeout_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward.{key} must be a finite number, got {value!r}")
            if key == "math_verify_timeout_s" and value <= 0:
                raise ValueError(f"reward.{key} must be > 0, got {value!r}")
            if value < 0:
                raise ValueError(f"reward.{key} must be >= 0, got {value!r}")
        if not isinstance(self.format_pattern, str):
            raise ValueError(f"reward.format_pattern must be a string, got {self.format_pattern!r}")
        try:
            _compiled(self.format_pattern)
        except re.error as error:
            raise ValueError(f"reward.format_pattern does not compile: {error}") from error

    @classmethod
    def from_dict(cls, values: dict) -> RewardConfig:
        """From the resolved `cfg.reward`; a null setting is left to its default (the format template)."""
        return cls(**{k: v for k, v in values.items() if v is not None})

    def score(self, completion: str, gold_answer: str, task: str) -> RewardBreakdown:
        """`score` under these settings."""
        return score(completion, gold_answer, task, **asdict(self))

    def score_batch(self, completions: list[str], gold_answers: list[str], tasks: list[str]) -> torch.Tensor:
        """`score_batch` under these settings: [N, 3] (correct, format, total)."""
        return score_batch(completions, gold_answers, tasks, **asdict(self))


def score(
    completion: str,
    gold_answer: str,
    task: str,
    *,
    w_correct: float = 1.0,
    w_format: float = 0.2,
    format_pattern: str = DEFAULT_FORMAT_PATTERN,
    math_verify_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RewardBreakdown:
    """Dual reward of one completion. Never raises on any completion or gold string."""
    correct = float(is_correct(extract_answer(completion), gold_answer, task, timeout_s=math_verify_timeout_s))
    well_formed = float(format_ok(completion, format_pattern))
    return RewardBreakdown(correct, well_formed, w_correct * correct + w_format * well_formed)


def score_batch(completions: list[str], gold_answers: list[str], tasks: list[str], **kwargs) -> torch.Tensor:
    """Scores of N completions as a float32 tensor of shape [N, 3]: columns (correct, format, total).
    Keyword arguments are `score`'s. Lists of different lengths raise ValueError."""
    if not len(completions) == len(gold_answers) == len(tasks):
        raise ValueError(
            f"score_batch needs equal lengths, got {len(completions)} completions, "
            f"{len(gold_answers)} gold answers, {len(tasks)} tasks"
        )
    rows = [
        (s.correct, s.format, s.total)
        for s in (score(c, g, t, **kwargs) for c, g, t in zip(completions, gold_answers, tasks, strict=True))
    ]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 3)  # reshape keeps [0, 3] for N=0
