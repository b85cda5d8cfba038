"""Greedy accuracy and format rate by task and depth on a fixed test set, sampled accuracy and unbiased
pass@k, and their tables.

The evaluations the runner, the methods, the callbacks and the report share; Lightning-free. Scores are
gathered in `DepthScores`, a torchmetrics Metric, so that a caller whose ranks each score a shard gets
them reduced over the ranks. Every score keeps each problem's id and outcome beside the cell's rate: the
report's intervals resample the test problems (report/bootstrap.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from transformers import PreTrainedTokenizerBase

from dlr.data.schema import TASKS, Record
from dlr.models.backbones import PromptFormat
from dlr.models.generation import greedy_complete
from dlr.rewards import RewardConfig

MODES = ("cot", "direct")  # reason in text first | answer at once after an empty latent span


@dataclass(frozen=True)
class DepthScore:
    model: str  # which model/mode produced it, e.g. "main/cot"
    task: str
    depth: int
    n: int
    accuracy: float
    format_rate: float
    # the cell's problems in the order scored: record ids and outcomes (1.0 right, 0.0 wrong); empty in
    # scores written before they were kept, and in scores gathered over ranks (ids are not reduced)
    ids: tuple[str, ...] = ()
    correct: tuple[float, ...] = ()

    def __post_init__(self) -> None:  # read back from JSON they are lists
        object.__setattr__(self, "ids", tuple(self.ids))
        object.__setattr__(self, "correct", tuple(self.correct))


@dataclass(frozen=True)
class SampledScore:
    """`samples` sampled attempts at each problem of one (task, depth) cell, at the arm's own sampling
    (GRPO: completions at its temperature; DLR: latent chains at its sigma, each decoded once by the main)."""

    model: str
    task: str
    depth: int
    samples: int  # n attempts per problem
    ids: tuple[str, ...]  # the cell's problems, in the order scored
    correct_counts: tuple[int, ...]  # per problem: how many of its n attempts were right
    format_rate: float  # well-formed share of all the cell's attempts

    def __post_init__(self) -> None:  # read back from JSON they are lists
        object.__setattr__(self, "ids", tuple(self.ids))
        object.__setattr__(self, "correct_counts", tuple(self.correct_counts))

    @property
    def n(self) -> int:
        return len(self.ids)

    def pass_at(self, k: int) -> tuple[float, ...]:
        """Unbiased pass@k of each problem; pass@1 is the fraction of its attempts that are right."""
        return tuple(unbiased_pass_at_k(self.samples, c, k) for c in self.correct_counts)


def overall_accuracy(scores: Sequence[DepthScore]) -> float:
    """Accuracy over all problems (each (task, depth) cell weighted by its count)."""
    total = sum(s.n for s in scores)
    return sum(s.accuracy * s.n for s in scores) / total if total else 0.0


def accuracy_by_depth(scores: Sequence[DepthScore]) -> dict[int, float]:
    """Accuracy per depth over all tasks, count-weighted."""
    depths = sorted({s.depth for s in scores})
    return {d: overall_accuracy([s for s in scores if s.depth == d]) for d in depths}


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021): the chance that k of n attempts drawn without replacement hold a right one,
    when c of the n are right: 1 - C(n-c, k) / C(n, k). At k = 1 it is c / n, the sampled accuracy."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


class DepthScores(Metric):
    """Accuracy and format rate by (task, depth) of the problems scored since the last reset: one
    (correct, format) pair per problem, concatenated over ranks on `compute` (unless built with
    `sync_on_compute=False`)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("task", "depth", "correct", "format"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, records: Sequence[Record], correct: Sequence[float], format_rate: Sequence[float]) -> None:
        self.task.append(torch.tensor([TASKS.index(r.task) for r in records], dtype=torch.long))
        self.depth.append(torch.tensor([r.depth for r in records], dtype=torch.long))
        self.correct.append(torch.tensor(correct, dtype=torch.float64))
        self.format.append(torch.tensor(format_rate, dtype=torch.float64))

    def _cells(self) -> tuple[dict[tuple[str, int], list[int]], list[float], list[float]]:
        """The rows of each (task, depth), in the order scored and ordered by task name and depth; and
        every row's correctness and format."""
        if not self.task:
            return {}, [], []
        task, depth, correct, fmt = (
            dim_zero_cat(x).tolist() for x in (self.task, self.depth, self.correct, self.format)
        )
        groups: dict[tuple[str, int], list[int]] = {}
        for i, key in enumerate(zip((TASKS[t] for t in task), depth, strict=True)):
            groups.setdefault(key, []).append(i)
        return dict(sorted(groups.items())), correct, fmt

    def compute(self) -> dict[tuple[str, int], tuple[int, float, float]]:
        """(task, depth) -> (problems, accuracy, format rate), ordered by task name and depth."""
        groups, correct, fmt = self._cells()
        # summed in order as Python floats, as the tables have always been
        return {
            key: (len(rows), sum(correct[i] for i in rows) / len(rows), sum(fmt[i] for i in rows) / len(rows))
            for key, rows in groups.items()
        }

    def scores(self, label: str, ids: Sequence[str] = ()) -> list[DepthScore]:
        """The scores by (task, depth) with each problem's outcome; `ids`: the scored records' ids in the
        order scored, given only where this rank scored every row (no sync), kept per cell."""
        groups, correct, _ = self._cells()
        if ids and len(ids) != len(correct):
            raise ValueError(f"{len(ids)} ids for {len(correct)} scored problems")
        rates = self.compute()
        return [
            DepthScore(
                label,
                task,
                depth,
                *rates[(task, depth)],
                ids=tuple(ids[i] for i in rows) if ids else (),
                correct=tuple(correct[i] for i in rows),
            )
            for (task, depth), rows in groups.items()
        ]


