"""The budget meter, the report's statistics, and the shortened main job end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import run_train
from dlr.accounting import compute_parameters, forward_flops, generation_flops, model_cost, pass_flops
from dlr.callbacks.budget import BudgetMeter
from dlr.ranks import log_now
from dlr.report.report import bootstrap_ci, count_collapses
from dlr.scoring import DepthScore, overall_accuracy


def cell(task: str, depth: int, n: int, right: int, format_rate: float = 1.0) -> DepthScore:
    """A (task, depth) cell of n problems whose first `right` are right."""
    outcomes = [1.0] * right + [0.0] * (n - right)
    ids = [f"{task}-{depth}-{i}" for i in range(n)]
    return DepthScore("m", task, depth, n, right / n, format_rate, ids=ids, correct=outcomes)


SPENT = {  # a seed's spending, with the main model's work over 10 training questions
    "seconds": 1.0,
    "flops": 2e12,
    "generated_tokens": 5,
    "peak_memory_gb": 1.0,
    "questions": 10,
    "main_decoded_sequences": 40,
    "main_forward_positions": 4000,
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class OtherRankStrategy:
    """Stands in for DDP over two processes: this one is rank 0, and rank 1 contributes `rank_one(t)`
    to every gather."""

    def __init__(self, rank_one) -> None:
        self.rank_one, self.root_device = rank_one, torch.device("cpu")

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        return torch.stack([values, self.rank_one(values)])

    def barrier(self) -> None:
        pass


def fake_trainer(world_size: int = 1, rank_one=None, loggers=()) -> SimpleNamespace:
    strategy = OtherRankStrategy(rank_one) if world_size > 1 else SimpleNamespace(barrier=lambda: None)
    return SimpleNamespace(
        is_global_zero=True,
        loggers=list(loggers),
        global_step=0,
        should_stop=False,
        world_size=world_size,
        strategy=strategy,
    )


QUESTIONS = ["q0", "q1", "q2", "q3"]  # a batch of four questions (the meter counts them)


def drive(
    meter: BudgetMeter,
    module,
    clock: FakeClock,
    step_seconds: float,
    step_flops: float,
    max_batches: int = 100,
    trainer: SimpleNamespace | None = None,
) -> int:
    """Run fake batches through the meter's hooks until it stops training; returns the batches run."""
    trainer = trainer or fake_trainer()
    for batch in range(1, max_batches + 1):
        meter.on_train_batch_start(trainer, module, QUESTIONS, batch)
        clock.now += step_seconds
        module.flops_spent += step_flops
        module.generated_tokens += 5
        module.main_decoded_sequences += 8  # 2 sequences for each of the 4 questions
        module.main_forward_positions += 100
        meter.on_train_batch_end(trainer, module, None, QUESTIONS, batch)
        trainer.global_step += 1
        if trainer.should_stop:
            return batch
    return max_batches


def fake_module() -> SimpleNamespace:
    """A `BudgetedModule` without latents, in stage 2."""
    return SimpleNamespace(
        device=torch.device("cpu"),
        flops_spent=0.0,
        generated_tokens=0,
        main_decoded_sequences=0,
        main_forward_positions=0,
        last_reward=0.5,
        last_grad_norm=1.0,
        last_rollout=None,
        last_scores=None,
        stage="rl",
    )


def test_meter_stops_at_the_seconds_budget_and_does_not_charge_evaluation():
    clock = FakeClock()
    evaluations = []

    def evaluate(module):  # evaluation takes 5 fake seconds that must not be charged
        evaluations.append(clock.now)
        clock.now += 5.0
        return [DepthScore("m", "math", 1, 10, 0.5, 1.0)]

    meter = BudgetMeter("seconds", 2.0, evaluate, eval_fractions=(0.5, 1.0), clock=clock)
    batches = drive(meter, fake_module(), clock, step_seconds=0.3, step_flops=10.0)
    assert batches == 7  # 7 x 0.3 = 2.1 >= 2.0 > 6 x 0.3
    assert meter.seconds == pytest.approx(2.1)  # the 10 s of evaluation are not in it
    assert [p.fraction for p in meter.points] == [0.5, 1.0]
    assert [p.seconds for p in meter.points] == pytest.approx([1.2, 2.1])  # after batch 4 (1.2 >= 1.0) and 7
    assert len(evaluations) == 2 and meter.trace.reward[-1] == pytest.approx([1.05, 0.5])


def test_meter_traces_the_share_of_groups_without_reward_spread():
    """Rewards [B=4, K=2]: groups 0 and 3 have equal rewards, so half the groups give no advantage."""
    clock, module = FakeClock(), fake_module()
    scores = torch.zeros(4, 2, 3)
    scores[..., 2] = torch.tensor([[1.0, 1.0], [0.0, 1.1], [0.1, 0.0], [0.0, 0.0]])
    module.last_scores = scores
    meter = BudgetMeter("flops", 100.0, None, eval_fractions=(1.0,), clock=clock)
    drive(meter, module, clock, step_seconds=1.0, step_flops=50.0)
    assert meter.trace.frac_reward_zero_std == [[0.5, 0.5], [1.0, 0.5]]


