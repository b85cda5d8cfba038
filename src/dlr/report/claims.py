"""The claims table: what a comparison's numbers say about each claim of the DLR abstract.

Each row is `{claim, arm, verdict, evidence}`. A verdict comes from the 95% interval of a paired
difference (ours - theirs: DLR against GRPO on the same test problems, or an arm's final against its own
start, seed by seed), bootstrapped over seeds and test problems (report/bootstrap.py): `supported`
when the interval lies above 0, `not supported` when below, `inconclusive` when it holds 0; `not
testable yet` when the run cannot speak to the claim (a task the models still answer at chance, a
baseline missing from the run). Every row's evidence says how many seeds and problems it rests on.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from dlr.report.bootstrap import Interval, difference_verdict, paired_difference
from dlr.report.report import SeedResult, greedy_outcomes, percent, seed_rows
from dlr.scoring import DepthScore

LONG_DEPTHS = (7, 8)  # never trained: the long-horizon axis
CHANCE_LEVEL_MARGIN = 0.10  # a true/false task within this of 50% counts as answered at chance
FORGETTING_MARGIN = 0.05  # accuracy the other task may lose and still count as not forgotten


@dataclass(frozen=True)
class Comparison:
    """Two sides' greedy accuracy on the same problems and the interval of their difference."""

    ours: float
    theirs: float
    difference: Interval  # of ours - theirs

    def text(self) -> str:
        """e.g. "45.0% vs 53.1%, difference -8.1 points [-12.5, -3.8] (2 vs 2 seeds x 160 problems)"."""
        d = self.difference
        return (
            f"{percent(self.ours)} vs {percent(self.theirs)}, difference {100 * d.estimate:+.1f} points "
            f"[{100 * d.lo:+.1f}, {100 * d.hi:+.1f}] ({d.basis()})"
        )


def compare(
    ours: Sequence[Sequence[DepthScore]],
    theirs: Sequence[Sequence[DepthScore]],
    depths: Collection[int] | None,
    same_seeds: bool,
) -> Comparison:
    """The greedy accuracies of two sides at `depths` (all when None), one list of scores per seed, and
    the interval of their paired difference. `same_seeds`: seed s of both sides is the same run."""
    our_ids, our_rows = seed_rows(ours, greedy_outcomes, depths)
    their_ids, their_rows = seed_rows(theirs, greedy_outcomes, depths)
    if our_ids != their_ids:
        raise ValueError("the two sides of a claim were scored on different test problems: they cannot be paired")
    return Comparison(
        statistics.fmean(v for row in our_rows for v in row),
        statistics.fmean(v for row in their_rows for v in row),
        paired_difference(our_rows, their_rows, same_seeds),
    )


def has_depths(results: Sequence[SeedResult], depths: Collection[int]) -> bool:
    return any(s.depth in depths for r in results for s in r.final_scores)


def first_fraction_reaching(curve: Sequence[dict], target: float) -> float | None:
    """The first budget fraction at which the mean curve reaches `target`; None if it never does."""
    return next((p["budget_fraction"] for p in curve if p["accuracy_mean"] >= target), None)


def rl_moved(name: str, results: Sequence[SeedResult], trained: Sequence[int] | None) -> dict:
    """Did RL move the arm at the depths it trained on (a hub dataset: on its whole test set): each seed's
    final against its own start, on the same problems."""
    claim = "RL improves the arm " + (
        f"at its trained depths {trained[0]}-{trained[-1]}" if trained else "on the test set"
    )
    finals, starts = [r.final_scores for r in results], [r.start_scores for r in results]
    if seed_rows(finals, greedy_outcomes, trained)[0] != seed_rows(starts, greedy_outcomes, trained)[0]:
        return {  # a continual run starts on its first phase's test set and ends on its last's
            "claim": claim,
            "arm": name,
            "verdict": "not testable yet",
            "evidence": "start and final were scored on different test sets (phases): retention speaks instead",
        }
    moved = compare(finals, starts, trained, same_seeds=True)
    return {
        "claim": claim,
        "arm": name,
        "verdict": difference_verdict(moved.difference),
        "evidence": f"final vs start {moved.text()}, paired by seed and problem",
    }


