"""Answer checking and the dual (correctness + format) reward."""

from dlr.rewards.reward import (
    CORRECT,
    DEFAULT_FORMAT_PATTERN,
    FORMAT,
    SCORE_COLUMNS,
    TOTAL,
    RewardBreakdown,
    RewardConfig,
    format_ok,
    score,
    score_batch,
)
from dlr.rewards.verify import (
    DEFAULT_TIMEOUT_S,
    extract_answer,
    is_correct,
    latex_equivalent,
    normalize_answer,
    parse_bool,
    parse_number,
    warm_up_verifier,
)

__all__ = [
    "CORRECT",
    "DEFAULT_FORMAT_PATTERN",
    "FORMAT",
    "SCORE_COLUMNS",
    "TOTAL",
    "DEFAULT_TIMEOUT_S",
    "RewardBreakdown",
    "RewardConfig",
    "extract_answer",
    "format_ok",
    "is_correct",
    "latex_equivalent",
    "normalize_answer",
    "parse_bool",
    "parse_number",
    "score",
    "score_batch",
    "warm_up_verifier",
]