def completion_prefix(fmt: PromptFormat, mode: str) -> str:
    """Text appended to the prompt before generation: nothing, or an empty latent span and the answer cue."""
    if mode not in MODES:
        raise ValueError(f"evaluation mode must be one of {MODES}, got {mode!r}")
    return "" if mode == "cot" else f" {fmt.bol} {fmt.eol} {fmt.answer_cue}"


def score_by_depth(
    records: Sequence[Record],
    complete: Callable[[Sequence[Record]], list[str]],
    *,
    label: str,
    batch_size: int,
    reward: RewardConfig,
) -> list[DepthScore]:
    """Score `complete(chunk)` (one completion per record, answer line included) with the reward's
    strict checker, batch by batch, grouped by (task, depth)."""
    metric = DepthScores(sync_on_compute=False)  # evaluation runs on rank 0 alone while the others wait
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        verdicts = [reward.score(c, r.answer, r.task) for r, c in zip(chunk, complete(chunk), strict=True)]
        metric.update(chunk, [v.correct for v in verdicts], [v.format for v in verdicts])
    return metric.scores(label, [r.id for r in records])


def sampled_by_depth(
    records: Sequence[Record],
    sample: Callable[[Sequence[Record], int], list[list[str]]],
    samples: int,
    *,
    label: str,
    batch_size: int,
    reward: RewardConfig,
) -> list[SampledScore]:
    """`samples` attempts per problem, scored with the reward's strict checker, grouped by (task, depth)
    in test-set order: how many of each problem's attempts are right (sampled accuracy and unbiased
    pass@k follow from the counts). `sample(chunk, n)` returns n completions per record."""
    counts: dict[tuple[str, int], list[tuple[str, int]]] = {}  # (task, depth) -> [(id, right attempts)]
    formats: dict[tuple[str, int], list[float]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        for record, attempts in zip(chunk, sample(chunk, samples), strict=True):
            if len(attempts) != samples:
                raise ValueError(f"{len(attempts)} attempts at problem {record.id}, {samples} asked for")
            verdicts = [reward.score(c, record.answer, record.task) for c in attempts]
            key = (record.task, record.depth)
            counts.setdefault(key, []).append((record.id, sum(int(v.correct) for v in verdicts)))
            formats.setdefault(key, []).extend(float(v.format) for v in verdicts)
    return [
        SampledScore(
            label,
            task,
            depth,
            samples,
            tuple(i for i, _ in counts[(task, depth)]),
            tuple(c for _, c in counts[(task, depth)]),
            sum(formats[(task, depth)]) / len(formats[(task, depth)]),
        )
        for task, depth in sorted(counts)
    ]


@torch.no_grad()
def evaluate_by_depth(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    records: Sequence[Record],
    *,
    label: str,
    mode: str = "cot",
    max_new_tokens: int = 96,
    batch_size: int = 64,
    reward: RewardConfig,
) -> list[DepthScore]:
    """Greedy text completions of a model, scored by (task, depth)."""
    prefix = completion_prefix(fmt, mode)

    def complete(chunk: Sequence[Record]) -> list[str]:
        prompts = [fmt.prompt(r.question, tokenizer) + prefix for r in chunk]
        outputs = greedy_complete(model, tokenizer, prompts, max_new_tokens)
        return outputs if mode == "cot" else [f"{fmt.answer_cue} {text}" for text in outputs]

    return score_by_depth(records, complete, label=label, batch_size=batch_size, reward=reward)


def depth_table(scores: Sequence[DepthScore]) -> str:
    """Markdown table: one row per depth, one accuracy column per (model, task)."""
    columns = sorted({(s.model, s.task) for s in scores})
    depths = sorted({s.depth for s in scores})
    by_key = {(s.model, s.task, s.depth): s for s in scores}
    header = "| depth | " + " | ".join(f"{m} {t}" for m, t in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for depth in depths:
        cells = []
        for model, task in columns:
            s = by_key.get((model, task, depth))
            cells.append(f"{100 * s.accuracy:.0f}%" if s else "–")
        lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scores_as_dicts(scores: Sequence[DepthScore | SampledScore]) -> list[dict]:
    return [asdict(s) for s in scores]
