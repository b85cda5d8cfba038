"""The claims table: verdicts from hand-made seed results."""

from __future__ import annotations

import json

import pytest

from dlr.report.claims import claims_table, first_fraction_reaching, interval_verdict
from dlr.report.report import SeedResult, arm_summary, write_report
from dlr.scoring import DepthScore

DLR_INFO = {
    "readout": "rationale",
    "free_answer_cue": False,
    "filter": "critic",
    "alignment": {"source": "shipped", "steps": 400, "flops": 2e13, "process_seconds": 900, "counted_in_budget": False},
    "after_alignment": [],
}


def seed_result(seed: int, start: float, final: float, long: float, curve: list[float], other=(0.9, 0.9)) -> SeedResult:
    """Depths 1-2 trained (accuracy `start` -> `final`), depths 7-8 at `long`; 10 problems a cell."""
    cells = lambda trained, deep: [  # noqa: E731
        DepthScore("m", "math", d, 10, trained if d <= 2 else deep, 1.0) for d in (1, 2, 7, 8)
    ]
    return SeedResult(
        seed=seed,
        curve=[{"budget_fraction": i / (len(curve) - 1), "accuracy": a} for i, a in enumerate(curve)],
        final_scores=cells(final, long),
        spent={"seconds": 1.0, "flops": 1e12, "generated_tokens": 5, "peak_memory_gb": 1.0},
        other_task_before=other[0],
        other_task_after=other[1],
        heldout_nll_before=1.0,
        heldout_nll_after=1.0,
        grad_norm_cv=0.1,
        protected_unchanged=True,
        trace={"reward": [], "grad_norm": [], "diversity": [], "frac_reward_zero_std": [[0.5, 0.25], [1.0, 0.75]]},
        start_scores=cells(start, long),
        arm_info=DLR_INFO if seed >= 10 else {},
    )


def test_interval_verdicts_and_the_first_fraction_by_hand():
    assert interval_verdict((0.6, 0.7), (0.4, 0.5)) == "supported"
    assert interval_verdict((0.3, 0.45), (0.5, 0.6)) == "not supported"
    assert interval_verdict((0.4, 0.55), (0.5, 0.6)) == "inconclusive"
    curve = [{"budget_fraction": 0.0, "accuracy_mean": 0.2}, {"budget_fraction": 0.5, "accuracy_mean": 0.6}]
    assert first_fraction_reaching(curve, 0.6) == 0.5 and first_fraction_reaching(curve, 0.7) is None


def test_claims_of_a_dlr_arm_that_wins_against_grpo(tmp_path):
    """DLR (seeds 10, 11): 40% -> 80-82% at depths 1-2, 30% at depths 7-8, GRPO's final 50% reached at
    half the budget; GRPO (seeds 0, 1): 50% -> 50% at depths 1-2, 10% at depths 7-8, reaches its final 30% at the end."""
    results = {
        "dlr": [seed_result(10, 0.4, 0.8, 0.3, [0.2, 0.55, 0.6]), seed_result(11, 0.4, 0.82, 0.3, [0.2, 0.5, 0.62])],
        "grpo": [seed_result(0, 0.5, 0.5, 0.1, [0.1, 0.2, 0.3]), seed_result(1, 0.5, 0.5, 0.1, [0.1, 0.2, 0.3])],
    }
    summary = {
        "experiment": "dlr_vs_grpo",
        "device": "CPU",
        "budget": {"kind": "flops", "amount": 2e12},
        "arms": {name: arm_summary(seeds, name) for name, seeds in results.items()},
    }
    rows = claims_table(summary, results, [1, 2], "synthetic_math")
    by_claim = {r["claim"]: r for r in rows if r["arm"] == "dlr"}
    # final over all depths: DLR (0.8 * 20 + 0.3 * 20) / 40 = 55% and 56%, GRPO 30%
    assert by_claim["efficiency: higher accuracy than grpo at equal compute"]["verdict"] == "supported"
    reach = by_claim["efficiency: less compute to reach grpo's final accuracy"]
    assert reach["verdict"] == "supported" and "1 TFLOPs (50% of the budget)" in reach["evidence"]
    assert by_claim["longer chains: higher accuracy than grpo at untrained depths 7-8"]["verdict"] == "supported"
    assert by_claim["accumulation across tasks without forgetting"]["verdict"] == "supported"  # 90% -> 90%
    moved = {r["arm"]: r for r in rows if r["claim"].startswith("RL improves")}
    assert moved["dlr"]["verdict"] == "supported" and moved["grpo"]["verdict"] == "inconclusive"
    assert "start 40.0% [40.0%, 40.0%] -> final 81.0% [80.0%, 82.0%]" in moved["dlr"]["evidence"]
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
        "arms": {name: arm_summary(seeds, name) for name, seeds in results.items()},
    }
    rows = claims_table(summary, results, [1, 2], "synthetic_math")
    return next(r for r in rows if r["arm"] == "dlr" and r["claim"].startswith("efficiency: higher"))


