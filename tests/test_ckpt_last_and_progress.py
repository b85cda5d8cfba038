"""`ckpt_path=last` resumes the newest checkpoint of the task, a missing checkpoint fails before any model
loads, and the progress bar counts steps and budget instead of epochs of an endless stream."""

from __future__ import annotations

import itertools
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from conftest import compose_config, run_train
from dlr.callbacks.budget import BudgetMeter
from dlr.callbacks.progress import StepProgressBar, done_fraction, step_description
from dlr.resume import resolve_ckpt_path


def fake_checkpoint(folder, mtime: float):
    """`folder/checkpoints/last.ckpt`, last written at `mtime`."""
    path = folder / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"ckpt")
    os.utime(path, (mtime, mtime))
    return path


def test_last_is_the_most_recently_written_last_ckpt_of_the_task(tmp_path):
    task_dir = tmp_path / "grpo"
    fake_checkpoint(task_dir / "2025-01-01_00-00-00-000000", mtime=1000)
    resumed_later = fake_checkpoint(task_dir / "2025-01-02_00-00-00-000000", mtime=3000)  # an older run, resumed
    fake_checkpoint(task_dir / "2025-01-03_00-00-00-000000", mtime=2000)
    (task_dir / "2025-01-04_00-00-00-000000").mkdir()  # the run starting now: no checkpoint yet
    fake_checkpoint(tmp_path / "dlr" / "2025-01-05_00-00-00-000000", mtime=4000)  # another task's

    assert resolve_ckpt_path("last", task_dir, comparison=False) == str(resumed_later)


def test_last_without_any_checkpoint_fails_in_one_line(tmp_path):
    (tmp_path / "grpo" / "2025-01-01_00-00-00-000000").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        resolve_ckpt_path("last", tmp_path / "grpo", comparison=False)
    message = str(exit_info.value)
    assert message.startswith("error: ckpt_path=last: no checkpoint to resume")
    assert str(tmp_path / "grpo") in message and "\n" not in message


def test_an_existing_path_is_kept_and_no_path_means_a_fresh_start(tmp_path):
    path = fake_checkpoint(tmp_path / "run", mtime=1000)
    assert resolve_ckpt_path(str(path), tmp_path, comparison=False) == str(path)
    assert resolve_ckpt_path(None, tmp_path, comparison=False) is None


def test_a_comparison_names_the_folder_of_its_newest_unfinished_run(tmp_path):
    task_dir = tmp_path / "dlr_vs_grpo"
    interrupted = task_dir / "2025-01-01_00-00-00-000000"
    fake_checkpoint(interrupted / "dlr" / "seed_0", mtime=1000)
    finished = task_dir / "2025-01-02_00-00-00-000000"
    fake_checkpoint(finished / "dlr" / "seed_0", mtime=2000)
    (finished / "dlr" / "seed_0" / "result.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        resolve_ckpt_path("last", task_dir, comparison=True)
    message = str(exit_info.value)
    assert message.startswith("error: a comparison takes no ckpt_path")
    assert message.endswith(f"hydra.run.dir={interrupted}")


def test_run_resumes_the_newest_checkpoint_and_says_which(tmp_path, monkeypatch, capsys):
    from dlr import runner

    newest = fake_checkpoint(tmp_path / "logs" / "grpo" / "2025-01-01_00-00-00-000000", mtime=1000)
    seen = {}
    monkeypatch.setitem(runner.METHODS, "grpo", lambda cfg, out: seen.setdefault("ckpt_path", cfg.ckpt_path))
    cfg = compose_config(
        [
            "experiment=grpo",
            "ckpt_path=last",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"paths.output_dir={tmp_path / 'run'}",
        ]
    )
    runner.run(cfg)
    assert seen["ckpt_path"] == str(newest)
    assert capsys.readouterr().out.splitlines() == [f"ckpt_path=last: resuming from {newest}"]


def test_a_missing_checkpoint_fails_before_any_model_loads(tmp_path, monkeypatch):
    from dlr import runner

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    monkeypatch.setattr("dlr.runner.arms.load_main", no_model)
    missing = tmp_path / "nowhere" / "last.ckpt"
    cfg = compose_config(["experiment=grpo", f"ckpt_path={missing}", f"paths.output_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_info:
        runner.run(cfg)
    assert str(exit_info.value) == f"error: ckpt_path={missing}: no such checkpoint file"


def test_train_py_with_a_missing_checkpoint_exits_naming_it(tmp_path):
    missing = tmp_path / "nonexistent.ckpt"
    result = run_train(["experiment=grpo", f"ckpt_path={missing}", f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode != 0
    assert f"error: ckpt_path={missing}: no such checkpoint file" in result.stderr
    assert "Traceback" not in result.stderr


def meter_spent(seconds: float, amount: float = 10.0) -> BudgetMeter:
    meter = BudgetMeter("seconds", amount)
    meter.seconds = seconds
    return meter


def test_the_bar_shows_steps_out_of_max_steps_and_the_budget_spent():
    trainer = SimpleNamespace(global_step=3, max_steps=10, callbacks=[meter_spent(4.0)])
    assert step_description(trainer) == "step 3/10 · budget 40%"
    assert done_fraction(trainer) == pytest.approx(0.4)  # the budget ends training before max_steps here


def test_a_budgeted_arm_without_max_steps_shows_no_negative_total():
    trainer = SimpleNamespace(global_step=3, max_steps=-1, callbacks=[meter_spent(1.5)])
    assert step_description(trainer) == "step 3 · budget 15%"
    assert done_fraction(trainer) == pytest.approx(0.15)
    unbounded = SimpleNamespace(global_step=3, max_steps=-1, callbacks=[])
    assert step_description(unbounded) == "step 3"
    assert done_fraction(unbounded) is None


def test_the_warm_start_shows_steps_out_of_max_steps():
    trainer = SimpleNamespace(global_step=250, max_steps=2000, callbacks=[])
    assert step_description(trainer) == "step 250/2000"
    assert done_fraction(trainer) == pytest.approx(0.125)


class EndlessStream(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.ones(2)


class TinyRegression(L.LightningModule):
    """A `BudgetedModule` that counts nothing: the fake clock alone spends the budget."""

    stage = "rl"

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.flops_spent, self.generated_tokens = 0.0, 0
        self.main_decoded_sequences, self.main_forward_positions = 0, 0
        self.last_reward = self.last_grad_norm = self.last_rollout = self.last_scores = None

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_real_fit_on_an_endless_stream_ends_with_steps_and_budget_on_the_bar(tmp_path):
    ticks = itertools.count()  # each batch is charged one "second" of a 10-second budget
    meter = BudgetMeter("seconds", 10.0, clock=lambda: float(next(ticks)))
    bar = StepProgressBar()
    trainer = L.Trainer(
        max_epochs=-1,
        max_steps=4,
        callbacks=[meter, bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyRegression(), train_dataloaders=DataLoader(EndlessStream(), batch_size=2))
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert task.description == "step 4/4 · budget 40%"
    assert (task.completed, task.total) == (1.0, 1.0)  # max_steps came first
