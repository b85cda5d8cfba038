"""The claims table: verdicts from hand-made seed results."""

from __future__ import annotations

import json

import pytest

from dlr.report.bootstrap import Interval, difference_verdict
from dlr.report.claims import claims_table, first_fraction_reaching
from dlr.report.report import SeedResult, arm_summary, write_report
from dlr.scoring import DepthScore

PROBLEMS = 50  # per (task, depth) cell


def cell(depth: int, accuracy: float, task: str = "math") -> DepthScore:
    """A cell of PROBLEMS problems whose first round(accuracy * PROBLEMS) are right."""
    right = round(accuracy * PROBLEMS)
    outcomes = [1.0] * right + [0.0] * (PROBLEMS - right)
    ids = [f"{task}-{depth}-{i}" for i in range(PROBLEMS)]
    return DepthScore("m", task, depth, PROBLEMS, right / PROBLEMS, 1.0, ids=ids, correct=outcomes)


DLR_INFO = {
    "readout": "rationale",
    "free_answer_cue": False,
    "filter": "critic",
    "alignment": {"source": "shipped", "steps": 400, "flops": 2e13, "process_seconds": 900, "counted_in_budget": False},
    "after_alignment": [],
}


def seed_result(seed: int, start: float, final: float, long: float, curve: list[float], other=(0.9, 0.9)) -> SeedResult:
    """Depths 1-2 trained (accuracy `start` -> `final`), depths 7-8 at `long`, the other task (logic,
    depth 1) `other` before and after; 50 problems a cell."""
    cells = lambda trained, deep: [cell(d, trained if d <= 2 else deep) for d in (1, 2, 7, 8)]  # noqa: E731
    spent = {"seconds": 1.0, "flops": 1e12, "generated_tokens": 5, "peak_memory_gb": 1.0, "questions": 10}
    return SeedResult(
        seed=seed,
        curve=[{"budget_fraction": i / (len(curve) - 1), "accuracy": a} for i, a in enumerate(curve)],
        final_scores=cells(final, long),
        spent={**spent, "main_decoded_sequences": 40, "main_forward_positions": 4000},
        other_task_before=other[0],
        other_task_after=other[1],
        heldout_nll_before=1.0,
        heldout_nll_after=1.0,
        grad_norm_cv=0.1,
        protected_unchanged=True,
        trace={"reward": [], "grad_norm": [], "diversity": [], "frac_reward_zero_std": [[0.5, 0.25], [1.0, 0.75]]},
        start_scores=cells(start, long),
        arm_info=DLR_INFO if seed >= 10 else {},
        other_task_before_scores=[cell(1, other[0], "logic")],
        other_task_after_scores=[cell(1, other[1], "logic")],
    )


def test_difference_verdicts_and_the_first_fraction_by_hand():
    assert difference_verdict(Interval(0.1, 0.01, 0.2, (2, 2), 40)) == "supported"
    assert difference_verdict(Interval(-0.1, -0.2, -0.01, (2, 2), 40)) == "not supported"
    assert difference_verdict(Interval(0.1, 0.0, 0.2, (2, 2), 40)) == "inconclusive"  # 0 is in it
    curve = [{"budget_fraction": 0.0, "accuracy_mean": 0.2}, {"budget_fraction": 0.5, "accuracy_mean": 0.6}]
    assert first_fraction_reaching(curve, 0.6) == 0.5 and first_fraction_reaching(curve, 0.7) is None


