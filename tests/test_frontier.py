"""The depth frontier: pass-rate estimates, weights and draws checked against hand-derived numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dlr.callbacks.frontier import FrontierUpdate
from dlr.data.datamodule import ProceduralSpec, ReasoningDataModule, procedural_record
from dlr.data.frontier import DepthFrontier, spread_probability


def test_spread_probability_by_hand():
    assert spread_probability(0.5, 4) == pytest.approx(1 - 2 / 16)  # 0.875
    assert spread_probability(0.9, 2) == pytest.approx(1 - 0.81 - 0.01)  # 0.18
    assert spread_probability(1.0, 4) == 0.0 and spread_probability(0.0, 4) == 0.0


def test_estimates_and_weights_by_hand():
    frontier = DepthFrontier(("math",), 1, 3, floor=0.05, decay=0.5)
    assert frontier.weights("math") == pytest.approx([0.05 + 0.875] * 3)  # prior p = 0.5 everywhere: uniform
    # depth 1: 4 of 4 correct; depth 2: 1 of 4; depth 3 unseen
    frontier.update(["math", "math"], [1, 2], [[1, 1, 1, 1], [0, 1, 0, 0]])
    assert frontier.pass_rate("math", 1) == pytest.approx(5 / 6)  # (4 + 1) / (4 + 2)
    assert frontier.pass_rate("math", 2) == pytest.approx(2 / 6)
    assert frontier.pass_rate("math", 3) == pytest.approx(0.5)
    p1, p2 = 5 / 6, 1 / 3
    expected = [0.05 + 1 - p1**4 - (1 - p1) ** 4, 0.05 + 1 - p2**4 - (1 - p2) ** 4, 0.05 + 0.875]
    assert frontier.weights("math") == pytest.approx(expected)
    # the next batch halves the earlier counts: depth 1 now 2 of 2 before + 0 of 2 new
    frontier.update(["math"], [1], [[0, 0]])
    assert frontier.group_size == 2
    assert frontier.pass_rate("math", 1) == pytest.approx((2 + 0 + 1) / (2 + 2 + 2))
    assert frontier.pass_rate("math", 2) == pytest.approx((0.5 + 1) / (2 + 2))


def test_outside_questions_are_ignored_and_state_round_trips():
    frontier = DepthFrontier(("logic", "math"), 1, 2)
    frontier.update(["math", "gsm8k", "math"], [9, 1, 2], [[1, 1], [1, 1], [1, 0]])
    assert frontier.pass_rate("math", 2) == pytest.approx(2 / 4) and frontier.attempts["math"][0] == 0
    copy = DepthFrontier(("logic", "math"), 1, 2)
    copy.load_state_dict(frontier.state_dict())
    assert copy.weights("math") == frontier.weights("math") and copy.group_size == 2


def test_records_are_drawn_by_the_weights():
    """A depth the arm always solves keeps only the floor's share of the draws."""
    frontier = DepthFrontier(("math",), 1, 2, floor=0.05)
    frontier.correct["math"], frontier.attempts["math"] = [1e6, 5.0], [1e6, 10.0]  # p = 1 and 0.5
    spec = ProceduralSpec({"math": 1.0}, 1, 2)
    depths = [procedural_record(spec, 0, 0, i, frontier).depth for i in range(4000)]
    share = depths.count(1) / len(depths)
    expected = 0.05 / (0.05 + 0.05 + spread_probability(6 / 12, 4))
    assert share == pytest.approx(expected, abs=0.015)
    uniform = [procedural_record(spec, 0, 0, i).depth for i in range(4000)]  # no frontier: uniform depths
    assert uniform.count(1) / len(uniform) == pytest.approx(0.5, abs=0.03)


def test_bad_frontier_settings_name_the_key():
    with pytest.raises(ValueError, match="data.frontier.floor"):
        DepthFrontier(("math",), 1, 2, floor=0.0)
    with pytest.raises(ValueError, match="data.frontier.decay"):
        DepthFrontier(("math",), 1, 2, decay=1.5)
    with pytest.raises(ValueError, match="data.frontier has unknown keys"):
        ReasoningDataModule("synthetic_math", 4, (1, 4), (1, 4), 1, 2, 2, frontier={"enabled": True, "flor": 1})
    with pytest.raises(ValueError, match="procedural source"):
        ReasoningDataModule("gsm8k", 4, (1, 4), (1, 4), 1, 2, 2, frontier={"enabled": True})


def test_the_callback_feeds_rl_batches_and_the_state_resumes():
    dm = ReasoningDataModule("synthetic_math", 2, (1, 3), (1, 3), 1, 2, 2, frontier={"enabled": True, "decay": 1.0})
    batch = [SimpleNamespace(task="math", depth=3), SimpleNamespace(task="math", depth=1)]
    scores = torch.zeros(2, 4, 3)
    scores[0, :, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # depth 3: 1 of 4
    scores[1, :, 0] = 1.0  # depth 1: 4 of 4
    trainer = SimpleNamespace(world_size=1, global_step=0, is_global_zero=True, loggers=[])
    callback = FrontierUpdate(dm.frontier)
    callback.on_train_batch_end(trainer, SimpleNamespace(stage="alignment", last_scores=scores), None, batch, 0)
    assert dm.frontier.attempts["math"] == [0.0, 0.0, 0.0]  # stage 1 has no rollouts to learn from
    callback.on_train_batch_end(trainer, SimpleNamespace(stage="rl", last_scores=scores), None, batch, 0)
    assert dm.frontier.attempts["math"] == [4.0, 0.0, 4.0] and dm.frontier.correct["math"] == [4.0, 0.0, 1.0]
    metrics = callback.metrics(torch.tensor([[0, 3, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float64))
    assert metrics["frontier/depth_share/d1"] == 0.5 and metrics["frontier/pass_rate/math/d3"] == pytest.approx(2 / 6)
    dm.setup()
    fresh = ReasoningDataModule("synthetic_math", 2, (1, 3), (1, 3), 1, 2, 2, frontier={"enabled": True})
    fresh.load_state_dict(dm.state_dict())
    assert fresh.frontier.correct == dm.frontier.correct and fresh.frontier.attempts == dm.frontier.attempts
