"""Continual runs whose phases are depth ranges of one task (experiment=continual_within_math, issue 33)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import compose_config, run_train
from dlr.runner.compare import phase_datamodule, phase_name, phase_test_records


def test_a_depth_phase_trains_its_depths_and_retention_reads_them_on_the_fixed_test_set():
    cfg = compose_config(["experiment=continual_within_math"])
    shallow, deep = cfg.method.phases
    assert (phase_name(shallow), phase_name(deep), phase_name("synthetic_logic")) == (
        "depths_1-3",
        "depths_4-6",
        "synthetic_logic",
    )
    data = phase_datamodule(cfg, deep)
    assert (data.source, data.train_spec.min_depth, data.train_spec.max_depth) == ("synthetic_math", 4, 6)
    full = data.test_records()
    assert full == phase_datamodule(cfg, shallow).test_records()  # one fixed test set for every phase
    kept = phase_test_records(cfg, shallow)
    assert {r.depth for r in kept} == {1, 2, 3} and kept == [r for r in full if r.depth <= 3]
    gsm8k = compose_config(
        [
            "experiment=dlr_vs_grpo_gsm8k",
            "data.train_path=data/fixtures/gsm8k_train.jsonl",
            "data.test_path=data/fixtures/gsm8k_test.jsonl",
        ]
    )
    logic = phase_datamodule(gsm8k, "synthetic_logic")  # another source reads none of the configured local files
    assert logic.source == "synthetic_logic" and logic.train_file_setting == ("data.local_path", None)
    with pytest.raises(SystemExit, match="a method.phases entry is a data source or"):
        phase_datamodule(cfg, OmegaConf.create({"name": "x", "data": {}, "budget": 1}))


def test_the_within_math_run_reports_each_phase_after_each_phase(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        [
            "experiment=continual_within_math",
            "method.arms=[grpo]",
            "method.seeds=[0]",
            "budget.amount=1e10",
            "data.test_per_depth=1",
            "method.eval_every=1.0",
            "method.samples_per_problem=0",
            "method.grpo.max_new_tokens=24",
            "eval.max_new_tokens=24",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "INFO: " not in output and "💡" not in output  # Lightning's lines once, through Hydra's handlers
    assert "LeafSpec" not in output and "module(s) in eval mode" not in output  # known warnings hidden
    assert output.count("GPU available") == 2 and (run_dir / "train.log").read_text().count("GPU available") == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    continual = summary["arms"]["grpo"]["continual"]
    assert list(continual) == ["depths_1-3", "depths_4-6"]
    assert list(continual["depths_1-3"]) == ["depths_1-3"]
    assert list(continual["depths_4-6"]) == ["depths_1-3", "depths_4-6"]  # depths 1-3 again: what was kept
    assert "## Continual" in (run_dir / "report.md").read_text()
