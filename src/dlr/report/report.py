"""The comparison report (docs/design.md §10): `summary.json`, `report.md` and PNG plots from per-seed arm results."""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dlr.report.bootstrap import Interval, mean_interval
from dlr.scoring import DepthScore, SampledScore, accuracy_by_depth, overall_accuracy


def problem_values(
    cells: Sequence[DepthScore | SampledScore],
    values_of: Callable[[DepthScore | SampledScore], Sequence[float]],
    depths: Collection[int] | None = None,
) -> tuple[tuple[str, ...], list[float]]:
    """Every problem's id and value (`values_of(cell)`, one per problem) in the cells at `depths` (all
    when None), cells ordered by task and depth: one seed's row of an interval (report/bootstrap.py)."""
    ids, values = [], []
    for cell in sorted(cells, key=lambda c: (c.task, c.depth)):
        if depths is not None and cell.depth not in depths:
            continue
        cell_values = values_of(cell)
        if len(cell.ids) != cell.n or len(cell_values) != cell.n:
            raise ValueError(f"the {cell.task} depth-{cell.depth} scores of {cell.model} hold no per-problem outcomes")
        ids += cell.ids
        values += cell_values
    return tuple(ids), values


def seed_rows(
    runs: Sequence[Sequence[DepthScore | SampledScore]],
    values_of: Callable[[DepthScore | SampledScore], Sequence[float]],
    depths: Collection[int] | None = None,
) -> tuple[tuple[str, ...], list[list[float]]]:
    """The problems' ids and one row of values per run (seed), checked to be the same problems in the
    same order in every run: the rows an interval resamples."""
    rows = [problem_values(run, values_of, depths) for run in runs]
    ids = rows[0][0]
    if any(other != ids for other, _ in rows[1:]):
        raise ValueError("the seeds were scored on different test problems: their outcomes cannot be paired")
    return ids, [values for _, values in rows]


def greedy_outcomes(cell: DepthScore) -> Sequence[float]:
    """A greedy score's per-problem outcomes (1.0 right, 0.0 wrong)."""
    return cell.correct