def test_claims_of_a_dlr_arm_that_wins_against_grpo(tmp_path):
    """DLR (seeds 10, 11): 40% -> 80-82% at depths 1-2, 30% at depths 7-8, GRPO's final 50% reached at
    half the budget; GRPO (seeds 0, 1): 50% -> 50% at depths 1-2, 10% at depths 7-8, reaches its final 30% at the end.
    Every gap is 10 or more problems of the 100 it is measured on, all one way: each interval clears 0."""
    results = {
        "dlr": [seed_result(10, 0.4, 0.8, 0.3, [0.2, 0.55, 0.6]), seed_result(11, 0.4, 0.82, 0.3, [0.2, 0.5, 0.62])],
        "grpo": [seed_result(0, 0.5, 0.5, 0.1, [0.1, 0.2, 0.3]), seed_result(1, 0.5, 0.5, 0.1, [0.1, 0.2, 0.3])],
    }
    summary = {
        "experiment": "dlr_vs_grpo",
        "device": "CPU",
        "budget": {"kind": "flops", "amount": 2e12},
        "arms": {name: arm_summary(seeds, name, 4) for name, seeds in results.items()},
    }
    rows = claims_table(summary, results, [1, 2], "synthetic_math")
    by_claim = {r["claim"]: r for r in rows if r["arm"] == "dlr"}
    # final over all depths: DLR (0.8 * 100 + 0.3 * 100) / 200 = 55% and 56%, GRPO 30%
    higher = by_claim["efficiency: higher accuracy than grpo at equal compute"]
    assert higher["verdict"] == "supported"
    assert higher["evidence"].startswith("55.5% vs 30.0%, difference +25.5 points [")
    assert "(2 vs 2 seeds x 200 problems) at 2 TFLOPs each" in higher["evidence"]
    reach = by_claim["efficiency: less compute to reach grpo's final accuracy"]
    assert reach["verdict"] == "supported" and "1 TFLOPs (50% of the budget)" in reach["evidence"]
    assert reach["evidence"].endswith("(mean curves of 2 vs 2 seeds x 200 problems)")
    longer = by_claim["longer chains: higher accuracy than grpo at untrained depths 7-8"]
    assert longer["verdict"] == "supported" and "(2 vs 2 seeds x 100 problems)" in longer["evidence"]
    kept = by_claim["accumulation across tasks without forgetting"]  # 90% -> 90% on the same problems
    assert kept["verdict"] == "supported"
    assert "90.0% vs 90.0%, difference +0.0 points [+0.0, +0.0] (1 vs 2 seeds x 50 problems)" in kept["evidence"]
    moved = {r["arm"]: r for r in rows if r["claim"].startswith("RL improves")}
    assert moved["dlr"]["verdict"] == "supported" and moved["grpo"]["verdict"] == "inconclusive"
    # DLR's final at depths 1-2 is (40 + 41) / 100 right on average; its start 20 of 50 on both seeds
    assert moved["dlr"]["evidence"].startswith("final vs start 81.0% vs 40.0%, difference +41.0 points [")
    assert moved["dlr"]["evidence"].endswith("(2 seeds x 100 problems), paired by seed and problem")
    # GRPO's final is its start on every problem: the difference is 0 in every replicate
    assert "difference +0.0 points [+0.0, +0.0]" in moved["grpo"]["evidence"]
    assert summary["arms"]["dlr"]["train"]["frac_reward_zero_std"] == pytest.approx(0.5)  # (0.25 + 0.75) / 2
    write_report({**summary, "claims": rows}, results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert report.index("## Claims") < report.index("| rank | arm |") and "2 TFLOPs" in report
    assert "the unbiased variant" in report  # the critic filter's bias is stated
    assert json.loads((tmp_path / "summary.json").read_text())["claims"] == rows


def higher_accuracy_row(results: dict) -> dict:
    """The DLR arm's "higher accuracy than grpo at equal compute" row for hand-made seed results."""
    summary = {
        "budget": {"kind": "flops", "amount": 1e12},
        "arms": {name: arm_summary(seeds, name, 4) for name, seeds in results.items()},
    }
    rows = claims_table(summary, results, [1, 2], "synthetic_math")
    return next(r for r in rows if r["arm"] == "dlr" and r["claim"].startswith("efficiency: higher"))


def test_a_lead_found_at_untrained_depths_only_is_named_as_such():
    """DLR 50% at trained depths 1-2 and 30% at 7-8 (overall 40%), GRPO 52% and 0% (26%): the overall lead
    (30 problems of 200 for DLR, 2 for GRPO) is supported by the interval, and the evidence says it lies
    at untrained depths only, where the 2 problems of 100 GRPO alone gets right leave 0 in the interval;
    a lead at the trained depths too (80-82% vs 50%) carries no such note."""
    floor = higher_accuracy_row(
        {
            "dlr": [seed_result(10, 0.5, 0.5, 0.3, [0.4, 0.4]), seed_result(11, 0.5, 0.5, 0.3, [0.4, 0.4])],
            "grpo": [seed_result(0, 0.52, 0.52, 0.0, [0.26, 0.26]), seed_result(1, 0.52, 0.52, 0.0, [0.26, 0.26])],
        }
    )
    assert floor["verdict"] == "supported"
    assert "at trained depths 1-2 50.0% vs 52.0%, difference -2.0 points [" in floor["evidence"]
    assert floor["evidence"].endswith("(the lead is at untrained depths only)")
    won = higher_accuracy_row(
        {
            "dlr": [seed_result(10, 0.4, 0.8, 0.3, [0.2, 0.6]), seed_result(11, 0.4, 0.82, 0.3, [0.2, 0.62])],
            "grpo": [seed_result(0, 0.5, 0.5, 0.1, [0.1, 0.3]), seed_result(1, 0.5, 0.5, 0.1, [0.1, 0.3])],
        }
    )
    assert won["verdict"] == "supported" and "untrained depths only" not in won["evidence"]


def test_a_hub_dataset_makes_no_depth_claims():
    """GSM8K's "depth" counts a solution's steps, which no arm's training selects (issue 34 item 5): with no
    trained range, no row speaks of trained or untrained depths, and RL-moved reads the whole test set."""
    results = {
        "dlr": [seed_result(10, 0.4, 0.8, 0.3, [0.2, 0.6]), seed_result(11, 0.4, 0.82, 0.3, [0.2, 0.62])],
        "grpo": [seed_result(0, 0.5, 0.5, 0.1, [0.1, 0.3]), seed_result(1, 0.5, 0.5, 0.1, [0.1, 0.3])],
    }
    summary = {
        "budget": {"kind": "flops", "amount": 1e12},
        "arms": {name: arm_summary(seeds, name, 4) for name, seeds in results.items()},
    }
    rows = claims_table(summary, results, None, "prontoqa")
    assert not any("depth" in row["claim"] or "depth" in row["evidence"] for row in rows)
    moved = {r["arm"]: r for r in rows if r["claim"].startswith("RL improves")}
    assert moved["dlr"]["claim"] == "RL improves the arm on the test set"
    # all 200 problems: DLR's final (0.8 + 0.3) / 2 = 55% and 56%, its start (0.4 + 0.3) / 2 = 35% on both seeds
    assert moved["dlr"]["evidence"].startswith("final vs start 55.5% vs 35.0%, difference +20.5 points [")
    assert [r["claim"] for r in rows if r["arm"] == "dlr"][:2] == [
        "efficiency: higher accuracy than grpo at equal compute",
        "efficiency: less compute to reach grpo's final accuracy",
    ]


def test_forgetting_on_logic_at_chance_is_not_testable_and_a_lost_task_is_not_supported():
    chance = {"dlr": [seed_result(10, 0.4, 0.4, 0.3, [0.4, 0.4], other=(0.52, 0.5))]}
    summary = {"budget": {"kind": "flops", "amount": 1e12}, "arms": {"dlr": arm_summary(chance["dlr"], "dlr", 4)}}
    rows = claims_table(summary, chance, [1, 2], "synthetic_logic")
    forgetting = next(r for r in rows if r["claim"].startswith("accumulation"))
    assert forgetting["verdict"] == "not testable yet" and "logic at chance" in forgetting["evidence"]
    assert rows[0]["verdict"] == "not testable yet" and "no GRPO arm" in rows[0]["evidence"]
    lost = {"dlr": [seed_result(s, 0.4, 0.4, 0.3, [0.4, 0.4], other=(0.9, 0.6)) for s in (10, 11)]}
    summary = {"budget": {"kind": "flops", "amount": 1e12}, "arms": {"dlr": arm_summary(lost["dlr"], "dlr", 4)}}
    forgetting = next(r for r in claims_table(summary, lost, [1, 2], "synthetic_math") if "accumulation" in r["claim"])
    # 15 of 50 problems lost on every seed: the drop is X/50 with X ~ Binomial(50, 0.3), whose 2.5%
    # quantile (9) is far above the 2.5 problems the 5-point margin allows
    assert forgetting["verdict"] == "not supported"
    assert "difference +30.0 points" in forgetting["evidence"]


def test_a_continual_run_whose_start_and_final_test_sets_differ_is_not_paired():
    """Phases: the start is scored on the first phase's test set (math), the final on the last's (logic)."""
    import dataclasses

    from dlr.report.claims import rl_moved

    result = seed_result(0, 0.4, 0.5, 0.3, [0.4, 0.5])
    continual = dataclasses.replace(result, start_scores=[cell(d, 0.4, "logic") for d in (1, 2)])
    row = rl_moved("grpo", [continual], [1, 2])
    assert row["verdict"] == "not testable yet" and "different test sets" in row["evidence"]


def test_a_grpo_variant_is_compared_with_grpo_on_the_same_problems():
    """experiment=controls: GRPO (final 50% at depths 1-2) against GRPO with shuffled rewards (final 30%): the
    variant's row says it is lower, with the interval over seeds and problems, and each arm keeps its RL row."""
    results = {
        "grpo": [seed_result(0, 0.4, 0.5, 0.1, [0.25, 0.3]), seed_result(1, 0.4, 0.5, 0.1, [0.25, 0.3])],
        "grpo_shuffled": [seed_result(2, 0.4, 0.3, 0.1, [0.25, 0.2]), seed_result(3, 0.4, 0.3, 0.1, [0.25, 0.2])],
    }
    summary = {
        "budget": {"kind": "flops", "amount": 1e12},
        "arms": {name: arm_summary(seeds, "grpo", 4) for name, seeds in results.items()},
    }
    rows = claims_table(summary, results, [1, 2], None)
    (variant,) = [r for r in rows if r["arm"] == "grpo_shuffled" and r["claim"].startswith("efficiency")]
    assert variant["claim"] == "efficiency: higher accuracy than grpo at equal compute"
    assert variant["verdict"] == "not supported"  # 20% vs 30% overall, every gap one way
    assert "at trained depths 1-2 30.0% vs 50.0%, difference -20.0 points [" in variant["evidence"]
    assert {r["arm"] for r in rows if r["claim"].startswith("RL improves")} == {"grpo", "grpo_shuffled"}
