"""Learning-rate schedules, as pure functions of the optimizer step (a resumed run recomputes them)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warm-up over
    `warmup` steps to 1, then a cosine from 1 down to `floor` at step `total`, and `floor` after it.
    floor = 1 with warmup = 0 is a constant rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
