"""The configuration behaves as the README promises: every experiment composes, mistakes fail clearly."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose_config, run_train
from dlr.cli import normalize_cli_args

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUPS = (
    "experiment",
    "backbone",
    "data",
    "method",
    "reward",
    "budget",
    "trainer",
    "callbacks",
    "logger",
    "paths",
    "hydra",
)


def test_every_config_group_exists():
    assert all((CONFIG_DIR / group).is_dir() for group in GROUPS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    from dlr.runner import METHODS

    assert resolved["method"]["name"] in METHODS
    assert resolved["trainer"]["default_root_dir"] == str(tmp_path)


@pytest.mark.parametrize("data", ["synthetic_math", "synthetic_logic", "mixed", "gsm8k", "math500", "prontoqa"])
def test_every_data_choice_composes(data):
    cfg = compose_config([f"data={data}"])
    assert cfg.data.source == data


def test_overrides_reach_the_trainer_config():
    cfg = compose_config(
        ["trainer.max_steps=7", "trainer.precision=bf16-mixed", "trainer.devices=2", "trainer.strategy=ddp"]
    )
    assert (cfg.trainer.max_steps, cfg.trainer.precision, cfg.trainer.devices, cfg.trainer.strategy) == (
        7,
        "bf16-mixed",
        2,
        "ddp",
    )


def test_misspelt_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["trainer.max_stepz=5"])
    assert "max_stepz" in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--trainer.max_steps=5"], ["trainer.max_steps=5"]),
        (["--trainer.max_steps", "5"], ["trainer.max_steps=5"]),
        (["--trainer.max_steps", "-1", "seed=3"], ["trainer.max_steps=-1", "seed=3"]),
        (["experiment=dlr", "-m", "seed=1,2"], ["experiment=dlr", "-m", "seed=1,2"]),
        (["--multirun", "--cfg", "job"], ["--multirun", "--cfg", "job"]),
        (["--config-name=train"], ["--config-name=train"]),
    ],
)
def test_lightning_cli_habits_become_overrides(args, expected):
    assert normalize_cli_args(args) == expected


def test_flag_without_value_is_an_error():
    with pytest.raises(SystemExit, match="needs a value"):
        normalize_cli_args(["--trainer.max_steps"])


def test_train_py_accepts_lightning_cli_style():
    result = run_train(["experiment=eval_tiny", "--trainer.max_steps", "5", "--cfg", "job"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "max_steps: 5" in result.stdout


def test_unknown_experiment_lists_the_valid_ones():
    result = run_train(["experiment=does_not_exist"], timeout=120)
    assert result.returncode != 0
    assert all(name in result.stderr for name in EXPERIMENTS)


def test_misspelt_key_fails_the_command():
    result = run_train(["experiment=eval_tiny", "trainer.max_stepz=5"], timeout=120)
    assert result.returncode != 0 and "max_stepz" in result.stderr


def test_bad_reward_weight_fails_before_any_model_loads():
    result = run_train(["experiment=eval_tiny", "reward.w_format=-1"], timeout=120)
    assert result.returncode != 0 and "reward.w_format" in result.stderr
    assert "Loading weights" not in result.stderr


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_builds_every_settings_object_from_the_yaml(experiment, tmp_path):
    """The YAML is the one source of the settings' values: each experiment's config builds, with no
    value filled in by code, everything the runner builds from it before any model loads."""
    from dlr.methods.settings import DLRSettings, GRPOSettings
    from dlr.runner.arms import method_settings
    from dlr.runner.common import instantiate_list, model_spec, prompt_format, reward_config
    from dlr.runner.compare import check_comparison

    cfg = compose_config([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    assert reward_config(cfg) and prompt_format(cfg) and instantiate_list(cfg.get("callbacks")) is not None
    assert all(model_spec(cfg.backbone[role], cfg.paths.root_dir) for role in ("main", "assistant"))
    name = cfg.method.name
    if name == "dlr":
        assert isinstance(method_settings(DLRSettings, cfg), DLRSettings)
    elif name == "grpo":
        assert isinstance(method_settings(GRPOSettings, cfg), GRPOSettings)
    elif name == "dlr_vs_grpo":  # every arm's (and variant's) settings and the budget meter
        assert set(check_comparison(cfg, [0], tmp_path).values()) <= {"dlr", "grpo"}
    else:
        assert name in ("warmstart", "evaluate")  # no settings object beyond the reward and the backbone


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_s_data_instantiates_offline(experiment, tmp_path):
    """The data module of every experiment builds before any model loads (a hub source is not read
    until its records are asked for), so a data setting that cannot start fails here, on the CPU."""
    from hydra.utils import instantiate

    cfg = compose_config([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    datamodule = instantiate(cfg.data)
    assert datamodule.source == cfg.data.source