def pass_at(k: int) -> Callable[[SampledScore], Sequence[float]]:
    """A sampled score's per-problem unbiased pass@k (k = 1: the sampled accuracy)."""
    return lambda cell: cell.pass_at(k)


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (seeds alone: the accuracy-vs-budget curve,
    whose points keep no per-problem outcomes). One value gives a zero-width interval."""
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
    # {"seconds", "flops", "generated_tokens", "peak_memory_gb", "questions", "main_decoded_sequences",
    #  "main_forward_positions"}: what training spent (callbacks/budget.py)
    spent: dict
    other_task_before: float | None  # None: no forgetting set configured
    other_task_after: float | None
    heldout_nll_before: float | None
    heldout_nll_after: float | None
    grad_norm_cv: float
    protected_unchanged: bool  # DLR: main weights; GRPO: base weights under the adapters
    # {"reward", "grad_norm", "diversity", "frac_reward_zero_std"}: [budget fraction, value] pairs per batch
    trace: dict = field(default_factory=dict)
    retention: dict = field(default_factory=dict)  # continual: {after phase: {task: accuracy}}
    # at the end, `method.samples_per_problem` sampled attempts per test problem (empty: not measured)
    sampled: list[SampledScore] = field(default_factory=list)
    start_scores: list[DepthScore] = field(default_factory=list)  # at budget 0, before any RL step
    arm_info: dict = field(default_factory=dict)  # DLR: readout, stage 1's cost and its scores (after_alignment)
    # the forgetting check's scores on the other task, problem by problem (empty: no other task)
    other_task_before_scores: list[DepthScore] = field(default_factory=list)
    other_task_after_scores: list[DepthScore] = field(default_factory=list)


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


def interval_fields(interval: Interval) -> dict:
    """An interval as `summary.json` gives it: mean, 95% interval and what it rests on."""
    return {"mean": interval.estimate, "ci95": [interval.lo, interval.hi], "interval_over": interval.basis()}


def sampled_summary(results: Sequence[SeedResult], pass_at_k: int) -> dict:
    """The sampled metrics of an arm's seeds: sampled accuracy (pass@1, the mean fraction of a problem's
    n attempts that are right, as DeepSeek-R1 reports it) and unbiased pass@k (Chen et al., 2021), each
    with its interval over seeds and problems and by depth; nulls when no seed sampled."""
    runs = [r.sampled for r in results]
    if not all(runs):
        return {"sampled_accuracy": None, "sampled_accuracy_by_depth": None, "pass_at_k": None}
    samples = runs[0][0].samples
    if not 1 <= pass_at_k <= samples:
        raise ValueError(f"pass@{pass_at_k} needs 1 <= k <= the {samples} samples per problem")
    depths = sorted({s.depth for run in runs for s in run})

    def metric(k: int) -> dict:
        _, rows = seed_rows(runs, pass_at(k))
        by_depth = {
            str(d): statistics.fmean(v for row in seed_rows(runs, pass_at(k), {d})[1] for v in row) for d in depths
        }
        return {
            **interval_fields(mean_interval(rows)),
            "per_seed": [statistics.fmean(r) for r in rows],
            "by_depth": by_depth,
        }

    accuracy, at_k = metric(1), metric(pass_at_k)
    return {
        "sampled_accuracy": {"samples_per_problem": samples, **{k: v for k, v in accuracy.items() if k != "by_depth"}},
        "sampled_accuracy_by_depth": accuracy["by_depth"],
        "pass_at_k": {"k": pass_at_k, "samples_per_problem": samples, **at_k},
    }


def main_model_work(results: Sequence[SeedResult]) -> dict:
    """What reached the main model in training, per seed and per training question (docs/design.md §5):
    sequences it decoded and token positions it read in forward passes, beside the FLOPs of everything."""
    spent = [r.spent for r in results]

    def per_question(key: str) -> float | None:
        if any(s["questions"] == 0 for s in spent):
            return None
        return statistics.fmean(s[key] / s["questions"] for s in spent)

    return {
        "questions": [int(s["questions"]) for s in spent],
        "decoded_sequences": [int(s["main_decoded_sequences"]) for s in spent],
        "forward_positions": [int(s["main_forward_positions"]) for s in spent],
        "per_question": {
            "decoded_sequences": per_question("main_decoded_sequences"),
            "forward_positions": per_question("main_forward_positions"),
            "flops": per_question("flops"),
        },
    }


def relative_to_grpo(arms: dict[str, dict]) -> dict[str, dict | None]:
    """Each arm's main-model work per training question over the run's first GRPO arm's (decodes: the
    paper's '#Forward' of Table 3, relative to token-level GRPO); None without a GRPO arm."""
    baseline = next((name for name, arm in arms.items() if arm["method"] == "grpo"), None)
    if baseline is None:
        return dict.fromkeys(arms)
    theirs = arms[baseline]["main_model"]["per_question"]
    ratios = {}
    for name, arm in arms.items():
        ours = arm["main_model"]["per_question"]
        ratios[name] = {
            "baseline": baseline,
            **{key: None if ours[key] is None or not theirs[key] else ours[key] / theirs[key] for key in ours},
        }
    return ratios


def arm_summary(results: Sequence[SeedResult], method: str, pass_at_k: int) -> dict:
    """One arm's entry in `summary.json` from its seeds' results; `method`: dlr or grpo, what the arm is;
    `pass_at_k`: the k of the pass@k it reports from its sampled attempts. Intervals of accuracies are
    over seeds and test problems (report/bootstrap.py). An arm given the answer cue has its format rate
    null, with the reason beside it."""
    finals = [overall_accuracy(r.final_scores) for r in results]
    _, final_rows = seed_rows([r.final_scores for r in results], greedy_outcomes)
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
        "final_accuracy": {**interval_fields(mean_interval(final_rows)), "per_seed": finals},
        "accuracy_by_depth": by_depth,
        **sampled_summary(results, pass_at_k),
        "main_model": main_model_work(results),
        "format_rate": None if free_answer_cue else format_rate,
        "format_rate_by_depth": None if free_answer_cue else format_by_depth,
        "format_rate_not_applicable": FREE_ANSWER_CUE if free_answer_cue else None,  # why format_rate is null
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


