"""The claims table: what a comparison's numbers say about each claim of the DLR abstract.

Each row is `{claim, arm, verdict, evidence}`. Verdicts compare 95% bootstrap intervals over seeds:
`supported` or `not supported` when the intervals are apart in the claim's favour or against it,
`inconclusive` when they overlap, `not testable yet` when the run cannot speak to the claim (a task the
models still answer at chance, a baseline missing from the run).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from dlr.report.report import SeedResult, bootstrap_ci, overall_accuracy, percent

LONG_DEPTHS = (7, 8)  # never trained: the long-horizon axis
CHANCE_LEVEL_MARGIN = 0.10  # a true/false task within this of 50% counts as answered at chance


def interval_verdict(ours: tuple[float, float], theirs: tuple[float, float]) -> str:
    """supported: `ours` lies wholly above `theirs`; not supported: wholly below; else inconclusive."""
    if ours[0] > theirs[1]:
        return "supported"
    if ours[1] < theirs[0]:
        return "not supported"
    return "inconclusive"


def depth_accuracy(scores, depths: Sequence[int]) -> float:
    """Accuracy over the problems at `depths` (count-weighted; 0 when there are none)."""
    return overall_accuracy([s for s in scores if s.depth in depths])


def ci_text(values: Sequence[float]) -> str:
    lo, hi = bootstrap_ci(values)
    return f"{percent(statistics.fmean(values))} [{percent(lo)}, {percent(hi)}]"


def first_fraction_reaching(curve: Sequence[dict], target: float) -> float | None:
    """The first budget fraction at which the mean curve reaches `target`; None if it never does."""
    return next((p["budget_fraction"] for p in curve if p["accuracy_mean"] >= target), None)


def rl_moved(name: str, results: Sequence[SeedResult], trained: Sequence[int]) -> dict:
    """Did RL move the arm at the depths it trained on: final against start, over seeds."""
    start = [depth_accuracy(r.start_scores, trained) for r in results]
    final = [depth_accuracy(r.final_scores, trained) for r in results]
    return {
        "claim": f"RL improves the arm at its trained depths {trained[0]}-{trained[-1]}",
        "arm": name,
        "verdict": interval_verdict(bootstrap_ci(final), bootstrap_ci(start)),
        "evidence": f"start {ci_text(start)} -> final {ci_text(final)} (mean [95% CI] over seeds)",
    }


def efficiency_rows(
    name: str,
    summary: dict,
    results: dict[str, Sequence[SeedResult]],
    baseline: str,
    budget: dict,
    trained: Sequence[int],
) -> list[dict]:
    arm, base = summary["arms"][name], summary["arms"][baseline]
    ours, theirs = arm["final_accuracy"], base["final_accuracy"]
    unit = "TFLOPs" if budget["kind"] == "flops" else "s"
    scale = 1e12 if budget["kind"] == "flops" else 1.0
    verdict = interval_verdict(tuple(ours["ci95"]), tuple(theirs["ci95"]))
    # where the lead is: an answer-at-once readout keeps about the direct-answer rate where its chain fails
    ours_trained = [depth_accuracy(r.final_scores, trained) for r in results[name]]
    theirs_trained = [depth_accuracy(r.final_scores, trained) for r in results[baseline]]
    at_trained = interval_verdict(bootstrap_ci(ours_trained), bootstrap_ci(theirs_trained))
    where = f"; at trained depths {trained[0]}-{trained[-1]} {ci_text(ours_trained)} vs {ci_text(theirs_trained)}"
    if verdict == "supported" and at_trained != "supported":
        where += " (the lead is at untrained depths only)"
    rows = [
        {
            "claim": f"efficiency: higher accuracy than {baseline} at equal compute",
            "arm": name,
            "verdict": verdict,
            "evidence": f"{ci_text(ours['per_seed'])} vs {ci_text(theirs['per_seed'])} at "
            f"{budget['amount'] / scale:g} {unit} each{where}",
        }
    ]
    target = theirs["mean"]
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
            + ("" if base_reached is None else f"; {baseline} itself reaches it at {base_reached:.0%}"),
        }
    )
    ours_long = [depth_accuracy(r.final_scores, LONG_DEPTHS) for r in results[name]]
    theirs_long = [depth_accuracy(r.final_scores, LONG_DEPTHS) for r in results[baseline]]
    if any(s.depth in LONG_DEPTHS for r in results[name] for s in r.final_scores):
        rows.append(
            {
                "claim": f"longer chains: higher accuracy than {baseline} at untrained depths 7-8",
                "arm": name,
                "verdict": interval_verdict(bootstrap_ci(ours_long), bootstrap_ci(theirs_long)),
                "evidence": f"{ci_text(ours_long)} vs {ci_text(theirs_long)}",
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
            f"{st['grad_norm_cv']:.2f} vs {base_st['grad_norm_cv']:.2f}",
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
        verdict = "supported" if lost <= 0.05 else "not supported"
        return {"claim": claim, "arm": name, "verdict": verdict, "evidence": evidence + f" (lost {percent(lost)})"}
    before = [r.other_task_before for r in results if r.other_task_before is not None]
    after = [r.other_task_after for r in results if r.other_task_after is not None]
    if not before or not after:
        return {"claim": claim, "arm": name, "verdict": "not testable yet", "evidence": "no other task in this run"}
    evidence = f"{other_task}: {ci_text(before)} before (the frozen main's own chain) -> {ci_text(after)} after"
    if other_task == "synthetic_logic" and abs(statistics.fmean(before) - 0.5) <= CHANCE_LEVEL_MARGIN:
        return {"claim": claim, "arm": name, "verdict": "not testable yet", "evidence": evidence + " (logic at chance)"}
    drop = [b - a for b, a in zip(before, after, strict=True)]
    lo, hi = bootstrap_ci(drop)
    verdict = "not supported" if lo > 0.05 else ("supported" if hi <= 0.05 else "inconclusive")
    return {"claim": claim, "arm": name, "verdict": verdict, "evidence": evidence}


def claims_table(
    summary: dict, results: dict[str, Sequence[SeedResult]], trained_depths: Sequence[int], other_task: str | None
) -> list[dict]:
    """Every DLR arm's rows against the run's GRPO arm, then each arm's RL-moved row."""
    budget = summary["budget"]
    trained = list(range(trained_depths[0], trained_depths[-1] + 1))
    baseline = next((n for n, s in summary["arms"].items() if "readout" not in s), None)
    rows = []
    for name, arm in summary["arms"].items():
        if "readout" not in arm:
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