def higher_accuracy_row(
    name: str, results: dict[str, Sequence[SeedResult]], baseline: str, budget: dict, trained: Sequence[int] | None
) -> dict:
    """Final greedy accuracy against the baseline's on the same problems, overall and at the trained depths."""
    unit, scale = ("TFLOPs", 1e12) if budget["kind"] == "flops" else ("s", 1.0)
    ours_final, theirs_final = [r.final_scores for r in results[name]], [r.final_scores for r in results[baseline]]
    overall = compare(ours_final, theirs_final, None, same_seeds=False)
    verdict = difference_verdict(overall.difference)
    # where the lead is: an answer-at-once readout keeps about the direct-answer rate where its chain fails
    where = ""
    if trained:
        at_trained = compare(ours_final, theirs_final, trained, same_seeds=False)
        where = f"; at trained depths {trained[0]}-{trained[-1]} {at_trained.text()}"
        if verdict == "supported" and difference_verdict(at_trained.difference) != "supported":
            where += " (the lead is at untrained depths only)"
    return {
        "claim": f"efficiency: higher accuracy than {baseline} at equal compute",
        "arm": name,
        "verdict": verdict,
        "evidence": f"{overall.text()} at {budget['amount'] / scale:g} {unit} each{where}",
    }


def efficiency_rows(
    name: str,
    summary: dict,
    results: dict[str, Sequence[SeedResult]],
    baseline: str,
    budget: dict,
    trained: Sequence[int] | None,
) -> list[dict]:
    arm, base = summary["arms"][name], summary["arms"][baseline]
    unit = "TFLOPs" if budget["kind"] == "flops" else "s"
    scale = 1e12 if budget["kind"] == "flops" else 1.0
    ours_final, theirs_final = [r.final_scores for r in results[name]], [r.final_scores for r in results[baseline]]
    overall = compare(ours_final, theirs_final, None, same_seeds=False)
    rows = [higher_accuracy_row(name, results, baseline, budget, trained)]
    target = base["final_accuracy"]["mean"]
    reached = first_fraction_reaching(arm["curve"], target)
    base_reached = first_fraction_reaching(base["curve"], target)
    started_above = arm["curve"] and arm["curve"][0]["accuracy_mean"] >= target
    if reached is None:
        verdict, what = "not supported", f"never reaches it within {budget['amount'] / scale:g} {unit}"
    elif started_above:
        verdict, what = "inconclusive", "is there before any RL step (the lead is the starting point's, not RL's)"
    else:
        verdict = "supported" if base_reached is None or reached < base_reached else "not supported"
        what = f"reaches it at {reached * budget['amount'] / scale:.3g} {unit} ({reached:.0%} of the budget)"
    rows.append(
        {
            "claim": f"efficiency: less compute to reach {baseline}'s final accuracy",
            "arm": name,
            "verdict": verdict,
            "evidence": f"{baseline}'s final mean {percent(target)}; {name} {what}"
            + ("" if base_reached is None else f"; {baseline} itself reaches it at {base_reached:.0%}")
            + f" (mean curves of {overall.difference.basis()})",
        }
    )
    if trained and has_depths(results[name], LONG_DEPTHS):
        long = compare(ours_final, theirs_final, LONG_DEPTHS, same_seeds=False)
        rows.append(
            {
                "claim": f"longer chains: higher accuracy than {baseline} at untrained depths 7-8",
                "arm": name,
                "verdict": difference_verdict(long.difference),
                "evidence": long.text(),
            }
        )
    st, base_st = arm["stability"], base["stability"]
    steadier = st["collapses"] <= base_st["collapses"] and st["final_accuracy_std"] <= base_st["final_accuracy_std"]
    rows.append(
        {
            "claim": f"stable convergence: no more collapses or seed spread than {baseline}",
            "arm": name,
            "verdict": ("supported" if steadier else "not supported") if len(results[name]) > 1 else "inconclusive",
            "evidence": f"collapses {st['collapses']} vs {base_st['collapses']}; final-accuracy std over seeds "
            f"{percent(st['final_accuracy_std'])} vs {percent(base_st['final_accuracy_std'])}; grad-norm CV "
            f"{st['grad_norm_cv']:.2f} vs {base_st['grad_norm_cv']:.2f} ({len(results[name])} vs "
            f"{len(results[baseline])} seeds)",
        }
    )
    return rows