def smoothed(values: Sequence[float], weight: float = 0.6) -> list[float]:
    """Exponential moving average, debiased at the start (TensorBoard's smoothing): each point keeps `weight` of
    the running average."""
    average, out = 0.0, []
    for i, v in enumerate(values, 1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight**i))
    return out


def plot(summary: dict, results: dict[str, Sequence[SeedResult]], out: Path) -> list[str]:
    """accuracy_vs_budget.png, accuracy_by_depth.png, reward_curves.png and diversity.png; returns their names.
    Accuracies in %, y-axes from 0, compute in the budget's unit, every legend outside the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    names = []
    budget = summary["budget"]
    scale, unit = (1e12, "TFLOPs") if budget["kind"] == "flops" else (1.0, "seconds")
    colors = {arm: f"C{i}" for i, arm in enumerate(summary["arms"])}

    def save(fig, ax, name: str, title: str) -> None:
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)

    def percent_axis(ax, label: str) -> None:
        ax.set_ylim(0, 1)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel(label)

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for arm, s in summary["arms"].items():
        x = [p["budget_fraction"] * budget["amount"] / scale for p in s["curve"]]
        ax.plot(x, [p["accuracy_mean"] for p in s["curve"]], marker="o", color=colors[arm], label=arm)
        per_seed = [[p["accuracy"] for p in r.curve] for r in results[arm]]
        if len(per_seed) > 1 and len({len(c) for c in per_seed}) == 1:  # the band: lowest to highest seed
            points = list(zip(*per_seed, strict=True))  # [fraction][seed]
            ax.fill_between(x, [min(p) for p in points], [max(p) for p in points], color=colors[arm], alpha=0.2)
    ax.set_xlabel(f"training compute spent ({unit} per arm and seed)")
    percent_axis(ax, "greedy test accuracy (all depths)")
    save(fig, ax, "accuracy_vs_budget.png", "Accuracy vs compute: mean over seeds, band from lowest to highest seed")

    fig, ax = plt.subplots(figsize=(7.5, 4))
    arms = list(summary["arms"])
    trained = summary.get("trained_depths")
    if trained:  # the depths the arms trained on, shaded
        ax.axvspan(
            trained[0] - 0.5,
            trained[-1] + 0.5,
            color="0.92",
            zorder=0,
            label=f"trained depths {trained[0]}-{trained[-1]}",
        )
    for i, arm in enumerate(arms):
        depths = sorted(summary["arms"][arm]["accuracy_by_depth"], key=int)
        per_seed = [accuracy_by_depth(r.final_scores) for r in results[arm]]
        means = [summary["arms"][arm]["accuracy_by_depth"][d] for d in depths]
        low = [m - min(a.get(int(d), 0.0) for a in per_seed) for m, d in zip(means, depths, strict=True)]
        high = [max(a.get(int(d), 0.0) for a in per_seed) - m for m, d in zip(means, depths, strict=True)]
        ax.bar(
            [int(d) + (i - (len(arms) - 1) / 2) * 0.8 / len(arms) for d in depths],
            means,
            width=0.8 / len(arms),
            yerr=[low, high] if len(per_seed) > 1 else None,
            capsize=2,
            color=colors[arm],
            label=arm,
        )
    ax.set_xlabel("depth (reasoning steps)")
    percent_axis(ax, "final greedy test accuracy")
    save(fig, ax, "accuracy_by_depth.png", "Accuracy by depth: mean over seeds, whiskers lowest to highest seed")

    for key, name, label, title in (
        (
            "reward",
            "reward_curves.png",
            "training reward (correct + format weight)",
            "Training reward per batch (raw faint, smoothed bold)",
        ),
        (
            "diversity",
            "diversity.png",
            "mean pairwise cosine distance of the G latents",
            "Latent diversity (raw faint, smoothed bold)",
        ),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for arm, seeds in results.items():
            # the training reward of an arm given the answer cue holds a format reward it did not earn
            free = key == "reward" and summary["arms"][arm]["format_rate_not_applicable"]
            given = " (format reward given)" if free else ""
            for i, r in enumerate(seeds):
                style = ("-", "--", ":", "-.")[i % 4]  # seeds of one arm: its colour, their own line style
                pairs = r.trace.get(key, [])
                if pairs:
                    x = [f * budget["amount"] / scale for f, _ in pairs]
                    ax.plot(x, [v for _, v in pairs], color=colors[arm], linestyle=style, alpha=0.2, linewidth=0.8)
                    smooth = smoothed([v for _, v in pairs])
                    ax.plot(
                        x, smooth, color=colors[arm], linestyle=style, linewidth=2, label=f"{arm} seed {r.seed}{given}"
                    )
        ax.set_xlabel(f"training compute spent ({unit} per arm and seed)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        save(fig, ax, name, title)
    return names


def arm_description(arm: dict) -> str:
    """What an arm of `summary.json` is, for the report's tables: its method and, for DLR, its readout."""
    return "GRPO" if arm["method"] == "grpo" else f"DLR, `{arm['readout']}` readout"


