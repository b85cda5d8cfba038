"""The comparison report (docs/design.md §10): `summary.json`, `report.md` and PNG plots from per-seed arm results."""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dlr.scoring import DepthScore


def overall_accuracy(scores: Sequence[DepthScore]) -> float:
    """Accuracy over all problems (each (task, depth) cell weighted by its count)."""
    total = sum(s.n for s in scores)
    return sum(s.accuracy * s.n for s in scores) / total if total else 0.0


def accuracy_by_depth(scores: Sequence[DepthScore]) -> dict[int, float]:
    """Accuracy per depth over all tasks, count-weighted."""
    depths = sorted({s.depth for s in scores})
    return {d: overall_accuracy([s for s in scores if s.depth == d]) for d in depths}


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (seeds). One value gives a zero-width interval."""
    if not values:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def count_collapses(curve: Sequence[float], drop: float = 0.10) -> int:
    """Episodes where accuracy falls more than `drop` below its running best (a fall that persists
    over several evaluations counts once)."""
    best, collapsed, count = float("-inf"), False, 0
    for value in curve:
        best = max(best, value)
        below = value < best - drop
        if below and not collapsed:
            count += 1
        collapsed = below
    return count


@dataclass
class SeedResult:
    """What one arm produced for one seed."""

    seed: int
    curve: list[dict]  # [{"budget_fraction", "seconds", "flops", "generated_tokens", "accuracy"}]
    final_scores: list[DepthScore]
    spent: dict  # {"seconds", "flops", "generated_tokens", "peak_memory_gb"}
    other_task_before: float | None  # None: no forgetting set configured
    other_task_after: float | None
    heldout_nll_before: float | None
    heldout_nll_after: float | None
    grad_norm_cv: float
    protected_unchanged: bool  # DLR: main weights; GRPO: base weights under the adapters
    # {"reward", "grad_norm", "diversity", "frac_reward_zero_std"}: [budget fraction, value] pairs per batch
    trace: dict = field(default_factory=dict)
    retention: dict = field(default_factory=dict)  # continual: {after phase: {task: accuracy}}
    pass_at_k: float | None = None  # final pass@k over the test set (None: not measured)
    start_scores: list[DepthScore] = field(default_factory=list)  # at budget 0, before any RL step
    arm_info: dict = field(default_factory=dict)  # DLR: readout, stage 1's cost and its scores (after_alignment)


def mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def overall_format_rate(scores: Sequence[DepthScore]) -> float:
    """Share of well-formed completions over all problems (each cell weighted by its count)."""
    total = sum(s.n for s in scores)
    return sum(s.format_rate * s.n for s in scores) / total if total else 0.0


# Why an arm given the answer cue reports no format rate (DLR's `answer` readout: Readout.free_answer_cue)
FREE_ANSWER_CUE = (
    "the main's input ends with `<eol> ####` and `####` is put back in front of the answer it writes, so every "
    "completion is well formed once the main writes any answer token: its format rate and format reward are not earned"
)


def mean_accuracy_by_depth(runs: Sequence[Sequence[DepthScore]]) -> dict[str, float]:
    """Accuracy by depth (all tasks pooled), averaged over runs: {"1": 0.95, ...}; {} without scores."""
    runs = [r for r in runs if r]
    depths = sorted({s.depth for r in runs for s in r})
    return {str(d): statistics.fmean(accuracy_by_depth(r).get(d, 0.0) for r in runs) for d in depths}


def arm_summary(results: Sequence[SeedResult], method: str) -> dict:
    """One arm's entry in `summary.json` from its seeds' results; `method`: dlr or grpo, what the arm is.
    An arm given the answer cue has its format rate null, with the reason beside it."""
    finals = [overall_accuracy(r.final_scores) for r in results]
    fractions = sorted({round(p["budget_fraction"], 6) for r in results for p in r.curve})
    curve = []
    for f in fractions:
        values = [p["accuracy"] for r in results for p in r.curve if round(p["budget_fraction"], 6) == f]
        curve.append(
            {"budget_fraction": f, "accuracy_mean": statistics.fmean(values), "ci95": list(bootstrap_ci(values))}
        )
    depths = sorted({s.depth for r in results for s in r.final_scores})
    by_depth = {
        str(d): statistics.fmean(accuracy_by_depth(r.final_scores).get(d, 0.0) for r in results) for d in depths
    }
    format_rate = statistics.fmean(overall_format_rate(r.final_scores) for r in results)
    format_by_depth = {
        str(d): statistics.fmean(overall_format_rate([s for s in r.final_scores if s.depth == d]) for r in results)
        for d in depths
    }
    dlr_info, free_answer_cue = {}, False
    if results[0].arm_info:  # a DLR arm
        aligned = [[DepthScore(**s) for s in r.arm_info["after_alignment"]] for r in results]
        free_answer_cue = results[0].arm_info["free_answer_cue"]
        dlr_info = {
            "readout": results[0].arm_info["readout"],
            "filter": results[0].arm_info.get("filter"),
            "alignment": results[0].arm_info["alignment"],
            "after_alignment": {"accuracy_by_depth": mean_accuracy_by_depth(aligned)},
        }
    zero_std = [v for r in results for _, v in r.trace.get("frac_reward_zero_std", [])]
    return {
        "method": method,
        **dlr_info,
        "train": {"frac_reward_zero_std": statistics.fmean(zero_std) if zero_std else None},  # over RL batches, seeds
        "start_accuracy_by_depth": mean_accuracy_by_depth([r.start_scores for r in results]),
        "seeds": [r.seed for r in results],
        "spent": {
            "seconds": [r.spent["seconds"] for r in results],
            "flops": [r.spent["flops"] for r in results],
            "generated_tokens": [int(r.spent["generated_tokens"]) for r in results],
            "peak_memory_gb": [r.spent["peak_memory_gb"] for r in results],
        },
        "final_accuracy": {"mean": statistics.fmean(finals), "ci95": list(bootstrap_ci(finals)), "per_seed": finals},
        "accuracy_by_depth": by_depth,
        "format_rate": None if free_answer_cue else format_rate,
        "format_rate_by_depth": None if free_answer_cue else format_by_depth,
        "format_rate_not_applicable": FREE_ANSWER_CUE if free_answer_cue else None,  # why format_rate is null
        "pass_at_k": {"mean": mean_or_none([r.pass_at_k for r in results]), "per_seed": [r.pass_at_k for r in results]},
        "curve": curve,
        "forgetting": {
            "other_task_accuracy_before": mean_or_none([r.other_task_before for r in results]),
            "other_task_accuracy_after": mean_or_none([r.other_task_after for r in results]),
            "heldout_nll_before": mean_or_none([r.heldout_nll_before for r in results]),
            "heldout_nll_after": mean_or_none([r.heldout_nll_after for r in results]),
        },
        "stability": {
            "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "collapses": sum(count_collapses([p["accuracy"] for p in r.curve]) for r in results),
            "grad_norm_cv": statistics.fmean(r.grad_norm_cv for r in results),
        },
        "main_weights_unchanged": all(r.protected_unchanged for r in results),
        "continual": {  # after each phase, mean accuracy on every task trained so far
            phase: {
                task: statistics.fmean(r.retention[phase][task] for r in results)
                for task in results[0].retention[phase]
            }
            for phase in results[0].retention
        },
    }


def plot(summary: dict, results: dict[str, Sequence[SeedResult]], out: Path) -> list[str]:
    """accuracy_vs_budget.png, accuracy_by_depth.png, reward_curves.png and diversity.png; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, s in summary["arms"].items():
        x = [p["budget_fraction"] for p in s["curve"]]
        ax.plot(x, [p["accuracy_mean"] for p in s["curve"]], marker="o", label=arm)
        ax.fill_between(x, [p["ci95"][0] for p in s["curve"]], [p["ci95"][1] for p in s["curve"]], alpha=0.2)
    ax.set(
        xlabel="fraction of the budget", ylabel="test accuracy", title="Accuracy vs budget (mean, 95% CI over seeds)"
    )
    ax.legend()
    save(fig, "accuracy_vs_budget.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    arms = list(summary["arms"])
    for i, arm in enumerate(arms):
        depths = sorted(summary["arms"][arm]["accuracy_by_depth"], key=int)
        ax.bar(
            [int(d) + (i - (len(arms) - 1) / 2) * 0.8 / len(arms) for d in depths],
            [summary["arms"][arm]["accuracy_by_depth"][d] for d in depths],
            width=0.8 / len(arms),
            label=arm,
        )
    ax.set(xlabel="depth (reasoning steps)", ylabel="final test accuracy", title="Accuracy by depth")
    ax.legend()
    save(fig, "accuracy_by_depth.png")

    for key, name, label in (
        ("reward", "reward_curves.png", "training reward"),
        ("diversity", "diversity.png", "mean pairwise cosine distance of the G latents"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, seeds in results.items():
            # the training reward of an arm given the answer cue holds a format reward it did not earn
            free = key == "reward" and summary["arms"][arm]["format_rate_not_applicable"]
            given = " (format reward given)" if free else ""
            for r in seeds:
                pairs = r.trace.get(key, [])
                if pairs:
                    ax.plot(
                        [f for f, _ in pairs], [v for _, v in pairs], alpha=0.7, label=f"{arm} seed {r.seed}{given}"
                    )
        ax.set(xlabel="fraction of the budget", ylabel=label)
        if ax.lines:
            ax.legend()
        save(fig, name)
    return names


def arm_description(arm: dict) -> str:
    """What an arm of `summary.json` is, for the report's tables: its method and, for DLR, its readout."""
    return "GRPO" if arm["method"] == "grpo" else f"DLR, `{arm['readout']}` readout"


def percent(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def number(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def claims_markdown(rows: Sequence[dict]) -> list[str]:
    """The claims table (report/claims.py makes its rows) that opens the report; nothing without rows."""
    if not rows:
        return []
    lines = ["## Claims", "", "| claim | arm | verdict | evidence |", "|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['arm']} | **{r['verdict']}** | {r['evidence']} |" for r in rows]
    return [*lines, "", "## Results", ""]


def write_report(summary: dict, results: dict[str, Sequence[SeedResult]], out: Path) -> list[str]:
    """Write summary.json, the plots and report.md into `out`; return a short summary (5 lines)."""
    out.mkdir(parents=True, exist_ok=True)
    ranked = sorted(summary["arms"], key=lambda arm: -summary["arms"][arm]["final_accuracy"]["mean"])
    summary = {**summary, "ranking": ranked}  # arms by mean final accuracy, best first
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    images = plot(summary, results, out)
    budget = summary["budget"]
    amount = f"{budget['amount'] / 1e12:g} TFLOPs" if budget["kind"] == "flops" else f"{budget['amount']:g} seconds"
    lines = [
        f"# {summary['experiment']}",
        "",
        f"Device: {summary['device']}. Budget per arm and seed: {amount} (training only; evaluation is not charged).",
        "",
        *claims_markdown(summary.get("claims", [])),
        f"| rank | arm | what it is | final accuracy (mean) | 95% CI over seeds | per seed | pass@{summary.get('pass_at_k') or 'k'} | format rate | seconds | TFLOPs | generated tokens | weights kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, arm in enumerate(ranked, 1):
        s = summary["arms"][arm]
        fa = s["final_accuracy"]
        lines.append(
            f"| {rank} | {arm} | {arm_description(s)} | {percent(fa['mean'])} | "
            f"{percent(fa['ci95'][0])}–{percent(fa['ci95'][1])} | "
            f"{', '.join(percent(v) for v in fa['per_seed'])} | {percent(s['pass_at_k']['mean'])} | "
            f"{'n/a (cue given)' if s['format_rate_not_applicable'] else percent(s['format_rate'])} | "
            f"{statistics.fmean(s['spent']['seconds']):.0f} | "
            f"{statistics.fmean(s['spent']['flops']) / 1e12:.2f} | {statistics.fmean(s['spent']['generated_tokens']):.0f} | "
            f"{'yes' if s['main_weights_unchanged'] else 'NO'} |"
        )
    for arm, s in summary["arms"].items():
        if "readout" in s:  # a DLR arm: where it started and what getting there cost
            a = s["alignment"]
            start = ", ".join(f"d{d} {percent(v)}" for d, v in s["after_alignment"]["accuracy_by_depth"].items())
            lines += [
                "",
                f"{arm}: readout `{s['readout']}`"
                + (
                    f" (format rate not applicable: {s['format_rate_not_applicable']})"
                    if s["format_rate_not_applicable"]
                    else ""
                )
                + f"; stage 1 {a['source']}, {a['steps']} steps, {a['flops'] / 1e12:.2f} TFLOPs, "
                f"{a['process_seconds']:.0f} s, {'counted in' if a['counted_in_budget'] else 'not counted in'} the budget "
                f"(`budget.include_alignment`); greedy accuracy after stage 1, before RL: {start}.",
            ]
            if s.get("filter") == "critic":
                lines.append(
                    f"{arm}'s policy gradient uses the K chains its critic kept, not K independent draws from the "
                    "policy, so the estimator leans toward the critic's choices; `method.rl.filter=random` is the "
                    "unbiased variant (experiment=dlr_ablations runs both)."
                )
    depths = sorted({d for s in summary["arms"].values() for d in s["accuracy_by_depth"]}, key=int)
    lines += [
        "",
        "## Accuracy by depth (final, mean over seeds)",
        "",
        "| depth | " + " | ".join(summary["arms"]) + " |",
        "|---|" + "---|" * len(summary["arms"]),
    ]
    for d in depths:
        lines.append(
            f"| {d} | "
            + " | ".join(percent(s["accuracy_by_depth"].get(d, 0.0)) for s in summary["arms"].values())
            + " |"
        )
    lines += [
        "",
        "## Forgetting and stability",
        "",
        "| arm | other task before | other task after | held-out NLL before | after | final-accuracy std | collapses | grad-norm CV |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary["arms"].items():
        f, st = s["forgetting"], s["stability"]
        lines.append(
            f"| {arm} | {percent(f['other_task_accuracy_before'])} | {percent(f['other_task_accuracy_after'])} | "
            f"{number(f['heldout_nll_before'])} | {number(f['heldout_nll_after'])} | {percent(st['final_accuracy_std'])} | "
            f"{st['collapses']} | {st['grad_norm_cv']:.2f} |"
        )
    phases = [phase for s in summary["arms"].values() for phase in s["continual"]]
    if phases:
        tasks = list(
            dict.fromkeys(task for s in summary["arms"].values() for p in s["continual"].values() for task in p)
        )
        lines += [
            "",
            "## Continual: accuracy on each task after each phase (retention)",
            "",
            "| arm | after phase | " + " | ".join(tasks) + " |",
            "|---|---|" + "---|" * len(tasks),
        ]
        for arm, s in summary["arms"].items():
            for phase, accuracies in s["continual"].items():
                lines.append(f"| {arm} | {phase} | " + " | ".join(percent(accuracies.get(t)) for t in tasks) + " |")
    lines += ["", *[f"![{name}]({name})" for name in images], ""]
    (out / "report.md").write_text("\n".join(lines))
    short = [f"{summary['experiment']} on {summary['device']}, {amount} per arm and seed:"]
    for arm in ranked:
        s = summary["arms"][arm]
        fa = s["final_accuracy"]
        short.append(
            f"  {arm}: {percent(fa['mean'])} [{percent(fa['ci95'][0])}, {percent(fa['ci95'][1])}] over seeds "
            f"{s['seeds']}, {statistics.fmean(s['spent']['flops']) / 1e12:.2f} TFLOPs"
        )
    kept = all(s["main_weights_unchanged"] for s in summary["arms"].values())
    collapses = sum(s["stability"]["collapses"] for s in summary["arms"].values())
    short.append(f"  protected weights unchanged in every run: {'yes' if kept else 'NO'}; collapses: {collapses}")
    return short
