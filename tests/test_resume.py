"""A run killed with SIGKILL resumes from its last checkpoint to the same metrics as an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, run_train

COMMON = [
    "experiment=dlr",
    "data.test_per_depth=1",
    "data.batch_size=4",
    "method.rl.num_samples=6",
    "method.rl.num_decoded=3",
    "method.alignment.steps=3",
    "method.rl.steps=25",
    "method.critic.warmup=2",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.reward_filter=null",
    "callbacks.latent_diversity=null",
    "trainer.enable_progress_bar=false",
    "eval.modes=[direct]",
]


def rewards_by_step(run_dir) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/reward"]) for r in csv.DictReader(f) if r.get("train/reward")}


def checkpoint_step(path) -> int:
    try:
        return torch.load(path, weights_only=False, map_location="cpu")["global_step"]
    except Exception:  # not written yet
        return -1


def test_a_killed_dlr_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    full = run_train([*COMMON, f"hydra.run.dir={tmp_path / 'full'}"], timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "src" / "train.py"), *COMMON, f"hydra.run.dir={killed_dir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    last = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while checkpoint_step(last) < 8 and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)  # mid stage 2, at whatever step it has reached
    process.wait()
    killed_at = checkpoint_step(last)
    assert 8 <= killed_at < 28, killed_at  # killed mid-run, with a readable checkpoint
    kept = rewards_by_step(killed_dir)  # written at each checkpoint: the kill lost at most one interval
    assert max(kept) >= killed_at - 1 and kept == {s: rewards_by_step(tmp_path / "full")[s] for s in kept}

    resumed_dir = tmp_path / "resumed"
    resumed = run_train([*COMMON, f"ckpt_path={last}", f"hydra.run.dir={resumed_dir}"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = rewards_by_step(tmp_path / "full"), rewards_by_step(resumed_dir)
    assert got and min(got) > killed_at and max(got) == 28
    assert {s: expected[s] for s in got} == got  # the same rewards step for step: bitwise on this CPU
    scores = lambda d: json.loads((d / "eval.json").read_text())["scores"]  # noqa: E731
    assert scores(resumed_dir) == scores(tmp_path / "full")


def test_a_killed_comparison_reruns_in_its_folder_and_finishes(tmp_path):
    """Killed during GRPO: the rerun reads DLR's finished result and resumes GRPO from its checkpoint."""
    args = [
        "experiment=dlr_vs_grpo",
        "method.seeds=[0]",
        "budget.amount=1e11",
        "data.test_per_depth=1",
        "data.eval_depths=[1,2]",
        "method.eval_every=0.5",
        "method.samples_per_problem=0",
        "method.dlr.alignment.steps=2",
        "method.grpo.max_new_tokens=16",
        "eval.max_new_tokens=16",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path}",
    ]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "src" / "train.py"), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    grpo_last = tmp_path / "grpo" / "seed_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 400
    while checkpoint_step(grpo_last) < 1 and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    dlr_result = tmp_path / "dlr" / "seed_0" / "result.json"
    assert dlr_result.exists() and not (tmp_path / "grpo" / "seed_0" / "result.json").exists()
    killed_at, dlr_written = checkpoint_step(grpo_last), dlr_result.stat().st_mtime
    assert killed_at >= 1

    rerun = run_train(args, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert dlr_result.stat().st_mtime == dlr_written  # read, not retrained
    log = (tmp_path / "train.log").read_text()
    assert "dlr seed 0: finished earlier" in log and "grpo seed 0: resuming from" in log
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["arms"]) == {"dlr", "grpo"}
    assert summary["arms"]["grpo"]["spent"]["flops"][0] >= 1e11  # the budget meter went on from its checkpoint
    assert [p["budget_fraction"] for p in summary["arms"]["grpo"]["curve"]] == [0.0, 0.5, 1.0]