def test_meter_stops_at_the_flops_budget():
    clock = FakeClock()
    module = fake_module()
    meter = BudgetMeter("flops", 1000.0, None, eval_fractions=(0.25, 0.5, 0.75, 1.0), clock=clock)
    assert drive(meter, module, clock, step_seconds=0.1, step_flops=300.0) == 4  # 1200 >= 1000 > 900
    assert [p.flops for p in meter.points] == [300.0, 600.0, 900.0, 1200.0]
    state = meter.state_dict()
    resumed = BudgetMeter("flops", 1000.0, None, clock=clock)
    resumed.load_state_dict(state)
    assert resumed.seconds == pytest.approx(meter.seconds) and len(resumed.points) == 4 and resumed.eval_fractions == []


def test_meter_sets_stage1_batches_aside_unless_told_to_count_them():
    """Two alignment batches (1 s, 100 FLOPs each) then RL batches (1 s, 100 FLOPs): a 300-FLOPs
    budget ends after 3 RL batches when stage 1 is set aside, after 1 when it counts."""
    for include, rl_batches in ((False, 3), (True, 1)):
        clock, module = FakeClock(), fake_module()
        meter = BudgetMeter("flops", 300.0, None, eval_fractions=(1.0,), clock=clock, include_alignment=include)
        module.stage = "alignment"
        trainer = fake_trainer()
        for batch in range(2):
            meter.on_train_batch_start(trainer, module, QUESTIONS, batch)
            clock.now += 1.0
            module.flops_spent += 100.0
            meter.on_train_batch_end(trainer, module, None, QUESTIONS, batch)
        module.stage = "rl"
        assert drive(meter, module, clock, step_seconds=1.0, step_flops=100.0, trainer=trainer) == rl_batches
        aside = (0.0, 0.0) if include else (2.0, 200.0)
        assert (meter.alignment_seconds, meter.alignment_flops) == aside
        assert meter.flops == 300.0 and meter.seconds == 3.0
        assert meter.questions == 4 * (2 * include + rl_batches)  # 4 questions a counted batch: 12 either way


def test_meter_over_two_ranks_charges_every_rank_s_seconds_and_flops():
    clock, module = FakeClock(), fake_module()
    scale = [2.0, 3.0, 3.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0]  # rank 1's columns, over rank 0's
    rank_one = lambda row: row * torch.tensor(scale, dtype=torch.float64)  # noqa: E731
    meter = BudgetMeter("flops", 1000.0, None, eval_fractions=(1.0,), clock=clock)
    # Per batch: rank 0 spends 0.1 s and 100 FLOPs, rank 1 0.2 s and 300 FLOPs; 400 a batch in all.
    assert drive(meter, module, clock, 0.1, 100.0, trainer=fake_trainer(2, rank_one)) == 3  # 1200 >= 1000 > 800
    assert meter.flops == 1200.0 and meter.generated_tokens == 3 * (5 + 15)
    # 4 questions a rank; 8 + 16 decoded sequences and 100 + 300 main-model positions a batch
    assert (meter.questions, meter.main_decoded_sequences, meter.main_forward_positions) == (24, 72, 1200)
    resumed = BudgetMeter("flops", 1000.0)
    resumed.load_state_dict(meter.state_dict())
    assert (resumed.questions, resumed.main_decoded_sequences, resumed.main_forward_positions) == (24, 72, 1200)
    assert meter.seconds == pytest.approx(3 * (0.1 + 0.2))  # device-seconds: both devices were busy
    assert meter.trace.reward[-1] == pytest.approx([1.2, 0.25])  # the mean of 0.5 and 0.0


def test_log_now_logs_the_mean_over_ranks():
    class Recorder:
        def log_metrics(self, metrics, step):
            self.logged = (metrics, step)

    recorder = Recorder()
    log_now(fake_trainer(2, lambda row: row + 2.0, [recorder]), {"train/reward": 0.5, "train/kl": torch.tensor(1.0)})
    assert recorder.logged == ({"train/kl": 2.0, "train/reward": 1.5}, 0)


def test_bad_budget_fails_with_the_key_named():
    with pytest.raises(ValueError, match="budget.kind"):
        BudgetMeter("joules", 1.0)
    with pytest.raises(ValueError, match="budget.amount"):
        BudgetMeter("seconds", 0.0)


def test_flops_and_parameter_counts():
    assert forward_flops(1000, 10) == 20_000
    assert forward_flops(1000, 10, "activations") == 40_000 and forward_flops(1000, 10, "weights") == 60_000
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 4))
    assert compute_parameters(model) == 8 * 4 + 4  # the embedding does no per-token matmul


