"""The one record schema every data source maps to (docs/design.md §9).

A record is a question with its gold reasoning (`cot`), gold final answer and the number of reasoning
steps (`depth`). Sources that produce something else are adapted; anything that cannot be adapted is a
`MalformedRecord`, which streams skip and count instead of crashing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

TASKS = ("math", "logic")


class MalformedRecord(ValueError):
    """A source row that cannot become a valid `Record`; the message says why."""


@dataclass(frozen=True)
class Record:
    id: str  # unique within its source
    task: str  # "math" or "logic": decides which answer checker applies
    question: str  # the problem text, without any answer
    cot: str  # gold step-by-step solution, without the final answer line
    answer: str  # gold final answer, normalised ("72", "true", "\\frac{1}{2}")
    depth: int  # number of reasoning steps the gold solution takes (>= 1)
    source: str  # where it came from: "synthetic_math", "gsm8k", ...


def make_record(**fields: Any) -> Record:
    """Build a `Record`, raising `MalformedRecord` naming the first bad field."""
    missing = [k for k in Record.__dataclass_fields__ if k not in fields]
    if missing:
        raise MalformedRecord(f"missing field(s): {', '.join(missing)}")
    for key in ("id", "task", "question", "cot", "answer", "source"):
        if not isinstance(fields[key], str):
            raise MalformedRecord(f"field {key!r} must be a string, got {type(fields[key]).__name__}")
    if fields["task"] not in TASKS:
        raise MalformedRecord(f"task must be one of {TASKS}, got {fields['task']!r}")
    if not fields["question"].strip():
        raise MalformedRecord("empty question")
    if not fields["answer"].strip():
        raise MalformedRecord("empty answer")
    depth = fields["depth"]
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise MalformedRecord(f"depth must be a positive integer, got {depth!r}")
    return Record(**{k: (v.strip() if isinstance(v, str) else v) for k, v in fields.items()})


class SkipCounter:
    """Counts skipped rows by reason, so a stream can report what it dropped instead of crashing."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def skip(self, reason: str) -> None:
        self.by_reason[reason] += 1


def adapt_rows(rows: Iterable[Any], adapt: Any, skipped: SkipCounter) -> Iterator[Record]:
    """Map raw rows through `adapt(row) -> Record`, skipping and counting `MalformedRecord`s."""
    for row in rows:
        try:
            yield adapt(row)
        except MalformedRecord as err:
            skipped.skip(str(err).split(":")[0])