def test_a_lead_found_at_untrained_depths_only_is_named_as_such():
    """DLR 50% at trained depths 1-2 and 30% at 7-8 (overall 40%), GRPO 52% and 0% (26%): the overall lead
    is supported by the intervals, and the evidence says it lies at untrained depths only; a lead at the
    trained depths too (80-82% vs 50%) carries no such note."""
    floor = higher_accuracy_row(
        {
            "dlr": [seed_result(10, 0.5, 0.5, 0.3, [0.4, 0.4]), seed_result(11, 0.5, 0.5, 0.3, [0.4, 0.4])],
            "grpo": [seed_result(0, 0.52, 0.52, 0.0, [0.26, 0.26]), seed_result(1, 0.52, 0.52, 0.0, [0.26, 0.26])],
        }
    )
    assert floor["verdict"] == "supported"
    assert "at trained depths 1-2 50.0% [50.0%, 50.0%] vs 52.0% [52.0%, 52.0%]" in floor["evidence"]
    assert floor["evidence"].endswith("(the lead is at untrained depths only)")
    won = higher_accuracy_row(
        {
            "dlr": [seed_result(10, 0.4, 0.8, 0.3, [0.2, 0.6]), seed_result(11, 0.4, 0.82, 0.3, [0.2, 0.62])],
            "grpo": [seed_result(0, 0.5, 0.5, 0.1, [0.1, 0.3]), seed_result(1, 0.5, 0.5, 0.1, [0.1, 0.3])],
        }
    )
    assert won["verdict"] == "supported" and "untrained depths only" not in won["evidence"]


def test_forgetting_on_logic_at_chance_is_not_testable_and_a_lost_task_is_not_supported():
    chance = {"dlr": [seed_result(10, 0.4, 0.4, 0.3, [0.4, 0.4], other=(0.52, 0.5))]}
    summary = {"budget": {"kind": "flops", "amount": 1e12}, "arms": {"dlr": arm_summary(chance["dlr"], "dlr")}}
    rows = claims_table(summary, chance, [1, 2], "synthetic_logic")
    forgetting = next(r for r in rows if r["claim"].startswith("accumulation"))
    assert forgetting["verdict"] == "not testable yet" and "logic at chance" in forgetting["evidence"]
    assert rows[0]["verdict"] == "not testable yet" and "no GRPO arm" in rows[0]["evidence"]
    lost = {"dlr": [seed_result(s, 0.4, 0.4, 0.3, [0.4, 0.4], other=(0.9, 0.6)) for s in (10, 11)]}
    summary = {"budget": {"kind": "flops", "amount": 1e12}, "arms": {"dlr": arm_summary(lost["dlr"], "dlr")}}
    forgetting = next(r for r in claims_table(summary, lost, [1, 2], "synthetic_math") if "accumulation" in r["claim"])
    assert forgetting["verdict"] == "not supported"  # 30 points lost on every seed
