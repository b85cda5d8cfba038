"""The torchmetrics objects reduce shards the way DDP does: two ranks' states merged give the scores of
the whole, and one batch's reward statistics are that batch's means bit for bit."""

from __future__ import annotations

import torch

from dlr.data.schema import Record
from dlr.methods.rl_base import RewardStatistics
from dlr.scoring import DepthScores


def _records(depths: list[int], task: str = "math") -> list[Record]:
    return [Record(f"q{i}", task, f"question {i}", "cot", "1", d, "test") for i, d in enumerate(depths)]


def test_depth_scores_of_two_shards_merged_are_those_of_the_whole():
    records = _records([1, 2, 1, 2]) + _records([1], "logic")
    correct, formats = [1.0, 0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.5, 0.0, 1.0]
    whole = DepthScores()
    whole.update(records, correct, formats)
    first, second = DepthScores(), DepthScores()
    first.update(records[:2], correct[:2], formats[:2])
    second.update(records[2:], correct[2:], formats[2:])
    first.merge_state(second)
    assert (
        first.compute()
        == whole.compute()
        == {
            ("logic", 1): (1, 1.0, 1.0),
            ("math", 1): (2, 0.5, 0.75),
            ("math", 2): (2, 0.5, 0.5),
        }
    )


def test_depth_scores_keep_each_problem_s_id_and_outcome_in_the_order_scored():
    records = _records([2, 1, 2])
    metric = DepthScores(sync_on_compute=False)
    metric.update(records, [1.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    depth_1, depth_2 = metric.scores("m", [r.id for r in records])
    assert (depth_1.depth, depth_1.ids, depth_1.correct) == (1, ("q1",), (0.0,))
    assert (depth_2.depth, depth_2.ids, depth_2.correct, depth_2.accuracy) == (2, ("q0", "q2"), (1.0, 0.0), 0.5)
    assert metric.scores("m")[1].ids == () and metric.scores("m")[1].correct == (1.0, 0.0)  # no ids given


def test_reward_statistics_are_the_batch_means_and_reduce_weighted_by_count():
    scores = torch.tensor([[[1, 1, 1.2], [0, 1, 0.2]], [[0, 0, 0.0], [0, 0, 0.0]]])  # [B=2, K=2, 3]
    zero_spread = torch.tensor([False, True])
    one = RewardStatistics()
    one.update(scores, zero_spread)
    rewards = scores[..., 2]
    assert one.compute() == {
        "train/reward": float(rewards.mean()),
        "train/reward_std": float(rewards.std(dim=1).mean()),
        "train/rewards/correct/mean": float(scores[..., 0].mean()),
        "train/rewards/format/mean": float(scores[..., 1].mean()),
        "train/frac_reward_zero_std": 0.5,
    }
    merged, other = RewardStatistics(), RewardStatistics()  # a second rank's batch of as many completions
    merged.update(scores, zero_spread)
    other.update(torch.ones(2, 2, 3), torch.tensor([True, True]))
    merged.merge_state(other)
    assert merged.compute()["train/rewards/correct/mean"] == (0.25 + 1.0) / 2
    assert merged.compute()["train/frac_reward_zero_std"] == (0.5 + 1.0) / 2
