"""Two CPU processes under DDP (`trainer=ddp_cpu`, gloo) run the main job's two arms: each rank samples
its own rollouts, metrics and the budget are reduced over ranks, and only rank 0 writes."""

from __future__ import annotations

import csv
import json

import torch

from conftest import run_train


def last_logged(metrics_csv, key: str) -> float:
    return [float(row[key]) for row in csv.DictReader(metrics_csv.open()) if row.get(key)][-1]


def test_both_arms_train_on_two_cpu_processes_and_only_rank_zero_writes(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        [
            "experiment=dlr_vs_grpo",
            "trainer=ddp_cpu",
            "trainer.max_steps=4",
            "trainer.log_every_n_steps=1",
            "budget.kind=flops",
            "budget.amount=1e15",
            "method.seeds=[0]",
            "method.eval_every=1",
            "method.dlr.alignment.steps=2",
            "method.grpo.max_new_tokens=24",
            "method.samples_per_problem=0",
            "callbacks.latent_diversity.every_n_steps=1",
            "data.test_per_depth=1",
            "data.eval_depths=[1,2]",
            "eval.max_new_tokens=24",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr  # two processes joined (Lightning logs through Hydra)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["arms"]) == {"dlr", "grpo"}
    assert sorted(p.name for p in run_dir.rglob("*.ckpt")) == ["last.ckpt", "last.ckpt"]  # one per arm, no rank copies
    for arm in ("dlr", "grpo"):
        seed_dir = run_dir / arm / "seed_0"
        assert (seed_dir / "result.json").exists() and not list(seed_dir.glob("*.tmp"))
        checkpoint = torch.load(seed_dir / "checkpoints" / "last.ckpt", weights_only=False)
        assert checkpoint["global_step"] == 4
        rank_states = checkpoint["rng_states"]  # each rank resumes its own sampling stream
        assert len(rank_states) == 2 and not torch.equal(rank_states[0]["torch"], rank_states[1]["torch"])

    # The budget adds up both ranks' tokens; the logged metric is the mean of the ranks' counters.
    grpo = json.loads((run_dir / "grpo" / "seed_0" / "result.json").read_text())
    mean_per_rank = last_logged(run_dir / "grpo" / "seed_0" / "csv" / "metrics.csv", "train/num_tokens")
    assert grpo["spent"]["generated_tokens"] == 2 * mean_per_rank
    # DLR reached latent RL on both ranks, and its rollout diagnostics were reduced and logged.
    assert last_logged(run_dir / "dlr" / "seed_0" / "csv" / "metrics.csv", "latent/effective_rank") > 0


def test_a_resumed_ddp_run_samples_what_the_uninterrupted_run_sampled(tmp_path):
    """Each rank restores its own random state (rank 1's too, from rank 0's file) and data position."""
    common = [
        "experiment=grpo",
        "trainer=ddp_cpu",
        "trainer.log_every_n_steps=1",
        "method.max_new_tokens=16",
        "data.test_per_depth=1",
        "data.eval_depths=[1,1]",
        "eval.modes=[direct]",
        "eval.max_new_tokens=8",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "trainer.enable_progress_bar=false",
    ]
    runs = {}
    for name, extra in (
        ("whole", ["trainer.max_steps=4"]),
        ("first", ["trainer.max_steps=2"]),
        ("resumed", ["trainer.max_steps=4", f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"]),
    ):
        result = run_train([*common, *extra, f"hydra.run.dir={tmp_path / name}"], timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = csv.DictReader((tmp_path / name / "csv" / "metrics.csv").open())
        runs[name] = {
            int(r["step"]): (r["train/reward"], r["train/entropy"], r["train/completions/mean_length"])
            for r in rows
            if r.get("train/reward")
        }  # the means over both ranks' rollouts
    assert len(set(runs["whole"].values())) == 4  # the steps differ, so equal steps below are no accident
    assert runs["first"][2] == runs["whole"][2]
    assert (runs["resumed"][3], runs["resumed"][4]) == (runs["whole"][3], runs["whole"][4])  # bitwise: as logged
