"""Greedy accuracy and format rate by task and depth on a fixed test set, pass@k, and their tables.

The evaluations the runner, the methods, the callbacks and the report share; Lightning-free. Scores are
gathered in `DepthScores`, a torchmetrics Metric, so that a caller whose ranks each score a shard gets
them reduced over the ranks."""

from __future__ import annotations

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

    def compute(self) -> dict[tuple[str, int], tuple[int, float, float]]:
        """(task, depth) -> (problems, accuracy, format rate), ordered by task name and depth."""
        if not self.task:
            return {}
        task, depth, correct, fmt = (
            dim_zero_cat(x).tolist() for x in (self.task, self.depth, self.correct, self.format)
        )
        groups: dict[tuple[str, int], list[int]] = {}
        for i, key in enumerate(zip((TASKS[t] for t in task), depth, strict=True)):
            groups.setdefault(key, []).append(i)
        # summed in order as Python floats, as the tables have always been
        return {
            key: (len(rows), sum(correct[i] for i in rows) / len(rows), sum(fmt[i] for i in rows) / len(rows))
            for key, rows in sorted(groups.items())
        }

    def scores(self, label: str) -> list[DepthScore]:
        return [DepthScore(label, task, depth, *values) for (task, depth), values in self.compute().items()]


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
    return metric.scores(label)


def pass_at_k_by_depth(
    records: Sequence[Record],
    sample: Callable[[Sequence[Record], int], list[list[str]]],
    k: int,
    *,
    label: str,
    batch_size: int,
    reward: RewardConfig,
) -> list[DepthScore]:
    """pass@k by (task, depth): a problem passes when any of its k sampled completions is correct.
    `sample(chunk, k)` returns k completions per record; `format_rate` is that of all samples."""
    metric = DepthScores(sync_on_compute=False)  # evaluation runs on rank 0 alone while the others wait
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        passed, formats = [], []
        for record, attempts in zip(chunk, sample(chunk, k), strict=True):
            verdicts = [reward.score(c, record.answer, record.task) for c in attempts]
            passed.append(float(any(v.correct for v in verdicts)))
            formats.append(sum(v.format for v in verdicts) / len(verdicts))
        metric.update(chunk, passed, formats)
    return metric.scores(label)


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


def scores_as_dicts(scores: Sequence[DepthScore]) -> list[dict]:
    return [asdict(s) for s in scores]