class ToyLM(torch.nn.Module):
    """Embedding 10 x 4 (a lookup), body Linear 4 -> 4 (20 parameters), untied head 4 -> 10 (40)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.body = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def test_the_head_is_charged_only_where_logits_are_computed():
    cost = model_cost(ToyLM())
    assert (cost.body, cost.head, cost.total) == (20, 40, 60)
    assert pass_flops(cost, tokens=5, logit_tokens=1) == 2 * 20 * 5 + 2 * 40 * 1  # 280
    assert pass_flops(cost, 5, 3, "activations") == 2 * (2 * 20 * 5 + 2 * 40 * 3)  # 880
    # 2 rows, prompt 3, 4 new tokens: the body reads 3 + 4 - 1 = 6 positions a row, the head makes 4 logits
    assert generation_flops(cost, 2, 3, 4) == 2 * 20 * 12 + 2 * 40 * 8  # 1120
    assert generation_flops(cost, 2, 3, 0) == 0.0


def test_bootstrap_interval_of_hand_made_seeds():
    assert bootstrap_ci([0.4]) == (0.4, 0.4)
    lo, hi = bootstrap_ci([0.2, 0.4, 0.6, 0.8])
    assert 0.2 <= lo < 0.5 < hi <= 0.8
    # Two seeds: the resampled mean is 0.2, 0.5 or 0.8 with probability 1/4, 1/2, 1/4.
    assert bootstrap_ci([0.2, 0.8]) == (0.2, 0.8)


def test_collapses_count_falls_below_the_running_best():
    assert count_collapses([0.1, 0.3, 0.5, 0.6]) == 0
    assert count_collapses([0.5, 0.45, 0.38, 0.36, 0.5, 0.2]) == 2  # 0.38 starts one, 0.2 another
    assert count_collapses([0.5, 0.41]) == 0  # exactly 9 points down is not a collapse


def test_overall_accuracy_weights_cells_by_count():
    scores = [DepthScore("m", "math", 1, 30, 1.0, 1.0), DepthScore("m", "math", 2, 10, 0.0, 1.0)]
    assert overall_accuracy(scores) == pytest.approx(0.75)


def test_shortened_main_job_writes_a_valid_summary_and_every_plot(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        [
            "experiment=dlr_vs_grpo",
            "budget.amount=2e10",
            "data.test_per_depth=1",
            "data.eval_depths=[1,3]",
            "method.seeds=[0,1]",
            "method.eval_every=0.5",
            "method.dlr.alignment.steps=2",
            "method.grpo.max_new_tokens=24",
            "method.samples_per_problem=3",
            "method.pass_at_k=2",
            "eval.max_new_tokens=24",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["experiment"] == "dlr_vs_grpo" and isinstance(summary["device"], str)
    assert summary["budget"] == {"kind": "flops", "amount": 2e10}
    assert set(summary["arms"]) == {"dlr", "grpo"}
    for arm in summary["arms"].values():
        assert arm["seeds"] == [0, 1]
        assert all(len(arm["spent"][k]) == 2 for k in ("seconds", "flops", "generated_tokens"))
        assert all(f >= 2e10 for f in arm["spent"]["flops"])  # each arm ran until its budget was spent
        assert 0 <= arm["train"]["frac_reward_zero_std"] <= 1
        final = arm["final_accuracy"]
        assert len(final["per_seed"]) == 2 and final["ci95"][0] <= final["mean"] <= final["ci95"][1]
        assert final["interval_over"] == "2 seeds x 3 problems"  # one problem at each of depths 1-3
        assert set(arm["accuracy_by_depth"]) == {"1", "2", "3"}
        assert set(arm["sampled_accuracy_by_depth"]) == {"1", "2", "3"}
        sampled, at_k = arm["sampled_accuracy"], arm["pass_at_k"]
        assert sampled["samples_per_problem"] == 3 and len(sampled["per_seed"]) == 2
        assert at_k["k"] == 2 and 0 <= sampled["mean"] <= at_k["mean"] <= 1  # pass@2 >= pass@1
        assert set(at_k["by_depth"]) == {"1", "2", "3"} and at_k["ci95"][0] <= at_k["mean"] <= at_k["ci95"][1]
        assert [p["budget_fraction"] for p in arm["curve"]] == [0.0, 0.5, 1.0]
        assert set(arm["forgetting"]) == {
            "other_task_accuracy_before",
            "other_task_accuracy_after",
            "heldout_nll_before",
            "heldout_nll_after",
        }
        assert set(arm["stability"]) == {"final_accuracy_std", "collapses", "grad_norm_cv"}
        assert arm["main_weights_unchanged"] is True
        assert len(arm["pass_at_k"]["per_seed"]) == 2 and 0 <= arm["pass_at_k"]["mean"] <= 1
        assert len(arm["main_model"]["questions"]) == 2 and all(q > 0 for q in arm["main_model"]["questions"])
    assert summary["pass_at_k"] == 2 and summary["samples_per_problem"] == 3
    # per training question the main model decodes each arm's K: GRPO's 8 completions, DLR's 4 kept chains
    work = {name: a["main_model"] for name, a in summary["arms"].items()}
    assert (
        work["grpo"]["per_question"]["decoded_sequences"] == 8 and work["dlr"]["per_question"]["decoded_sequences"] == 4
    )
    assert (
        work["dlr"]["relative_to_grpo"]["decoded_sequences"] == 0.5 and work["grpo"]["relative_to_grpo"]["flops"] == 1.0
    )
    assert 0 < work["dlr"]["relative_to_grpo"]["forward_positions"] < 1
    dlr = summary["arms"]["dlr"]["forgetting"]
    assert dlr["heldout_nll_before"] == dlr["heldout_nll_after"]  # the frozen main model cannot forget
    starts = {
        (a["forgetting"]["other_task_accuracy_before"], a["forgetting"]["heldout_nll_before"])
        for a in summary["arms"].values()
    }
    assert len(starts) == 1  # one common start for the forgetting check: the frozen main's own chain
    dlr = summary["arms"]["dlr"]
    assert dlr["readout"] == "rationale" and set(dlr["after_alignment"]["accuracy_by_depth"]) == {"1", "2", "3"}
    assert {name: a["method"] for name, a in summary["arms"].items()} == {"dlr": "dlr", "grpo": "grpo"}
    for arm in summary["arms"].values():  # both write their own answer line: their format rates are earned
        assert arm["format_rate_not_applicable"] is None and 0 <= arm["format_rate"] <= 1
    assert dlr["alignment"]["source"] == "shipped" and dlr["alignment"]["steps"] == 1400 + 2
    assert dlr["alignment"]["counted_in_budget"] is False and dlr["alignment"]["flops"] > 1e12
    assert all(set(a["start_accuracy_by_depth"]) == {"1", "2", "3"} for a in summary["arms"].values())
    for image in ("accuracy_vs_budget.png", "accuracy_by_depth.png", "reward_curves.png", "diversity.png"):
        assert (run_dir / image).stat().st_size > 1000
        assert f"({image})" in (run_dir / "report.md").read_text()
    assert "report:" in result.stdout
    assert {p.name for p in (run_dir / "tensorboard").iterdir()} == {
        "dlr_seed_0",
        "dlr_seed_1",
        "grpo_seed_0",
        "grpo_seed_1",
    }
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "grpo_seed_1"))
    events.Reload()
    curve = [e.value for e in events.Scalars("test/budget_fraction")]
    assert curve == [0.0, 0.5, 1.0]  # the test accuracy beside the training metrics, at every evaluation
    accuracy = [e.value for e in events.Scalars("test/accuracy")]
    assert accuracy == pytest.approx([p["accuracy"] for p in grpo_seed_1_curve(run_dir)])
    assert len(events.Scalars("test/accuracy_depth_3")) == 3
    assert summary["trained_depths"] == [1, 6]


def grpo_seed_1_curve(run_dir) -> list[dict]:
    return json.loads((run_dir / "grpo" / "seed_1" / "result.json").read_text())["curve"]


def test_ablation_variants_merge_their_overrides_into_full_dlr(tmp_path):
    from omegaconf import OmegaConf

    from conftest import compose_config
    from dlr.methods.dlr_module import DLRSettings
    from dlr.runner.compare import arm_config

    cfg = compose_config(["experiment=dlr_ablations", f"paths.output_dir={tmp_path}"])
    settings = {
        name: DLRSettings.from_dict(OmegaConf.to_container(arm_config(cfg, name, 0, tmp_path).method, resolve=True))
        for name in cfg.method.arms
        if name != "grpo"
    }
    full = settings["dlr"]
    assert full.rl.contrastive == "dispersion" and not full.rl.contrastive_normalize  # Eq. 8 as written
    assert settings["dlr_dispersion_cosine"].rl.contrastive_normalize
    assert settings["dlr_reward_infonce"].rl.contrastive == "reward_infonce"
    assert settings["dlr_no_contrastive"].rl.contrastive == "none"
    algorithm1 = settings["dlr_algorithm1"]
    assert algorithm1.rl.filter == "none" and algorithm1.rl.num_decoded == full.rl.num_samples
    assert algorithm1.rl.k_explore == 0 and algorithm1.critic.weight == 0 and full.critic.weight > 0
    for name, variant in settings.items():  # everything else is full DLR's
        assert variant.alignment == full.alignment and variant.latent == full.latent, name
        assert name == "dlr_algorithm1" or variant.critic == full.critic, name


def test_dlr_readouts_runs_grpo_and_both_readouts_on_the_main_jobs_budget_seeds_and_test_set(tiny_pair, tmp_path):
    """`experiment=dlr_readouts`: the main job with a third arm, `dlr_latent`, whose one override
    `readout: answer` switches everything a readout decides (recurrent chains, the answer's decode
    budget, its own stage-1 folder, the text evaluation and pass@k score) and nothing else."""
    import dataclasses
    from pathlib import Path

    from omegaconf import OmegaConf

    from conftest import compose_config
    from dlr.data.schema import Record
    from dlr.methods.dlr_module import DLRSettings
    from dlr.methods.stage1 import stage1_folder
    from dlr.runner.compare import arm_config, check_comparison
    from test_dlr import build_module

    cfg = compose_config(["experiment=dlr_readouts", f"paths.output_dir={tmp_path}"])
    main_job = compose_config(["experiment=dlr_vs_grpo", f"paths.output_dir={tmp_path}"])
    assert cfg.task_name == "dlr_readouts" and list(cfg.method.arms) == ["dlr", "dlr_latent", "grpo"]
    for key in ("budget", "data", "eval", "backbone", "reward"):  # same budget, test set and models
        assert cfg[key] == main_job[key], key
    for key in ("seeds", "eval_every", "samples_per_problem", "pass_at_k", "other_task"):
        assert cfg.method[key] == main_job.method[key], key
    assert check_comparison(cfg, [0], tmp_path) == {"dlr": "dlr", "dlr_latent": "dlr", "grpo": "grpo"}

    def settings(config, name: str) -> DLRSettings:
        return DLRSettings.from_dict(OmegaConf.to_container(arm_config(config, name, 0, tmp_path).method, resolve=True))

    rationale, answer = settings(cfg, "dlr"), settings(cfg, "dlr_latent")
    assert rationale == settings(main_job, "dlr")  # arm dlr is the main job's DLR
    assert (rationale.readout, rationale.latent.mode, rationale.decode_tokens) == ("rationale", "parallel", 64)
    assert (answer.readout, answer.latent.mode) == ("answer", "recurrent")  # latent.mode null: the readout's
    assert answer.decode_tokens == cfg.backbone.dlr_scale.answer_tokens == 4
    assert dataclasses.replace(answer, readout="rationale", latent=rationale.latent) == rationale  # nothing else
    shipped = Path(answer.alignment.init_from)  # one folder, a sub-folder per readout
    assert stage1_folder(shipped, "answer") == shipped / "answer"
    assert stage1_folder(shipped, "rationale") == shipped / "rationale"

    module = build_module(tiny_pair, answer)  # the arm's module reads and scores as the answer readout
    assert (module.readout.kind, module.readout.max_new_tokens, module.policy.mode) == ("answer", 4, "recurrent")
    records = [Record(f"q{i}", "math", f"ana has {i} pens . how many pens ?", "x", str(i), 1, "t") for i in range(2)]
    assert all(text.startswith("####") for text in module.greedy_completions(records))  # evaluation
    assert all(text.startswith("####") for attempts in module.sample_attempts(records, 2) for text in attempts)


def test_the_answer_readout_arm_of_dlr_readouts_reports_its_stage1_scores_and_no_format_rate(tmp_path):
    """dlr_latent through the comparison runner (its own 2-step stage 1 in place of the shipped one,
    a few problems): summary.json holds its greedy accuracy after stage 1 by depth and marks its
    format rate not applicable, while the per-seed result keeps the raw scores (format 1 everywhere)."""
    run_dir = tmp_path / "run"
    result = run_train(
        [
            "experiment=dlr_readouts",
            "method.arms=[dlr_latent]",
            "method.seeds=[0]",
            "budget.amount=1e10",
            "data.test_per_depth=1",
            "data.eval_depths=[1,2]",
            "method.eval_every=1.0",
            "method.pass_at_k=2",
            "+method.variants.dlr_latent.overrides.alignment.init_from=null",
            "+method.variants.dlr_latent.overrides.alignment.steps=2",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    latent = json.loads((run_dir / "summary.json").read_text())["arms"]["dlr_latent"]
    assert (latent["method"], latent["readout"]) == ("dlr", "answer")
    assert set(latent["after_alignment"]["accuracy_by_depth"]) == {"1", "2"}
    assert latent["format_rate"] is None and latent["format_rate_by_depth"] is None
    assert "not earned" in latent["format_rate_not_applicable"]
    assert 0 <= latent["pass_at_k"]["mean"] <= 1
    raw = json.loads((run_dir / "dlr_latent" / "seed_0" / "result.json").read_text())
    assert raw["arm_info"]["free_answer_cue"] is True and all(s["format_rate"] == 1.0 for s in raw["final_scores"])
    assert "| dlr_latent | DLR, `answer` readout |" in (run_dir / "report.md").read_text()


def test_dlr_readouts_without_the_answer_readouts_stage1_stops_before_any_model_loads(tmp_path):
    """Until `data/backbones/tiny/dlr_stage1/answer/` is shipped, the comparison stops at once naming
    the arm, the folder and the command that builds it, not after GRPO and the rationale arm trained."""
    from pathlib import Path

    from conftest import compose_config
    from dlr.runner.compare import check_shipped_stage1

    shipped = tmp_path / "dlr_stage1"
    shipped.mkdir()
    root = Path(__file__).resolve().parents[1]
    (shipped / "rationale").symlink_to(root / "data" / "backbones" / "tiny" / "dlr_stage1" / "rationale")
    result = run_train(
        ["experiment=dlr_readouts", f"backbone.dlr_scale.stage1={shipped}", f"hydra.run.dir={tmp_path / 'run'}"],
        timeout=120,
    )
    assert result.returncode != 0
    assert f"error: arm dlr_latent: method.alignment.init_from={shipped} holds no" in result.stderr
    assert f"{shipped / 'answer'}" in result.stderr
    assert "`python src/train.py experiment=dlr_stage1_tiny_answer`" in result.stderr
    assert "Loading weights" not in result.stderr and not (tmp_path / "run" / "dlr").exists()

    (shipped / "answer").mkdir()  # once both readouts' files are there, the check passes
    for name in ("stage1.safetensors", "stage1.json"):
        (shipped / "answer" / name).write_text("")
    cfg = compose_config(["experiment=dlr_readouts", f"backbone.dlr_scale.stage1={shipped}"])
    check_shipped_stage1(cfg, {"dlr": "dlr", "dlr_latent": "dlr", "grpo": "grpo"}, [0], tmp_path)


def test_report_of_a_continual_run_shows_retention_and_missing_forgetting_as_dashes(tmp_path):
    from dlr.report.report import SeedResult, arm_summary, write_report

    def seed_result(seed: int, math_after_logic: float) -> SeedResult:
        score = cell("logic", 1, 10, 6)
        return SeedResult(
            seed=seed,
            curve=[{"budget_fraction": 0.0, "accuracy": 0.5}, {"budget_fraction": 1.0, "accuracy": 0.6}],
            final_scores=[score],
            spent=SPENT,
            other_task_before=None,
            other_task_after=None,
            heldout_nll_before=None,
            heldout_nll_after=None,
            grad_norm_cv=0.1,
            protected_unchanged=True,
            trace={"reward": [[0.5, 1.0]], "grad_norm": [], "diversity": []},
            retention={
                "synthetic_math": {"synthetic_math": 0.9},
                "synthetic_logic": {"synthetic_math": math_after_logic, "synthetic_logic": 0.6},
            },
        )

    results = {"grpo": [seed_result(0, 0.7), seed_result(1, 0.5)]}
    summary = {
        "experiment": "continual_math_logic",
        "device": "CPU",
        "budget": {"kind": "seconds", "amount": 1.0},
        "arms": {"grpo": arm_summary(results["grpo"], "grpo", 4)},
    }
    short = write_report(summary, results, tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["arms"]["grpo"]["continual"]["synthetic_logic"]["synthetic_math"] == pytest.approx(0.6)
    assert saved["arms"]["grpo"]["forgetting"]["heldout_nll_before"] is None and saved["ranking"] == ["grpo"]
    report = (tmp_path / "report.md").read_text()
    assert "| grpo | synthetic_logic | 60.0% | 60.0% |" in report and "| grpo | – | – | – | – |" in report
    assert len(short) == 3 and "60.0%" in short[1] and "unchanged in every run: yes" in short[2]


def test_an_arm_given_the_answer_cue_reports_no_format_rate_and_the_others_keep_theirs(tmp_path):
    """DLR's answer readout reads `<eol> ####` and gets `####` put back in front of its answer, so its
    format rate of 1 is not earned: null in summary.json and n/a in report.md, with the reason; GRPO and
    the rationale readout, which write their own answer line, keep their numbers. Every arm says what it is."""
    from dlr.report.report import SeedResult, arm_summary, write_report

    def result(format_rate_at_depth_1: float, arm_info: dict) -> SeedResult:
        scores = [cell("math", 1, 10, 5, format_rate_at_depth_1), cell("math", 2, 30, 15)]
        return SeedResult(
            seed=0,
            curve=[{"budget_fraction": 0.0, "accuracy": 0.5}, {"budget_fraction": 1.0, "accuracy": 0.5}],
            final_scores=scores,
            spent=SPENT,
            other_task_before=None,
            other_task_after=None,
            heldout_nll_before=None,
            heldout_nll_after=None,
            grad_norm_cv=0.1,
            protected_unchanged=True,
            trace={"reward": [[0.5, 1.0], [1.0, 1.2]], "grad_norm": [], "diversity": []},
            start_scores=scores,
            arm_info=arm_info,
        )

    def dlr_info(readout: str, free_answer_cue: bool) -> dict:
        alignment = {"source": "shipped", "steps": 1, "flops": 1e12, "process_seconds": 1.0, "counted_in_budget": False}
        after = [{"model": "m", "task": "math", "depth": 1, "n": 10, "accuracy": 0.9, "format_rate": 1.0}]
        return {
            "readout": readout,
            "free_answer_cue": free_answer_cue,
            "filter": "critic",
            "alignment": alignment,
            "after_alignment": after,
        }

    results = {
        "dlr": [result(0.6, dlr_info("rationale", False))],
        "dlr_latent": [result(1.0, dlr_info("answer", True))],
        "grpo": [result(0.2, {})],
    }
    methods = {"dlr": "dlr", "dlr_latent": "dlr", "grpo": "grpo"}
    summary = {
        "experiment": "dlr_readouts",
        "device": "CPU",
        "budget": {"kind": "flops", "amount": 1e12},
        "arms": {name: arm_summary(seeds, methods[name], 4) for name, seeds in results.items()},
    }
    write_report(summary, results, tmp_path)
    arms = json.loads((tmp_path / "summary.json").read_text())["arms"]
    assert {name: (a["method"], a.get("readout")) for name, a in arms.items()} == {
        "dlr": ("dlr", "rationale"),
        "dlr_latent": ("dlr", "answer"),
        "grpo": ("grpo", None),
    }
    assert arms["dlr"]["format_rate"] == pytest.approx((0.6 * 10 + 1.0 * 30) / 40)  # count-weighted: 0.9
    assert arms["dlr"]["format_rate_by_depth"] == {"1": pytest.approx(0.6), "2": 1.0}
    assert arms["grpo"]["format_rate"] == pytest.approx((0.2 * 10 + 1.0 * 30) / 40)  # 0.8
    assert arms["dlr"]["format_rate_not_applicable"] is None and arms["grpo"]["format_rate_not_applicable"] is None
    latent = arms["dlr_latent"]
    assert latent["format_rate"] is None and latent["format_rate_by_depth"] is None
    assert (
        "`<eol> ####`" in latent["format_rate_not_applicable"] and "not earned" in latent["format_rate_not_applicable"]
    )
    assert latent["after_alignment"]["accuracy_by_depth"] == {"1": 0.9}
    report = (tmp_path / "report.md").read_text()
    ranking = {name: f"| {rank} | {name} | " for rank, name in enumerate(results, 1)}  # equal accuracy: arm order
    rows = {
        name: next(line for line in report.splitlines() if line.startswith(start)) for name, start in ranking.items()
    }
    assert "| DLR, `rationale` readout |" in rows["dlr"] and "| 90.0% |" in rows["dlr"]
    assert "| DLR, `answer` readout |" in rows["dlr_latent"] and "| n/a (cue given) |" in rows["dlr_latent"]
    assert "| GRPO |" in rows["grpo"] and "| 80.0% |" in rows["grpo"]
    assert "dlr_latent: readout `answer` (format rate not applicable: the main's input ends with" in report


def test_unbiased_pass_at_k_by_hand():
    from dlr.scoring import unbiased_pass_at_k

    assert unbiased_pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert unbiased_pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert unbiased_pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 = c/n, the sampled accuracy
    assert unbiased_pass_at_k(4, 3, 2) == 1.0  # C(1, 2) = 0: any two of the four hold a right one
    assert unbiased_pass_at_k(4, 0, 4) == 0.0 and unbiased_pass_at_k(4, 1, 4) == 1.0  # k = n: any of them
    with pytest.raises(ValueError, match="1 <= k <= n"):
        unbiased_pass_at_k(4, 1, 5)


def test_sampled_attempts_give_each_problem_s_count_of_right_ones():
    from conftest import reward_from_yaml
    from dlr.data.schema import Record
    from dlr.scoring import sampled_by_depth

    records = [Record(f"q{i}", "math", f"question {i}", "cot", str(i), 1, "test") for i in range(3)]
    records.append(Record("q3", "math", "question 3", "cot", "3", 2, "test"))
    attempts = {
        "0": ["#### 5", "#### 0", "#### 0"],
        "1": ["#### 7", "####", "#### 1"],
        "2": ["#### 9", "#### 8", "#### 7"],
        "3": ["#### 3", "#### 3", "#### 3"],
    }
    scores = sampled_by_depth(
        records,
        lambda chunk, n: [attempts[r.answer][:n] for r in chunk],
        3,
        label="m",
        batch_size=2,
        reward=reward_from_yaml(),
    )
    assert [(s.depth, s.ids, s.correct_counts) for s in scores] == [
        (1, ("q0", "q1", "q2"), (2, 1, 0)),
        (2, ("q3",), (3,)),
    ]
    depth_1 = scores[0]
    assert depth_1.pass_at(1) == pytest.approx((2 / 3, 1 / 3, 0.0))  # sampled accuracy, problem by problem
    assert depth_1.pass_at(2) == pytest.approx((1.0, 2 / 3, 0.0))  # 1 - C(1,2)/C(3,2), 1 - C(2,2)/C(3,2)
    assert depth_1.format_rate == pytest.approx(8 / 9)  # "####" alone is not well formed
    with pytest.raises(ValueError, match="2 attempts at problem q0, 3 asked for"):
        sampled_by_depth(
            records,
            lambda chunk, n: [["#### 0"] * 2 for _ in chunk],
            3,
            label="m",
            batch_size=4,
            reward=reward_from_yaml(),
        )


def test_the_sampled_metrics_of_an_arm_by_depth_and_over_seeds():
    """Two seeds, n = 4 attempts at 2 problems of depth 1 and 1 of depth 2: seed 0 gets 4, 0 and 2
    right, seed 1 gets 2, 2 and 2. Sampled accuracy: seed 0 (1 + 0 + 0.5) / 3 = 0.5, seed 1 0.5.
    pass@2 = 1 - C(4-c, 2)/C(4, 2): c = 4 -> 1, c = 0 -> 0, c = 2 -> 1 - 1/6 = 5/6, so seed 0
    (1 + 0 + 5/6) / 3 = 11/18 and seed 1 5/6."""
    from dlr.report.report import SeedResult, sampled_summary
    from dlr.scoring import SampledScore

    def seed(counts: tuple[int, int, int]) -> SeedResult:
        sampled = [
            SampledScore("m", "math", 1, 4, ("a", "b"), counts[:2], 1.0),
            SampledScore("m", "math", 2, 4, ("c",), counts[2:], 1.0),
        ]
        return SeedResult(0, [], [], SPENT, None, None, None, None, 0.0, True, sampled=sampled)

    summary = sampled_summary([seed((4, 0, 2)), seed((2, 2, 2))], 2)
    accuracy = summary["sampled_accuracy"]
    assert accuracy["per_seed"] == pytest.approx([0.5, 0.5]) and accuracy["samples_per_problem"] == 4
    assert summary["sampled_accuracy_by_depth"] == pytest.approx({"1": (1 + 0 + 0.5 + 0.5) / 4, "2": 0.5})
    at_2 = summary["pass_at_k"]
    assert at_2["k"] == 2 and at_2["per_seed"] == pytest.approx([11 / 18, 5 / 6])
    assert at_2["mean"] == pytest.approx((11 / 18 + 5 / 6) / 2) and at_2["interval_over"] == "2 seeds x 3 problems"
    assert at_2["by_depth"] == pytest.approx({"1": (1 + 0 + 5 / 6 + 5 / 6) / 4, "2": 5 / 6})
    assert at_2["ci95"][0] <= at_2["mean"] <= at_2["ci95"][1]
    with pytest.raises(ValueError, match="pass@5 needs 1 <= k <= the 4 samples"):
        sampled_summary([seed((4, 0, 2))], 5)
    assert sampled_summary([SeedResult(0, [], [], SPENT, None, None, None, None, 0.0, True)], 2)["pass_at_k"] is None


def test_only_passes_charged_to_the_main_model_count_as_its_work():
    """Two costs equal in value, one of them the main's: only passes charged with the main's own object
    count. Generation of 2 rows, 4 new tokens after 3 prompt positions: 2 sequences, 2 x (3 + 4 - 1) = 12
    positions; a teacher-forced pass over 10 positions adds 10, its backward nothing."""
    from dlr.accounting import ModelCost
    from dlr.methods.rl_base import RLModule

    module = RLModule(SimpleNamespace(max_consecutive_nonfinite=5), reward=None)
    module.main_cost, other = ModelCost(20, 40), ModelCost(20, 40)
    module.charge_generation(module.main_cost, 2, 3, 4)
    module.charge(module.main_cost, 10, 3, "activations")
    module.charge(other, 100, 1)
    module.charge_generation(other, 5, 3, 4)
    module.charge_generation(module.main_cost, 2, 3, 0)  # nothing generated, nothing decoded
    assert (module.main_decoded_sequences, module.main_forward_positions) == (2, 22)
    # FLOPs count every pass: the main's generation 2 x 20 x 12 + 2 x 40 x 8 = 1120, its pass with backward
    # 2 x (2 x 20 x 10 + 2 x 40 x 3) = 1280; the other's pass 2 x 20 x 100 + 2 x 40 = 4080 and generation
    # 5 x (2 x 20 x 6 + 2 x 40 x 4) = 2800
    assert float(module.flops_spent) == pytest.approx(1120 + 1280 + 4080 + 2800)


def test_main_model_work_per_question_relative_to_grpo():
    """DLR: 40 decodes and 4000 positions over 10 questions (4 and 400 a question); GRPO: 80 and 16000 over
    10 (8 and 1600): DLR's decodes are 50% of GRPO's, its positions 25%, its FLOPs (2e12 vs 2e12) 100%."""
    from dlr.report.report import main_model_work, relative_to_grpo

    dlr = main_model_work([SimpleNamespace(spent=SPENT)] * 2)
    grpo_spent = {**SPENT, "main_decoded_sequences": 80, "main_forward_positions": 16000}
    grpo = main_model_work([SimpleNamespace(spent=grpo_spent)])
    assert dlr["per_question"] == {"decoded_sequences": 4.0, "forward_positions": 400.0, "flops": 2e11}
    ratios = relative_to_grpo(
        {"dlr": {"method": "dlr", "main_model": dlr}, "grpo": {"method": "grpo", "main_model": grpo}}
    )
    assert ratios["dlr"] == {"baseline": "grpo", "decoded_sequences": 0.5, "forward_positions": 0.25, "flops": 1.0}
    assert ratios["grpo"]["decoded_sequences"] == 1.0
    assert relative_to_grpo({"dlr": {"method": "dlr", "main_model": dlr}}) == {"dlr": None}


def test_a_hydra_sweep_runs_one_comparison_per_value(tmp_path):
    result = run_train(
        [
            "-m",
            "experiment=dlr_vs_grpo",
            "method.arms=[dlr]",
            "method.seeds=[0]",
            "budget.amount=1e10",
            "data.test_per_depth=1",
            "data.eval_depths=[1,1]",
            "method.samples_per_problem=0",
            "method.eval_every=1.0",
            "method.dlr.alignment.steps=1",
            "method.dlr.rl.lambda_con=0,0.5",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={tmp_path}",
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, lambda_con in (("0", "0"), ("1", "0.5")):
        assert (tmp_path / job / "summary.json").exists()
        assert f"lambda_con: {lambda_con}\n" in (tmp_path / job / "config_resolved.yaml").read_text()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("budget.amount=0", "budget.amount must be > 0"),
        ("budget.kind=joules", "budget.kind must be one of"),
        ("budget.amount_flops=-1", "budget.amount_flops must be > 0"),
        ("method.grpo.loss_type=ppo", "method.loss_type must be one of"),
        ("method.dlr.rl.num_decoded=99", "num_decoded"),
        ("method.dlr.readout=soft", "method.readout must be one of"),
        ("method.dlr.max_new_tokens.rationale=2", "method.max_new_tokens.rationale must exceed"),
        ("method.dlr.latent.steps=0", "method.dlr.latent.steps must be an integer >= 1"),
        ("method.pass_at_k=5", "method.pass_at_k must be an integer in [1, method.samples_per_problem=4], got 5"),
        ("method.samples_per_problem=-1", "method.samples_per_problem must be an integer >= 0, got -1"),
    ],
)
def test_a_bad_comparison_setting_fails_before_any_model_loads(tmp_path, override, message):
    result = run_train(["experiment=dlr_vs_grpo", *override.split(), f"hydra.run.dir={tmp_path}"], timeout=120)
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "dlr").exists()  # no arm started
