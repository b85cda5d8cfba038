"""Format check and the dual reward `w_correct * R_corr + w_format * R_fmt` (docs/design.md §9).

The two checks are independent: a well-formed wrong answer earns the format term, a correct answer in
a malformed completion the correctness term (correctness uses the strict extractor). Each check is
reported as 0 or 1 (the `correct` and `format` columns, read as rates everywhere); the total reads
them as R in {0, 1} (reward=default) or, with `signed`, in {+1, -1} as the paper's Eqs. (1)-(3) do
(reward=paper). `structure` names what a well-formed completion is: `hash`, reasoning and then one
`#### n` line (the tiny backbone's warm-start format, the Qwen pairs' instruction), or `tags`, the
paper's `<think>...</think><answer>...</answer>`, whose answer is read from the answer span.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass

import torch

from dlr.rewards.verify import DEFAULT_TIMEOUT_S, extract_answer, extract_tagged_answer, is_correct

# Optional reasoning without any `####`, ending in whitespace; then the one answer line
# `#### <token>` (token: no whitespace, no '#') and nothing but whitespace after it.
# Linear time: the reasoning loop cannot cross a `####`, so backtracking retries each position once.
DEFAULT_FORMAT_PATTERN = r"(?:(?:(?!####)[\s\S])*\s)?####[ \t]+[^\s#]+\s*"
# One `<think>` block, then one `<answer>` block holding something besides whitespace, nothing but
# whitespace around them, and no think/answer tag inside either. Linear time as above: neither loop
# can cross a tag, so the closing tag after it can match at one position only.
_NO_TAG = r"(?!</?(?:think|answer)>)"
TAGS_FORMAT_PATTERN = (
    rf"\s*<think>(?:{_NO_TAG}[\s\S])*</think>\s*<answer>\s*{_NO_TAG}\S(?:{_NO_TAG}[\s\S])*</answer>\s*"
)
FORMAT_PATTERNS = {"hash": DEFAULT_FORMAT_PATTERN, "tags": TAGS_FORMAT_PATTERN}  # by reward.structure
STRUCTURES = tuple(FORMAT_PATTERNS)


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
    total: float  # w_correct * R(correct) + w_format * R(format), R(x) = x or, signed, 2x - 1


@dataclass(frozen=True)
class RewardConfig:
    """Reward settings, built from the Hydra `reward` group (configs/reward/*.yaml, the one source of
    their values). Field names match `score`'s keyword arguments; `format_pattern` left out of the
    config (null there) is the structure's template."""

    w_correct: float
    w_format: float
    signed: bool  # R in {+1, -1} (the paper's Eqs. 1-2) instead of {0, 1}
    structure: str  # STRUCTURES: what a well-formed completion is, and where its answer is read
    math_verify_timeout_s: float
    format_pattern: str | None = None  # None: the structure's template (`pattern`)

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"reward.structure must be one of {STRUCTURES}, got {self.structure!r}")
        if not isinstance(self.signed, bool):
            raise ValueError(f"reward.signed must be true or false, got {self.signed!r}")
        for key in ("w_correct", "w_format", "math_verify_timeout_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward.{key} must be a finite number, got {value!r}")
            if key == "math_verify_timeout_s" and value <= 0:
                raise ValueError(f"reward.{key} must be > 0, got {value!r}")
            if value < 0:
                raise ValueError(f"reward.{key} must be >= 0, got {value!r}")
        if not isinstance(self.pattern, str):
            raise ValueError(f"reward.format_pattern must be a string, got {self.format_pattern!r}")
        try:
            _compiled(self.pattern)
        except re.error as error:
            raise ValueError(f"reward.format_pattern does not compile: {error}") from error

    @property
    def pattern(self) -> str:
        """The regex a well-formed completion fully matches: format_pattern, or the structure's template."""
        return FORMAT_PATTERNS[self.structure] if self.format_pattern is None else self.format_pattern

    @classmethod
    def from_dict(cls, values: dict) -> RewardConfig:
        """From the resolved `cfg.reward`; a null setting is left to its default (the structure's template)."""
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
    signed: bool = False,
    structure: str = "hash",
    format_pattern: str | None = None,
    math_verify_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RewardBreakdown:
    """Dual reward of one completion (`RewardConfig` says what each setting means; format_pattern
    None: the structure's template). Never raises on any completion or gold string."""
    answer = extract_tagged_answer(completion) if structure == "tags" else extract_answer(completion)
    correct = float(is_correct(answer, gold_answer, task, timeout_s=math_verify_timeout_s))
    well_formed = float(format_ok(completion, FORMAT_PATTERNS[structure] if format_pattern is None else format_pattern))
    r_correct, r_format = (2 * correct - 1, 2 * well_formed - 1) if signed else (correct, well_formed)
    return RewardBreakdown(correct, well_formed, w_correct * r_correct + w_format * r_format)


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
