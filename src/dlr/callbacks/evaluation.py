"""Greedy accuracy and format rate by task and depth on a fixed test set."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from lightning import Callback
from transformers import PreTrainedTokenizerBase

from dlr.data.schema import Record
from dlr.models.backbones import PromptFormat
from dlr.models.generation import greedy_complete
from dlr.rewards import RewardConfig, score

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
    reward: RewardConfig = RewardConfig(),
) -> list[DepthScore]:
    """Greedy-decode every record and score it with the reward's strict checker, grouped by (task, depth)."""
    prefix = completion_prefix(fmt, mode)
    scored: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [fmt.prompt(r.question, tokenizer) + prefix for r in chunk]
        outputs = greedy_complete(model, tokenizer, prompts, max_new_tokens)
        for record, text in zip(chunk, outputs):
            completion = text if mode == "cot" else f"{fmt.answer_cue} {text}"
            s = score(completion, record.answer, record.task, **asdict(reward))
            scored[(record.task, record.depth)].append((s.correct, s.format))
    return [
        DepthScore(label, task, depth, len(v), sum(c for c, _ in v) / len(v), sum(f for _, f in v) / len(v))
        for (task, depth), v in sorted(scored.items())
    ]


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


class PeriodicDepthEval(Callback):
    """Greedy accuracy by depth of `pl_module.<attr>` on a slice of the test set every N training steps.

    A cheap progress signal for long supervised runs; the full evaluation runs at the end.
    """

    def __init__(self, every_n_steps: int, per_depth: int, model_attr: str = "main", mode: str = "cot",
                 max_new_tokens: int = 96) -> None:
        self.every_n_steps, self.per_depth = every_n_steps, per_depth
        self.model_attr, self.mode, self.max_new_tokens = model_attr, mode, max_new_tokens

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        seen: dict[tuple[str, int], int] = defaultdict(int)
        records = []
        for r in trainer.datamodule.test_records():
            if seen[(r.task, r.depth)] < self.per_depth:
                seen[(r.task, r.depth)] += 1
                records.append(r)
        scores = evaluate_by_depth(
            getattr(pl_module, self.model_attr), pl_module.tokenizer, pl_module.fmt, records,
            label=f"{self.model_attr}/{self.mode}", mode=self.mode, max_new_tokens=self.max_new_tokens,
            batch_size=len(records),
        )
        for s in scores:
            pl_module.log(f"eval/{s.task}_acc_d{s.depth}", s.accuracy, rank_zero_only=True)
        print(f"\nstep {step}: " + ", ".join(f"{s.task[0]}{s.depth}={100 * s.accuracy:.0f}%" for s in scores), flush=True)