def percent(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def number(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def main_model_markdown(arms: dict[str, dict]) -> list[str]:
    """The main model's work per training question, each arm against GRPO's (the paper's '#Forward' and more)."""

    def cell(arm: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
        value, ratio = arm["main_model"]["per_question"][key], (arm["main_model"]["relative_to_grpo"] or {}).get(key)
        text = "–" if value is None else f"{value / scale:.{digits}f}"
        return text + ("" if ratio is None else f" ({100 * ratio:.0f}%)")

    lines = [
        "",
        "## Main-model work per training question (relative to GRPO's)",
        "",
        "| arm | training questions (per seed) | main-model decodes | main-model forward positions | GFLOPs (all models) |",
        "|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        questions = ", ".join(str(q) for q in arm["main_model"]["questions"])
        lines.append(
            f"| {name} | {questions} | {cell(arm, 'decoded_sequences')} | {cell(arm, 'forward_positions', digits=0)} | "
            f"{cell(arm, 'flops', 1e9, 2)} |"
        )
    return [
        *lines,
        "",
        "Per question trained in RL (batches the budget counts), mean over seeds; in brackets, as a share of the GRPO "
        "arm's. Main-model decodes: sequences the main model generates (GRPO's sampled completions; DLR's kept "
        "chains, each decoded once), the rollouts that reach it; the paper's '#Forward' (Table 3, DLR 18%) counts "
        "these (its §11: G main-model passes per question for GRPO, K for DLR). Main-model forward positions: token "
        "positions the main model reads in forward passes, which weigh each decode by its length and add GRPO's "
        "log-prob and training passes; a cached generation of N tokens after a P-position prompt reads P + N - 1, a "
        "teacher-forced pass (GRPO's log-prob and training passes, DLR's stage-1 NLL) its whole sequence; backward "
        "passes are not counted (FLOPs count them). GFLOPs: everything the arm runs, as the budget charges it "
        "(docs/design.md §5).",
    ]


def claims_markdown(rows: Sequence[dict]) -> list[str]:
    """The claims table (report/claims.py makes its rows) that opens the report; nothing without rows."""
    if not rows:
        return []
    lines = ["## Claims", "", "| claim | arm | verdict | evidence |", "|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['arm']} | **{r['verdict']}** | {r['evidence']} |" for r in rows]
    note = (
        "Verdicts come from the 95% interval of a paired difference, a percentile bootstrap over seeds and test "
        "problems (the same problems drawn for both sides; an arm's start and final paired by seed): supported "
        "above 0, not supported below, inconclusive across it. With few problems that differ it is optimistic: "
        "4 of 40 right against none, on seeds that agree, reaches down to 1 problem (2.5%) and is called supported, "
        "where an exact sign test on those 4 problems would not call it (p = 1/16)."
    )
    return [*lines, "", note, "", "## Results", ""]


def write_report(summary: dict, results: dict[str, Sequence[SeedResult]], out: Path) -> list[str]:
    """Write summary.json, the plots and report.md into `out`; return a short summary (5 lines)."""
    out.mkdir(parents=True, exist_ok=True)
    ratios = relative_to_grpo(summary["arms"])
    arms = {
        name: {**arm, "main_model": {**arm["main_model"], "relative_to_grpo": ratios[name]}}
        for name, arm in summary["arms"].items()
    }
    ranked = sorted(arms, key=lambda arm: -arms[arm]["final_accuracy"]["mean"])
    summary = {**summary, "arms": arms, "ranking": ranked}  # ranking: arms by mean final accuracy, best first
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    images = plot(summary, results, out)
    budget = summary["budget"]
    amount = f"{budget['amount'] / 1e12:g} TFLOPs" if budget["kind"] == "flops" else f"{budget['amount']:g} seconds"
    sampled = next((a["pass_at_k"] for a in arms.values() if a["pass_at_k"]), None)  # n and k, when sampled
    sampled_header = (
        f"sampled accuracy (n={sampled['samples_per_problem']}) | pass@{sampled['k']} | " if sampled else ""
    )
    lines = [
        f"# {summary['experiment']}",
        "",
        f"Device: {summary['device']}. Budget per arm and seed: {amount} (training only; evaluation is not charged).",
        "",
        *claims_markdown(summary.get("claims", [])),
        f"| rank | arm | what it is | greedy accuracy (mean) | 95% CI (seeds x problems) | per seed | {sampled_header}"
        "format rate | seconds | TFLOPs | generated tokens | weights kept |",
        "|---|---|---|---|---|---|" + "---|" * (2 if sampled else 0) + "---|---|---|---|---|",
    ]
    for rank, arm in enumerate(ranked, 1):
        s = arms[arm]
        fa = s["final_accuracy"]
        sampled_cells = (
            f"{percent((s['sampled_accuracy'] or {}).get('mean'))} | {percent((s['pass_at_k'] or {}).get('mean'))} | "
            if sampled
            else ""
        )
        lines.append(
            f"| {rank} | {arm} | {arm_description(s)} | {percent(fa['mean'])} | "
            f"{percent(fa['ci95'][0])}–{percent(fa['ci95'][1])} | "
            f"{', '.join(percent(v) for v in fa['per_seed'])} | {sampled_cells}"
            f"{'n/a (cue given)' if s['format_rate_not_applicable'] else percent(s['format_rate'])} | "
            f"{statistics.fmean(s['spent']['seconds']):.0f} | "
            f"{statistics.fmean(s['spent']['flops']) / 1e12:.2f} | {statistics.fmean(s['spent']['generated_tokens']):.0f} | "
            f"{'yes' if s['main_weights_unchanged'] else 'NO'} |"
        )
    for arm, s in arms.items():
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
    if sampled:
        lines += [
            "",
            f"Greedy accuracy: one greedy answer per test problem. Sampled accuracy: the mean share of "
            f"{sampled['samples_per_problem']} attempts per problem that are right, each arm sampling as it trains "
            f"(GRPO: completions at its temperature; DLR: latent chains at its sigma, each decoded once by the main); "
            f"pass@{sampled['k']}: the unbiased estimator 1 - C(n-c, k)/C(n, k) of Chen et al. (2021) from the same "
            "attempts, averaged over problems. Intervals: 95% percentile bootstrap over seeds and test problems.",
        ]
    lines += main_model_markdown(arms)
    depths = sorted({d for s in arms.values() for d in s["accuracy_by_depth"]}, key=int)
    columns = [(name, "accuracy_by_depth", name) for name in arms]
    if sampled:  # each arm's sampled accuracy beside its greedy one
        columns = [
            column
            for name, arm in arms.items()
            for column in (
                (name, "accuracy_by_depth", f"{name} greedy"),
                (name, "sampled_accuracy_by_depth", f"{name} sampled"),
            )
        ]
    lines += [
        "",
        "## Accuracy by depth (final, mean over seeds)",
        "",
        "| depth | " + " | ".join(label for _, _, label in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for d in depths:
        lines.append(
            f"| {d} | " + " | ".join(percent((arms[name][key] or {}).get(d)) for name, key, _ in columns) + " |"
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
        s = arms[arm]
        fa = s["final_accuracy"]
        short.append(
            f"  {arm}: {percent(fa['mean'])} [{percent(fa['ci95'][0])}, {percent(fa['ci95'][1])}] over "
            f"{fa['interval_over']} (seeds {s['seeds']}), {statistics.fmean(s['spent']['flops']) / 1e12:.2f} TFLOPs"
        )
    kept = all(s["main_weights_unchanged"] for s in summary["arms"].values())
    collapses = sum(s["stability"]["collapses"] for s in summary["arms"].values())
    short.append(f"  protected weights unchanged in every run: {'yes' if kept else 'NO'}; collapses: {collapses}")
    return short
