"""Greedy accuracy and format rate by task and depth on a fixed test set, pass@k, and their tables.

The evaluations the runner, the methods, the callbacks and the report share; Lightning-free."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedTokenizerBase

from dlr.data.schema import Record
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
    scored: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        for record, completion in zip(chunk, complete(chunk), strict=True):
            s = reward.score(completion, record.answer, record.task)
            scored[(record.task, record.depth)].append((s.correct, s.format))
    return [
        DepthScore(label, task, depth, len(v), sum(c for c, _ in v) / len(v), sum(f for _, f in v) / len(v))
        for (task, depth), v in sorted(scored.items())
    ]


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
    scored: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        for record, attempts in zip(chunk, sample(chunk, k), strict=True):
            verdicts = [reward.score(c, record.answer, record.task) for c in attempts]
            passed = float(any(v.correct for v in verdicts))
            scored[(record.task, record.depth)].append((passed, sum(v.format for v in verdicts) / len(verdicts)))
    return [
        DepthScore(label, task, depth, len(v), sum(c for c, _ in v) / len(v), sum(f for _, f in v) / len(v))
        for (task, depth), v in sorted(scored.items())
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


def scores_as_dicts(scores: Sequence[DepthScore]) -> list[dict]:
    return [asdict(s) for s in scores]