def forgetting_row(name: str, summary: dict, results: Sequence[SeedResult], other_task: str | None) -> dict:
    """No forgetting: the other task's accuracy after training against the common start (the frozen
    main writing its own chain); or, in a continual run, retention of the first task."""
    claim = "accumulation across tasks without forgetting"
    arm = summary["arms"][name]
    if arm["continual"]:
        phases = list(arm["continual"])
        first_task = next(iter(arm["continual"][phases[0]]))
        kept = [arm["continual"][p].get(first_task) for p in phases]
        logic = [arm["continual"][p].get("synthetic_logic") for p in phases if "synthetic_logic" in arm["continual"][p]]
        evidence = f"{first_task} after each phase: " + ", ".join(percent(v) for v in kept)
        if logic and abs(logic[-1] - 0.5) <= CHANCE_LEVEL_MARGIN:
            return {
                "claim": claim,
                "arm": name,
                "verdict": "not testable yet",
                "evidence": evidence + "; logic at chance",
            }
        lost = kept[0] - kept[-1]
        verdict = "supported" if lost <= FORGETTING_MARGIN else "not supported"
        evidence += (
            f" (lost {percent(lost)}; mean of {len(results)} seeds, no interval: retention keeps accuracies only)"
        )
        return {"claim": claim, "arm": name, "verdict": verdict, "evidence": evidence}
    if not results[0].other_task_before_scores or not all(r.other_task_after_scores for r in results):
        return {"claim": claim, "arm": name, "verdict": "not testable yet", "evidence": "no other task in this run"}
    # the before is the common start (the same for every seed): one run, against each seed's after
    drop = compare(
        [results[0].other_task_before_scores], [r.other_task_after_scores for r in results], None, same_seeds=False
    )
    evidence = (
        f"{other_task}, before (the frozen main's own chain) vs after: {drop.text()}; "
        f"a loss of up to {percent(FORGETTING_MARGIN)} counts as none"
    )
    if other_task == "synthetic_logic" and abs(drop.ours - 0.5) <= CHANCE_LEVEL_MARGIN:
        return {"claim": claim, "arm": name, "verdict": "not testable yet", "evidence": evidence + " (logic at chance)"}
    if drop.difference.lo > FORGETTING_MARGIN:
        verdict = "not supported"
    elif drop.difference.hi <= FORGETTING_MARGIN:
        verdict = "supported"
    else:
        verdict = "inconclusive"
    return {"claim": claim, "arm": name, "verdict": verdict, "evidence": evidence}


def claims_table(
    summary: dict,
    results: dict[str, Sequence[SeedResult]],
    trained_depths: Sequence[int] | None,
    other_task: str | None,
) -> list[dict]:
    """Every DLR arm's rows against the run's (first) GRPO arm, every other GRPO arm's accuracy against it, then
    each arm's RL-moved row. `trained_depths`: the
    procedural training range; None for a hub dataset, whose depth (its solution's step count) no arm's
    training selects, so no row speaks of trained or untrained depths."""
    budget = summary["budget"]
    trained = list(range(trained_depths[0], trained_depths[-1] + 1)) if trained_depths else None
    baseline = next((n for n, s in summary["arms"].items() if "readout" not in s), None)
    rows = []
    for name, arm in summary["arms"].items():
        if "readout" not in arm:
            if baseline is not None and name != baseline:  # a GRPO variant (experiment=controls) against GRPO
                rows.append(higher_accuracy_row(name, results, baseline, budget, trained))
            continue
        if baseline is None:
            rows.append(
                {
                    "claim": "efficiency and longer chains",
                    "arm": name,
                    "verdict": "not testable yet",
                    "evidence": "no GRPO arm in this run",
                }
            )
        else:
            rows += efficiency_rows(name, summary, results, baseline, budget, trained)
        rows.append(forgetting_row(name, summary, results[name], other_task))
    rows += [rl_moved(name, results[name], trained) for name in summary["arms"]]
    return rows
