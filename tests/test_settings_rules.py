"""Every numeric setting of every experiment has a rule (`dlr.config.NUMBER_RULES`), and a value that breaks it
stops the run before any model loads, with one line naming the key (issue 37 item 3)."""

from __future__ import annotations

import copy
import math

import pytest
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose_config, run_train
from dlr.config import (
    ANY_INTEGER,
    ANY_NUMBER,
    COUNT,
    COUNT_OR_ALL,
    COUNT_OR_OFF,
    COUNT_OR_UNLIMITED,
    DEVICES,
    NON_NEGATIVE,
    NUMBER_RULES,
    POSITIVE,
    POSITIVE_SHARE,
    SHARE,
    check_number,
    check_settings,
    number_rule,
    scalar_settings,
)

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
BAD_VALUES = {  # a value each rule refuses
    POSITIVE: 0,
    NON_NEGATIVE: -1,
    SHARE: 1.5,
    POSITIVE_SHARE: 0,
    ANY_NUMBER: math.nan,
    ANY_INTEGER: 0.5,
    COUNT: 0,
    COUNT_OR_OFF: -1,
    COUNT_OR_ALL: -2,
    COUNT_OR_UNLIMITED: 0,
    DEVICES: 0,
}


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs")
    return {name: compose_config([f"experiment={name}", f"paths.output_dir={out}"]) for name in EXPERIMENTS}


def numeric_settings(cfg) -> list[str]:
    """Dotted paths of the numeric scalars of `cfg`, as `check_settings` walks them."""
    settings = scalar_settings(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg))
    return [path for path, value, _ in settings if isinstance(value, int | float) and not isinstance(value, bool)]


def settable(cfg, path: str) -> bool:
    """Whether `path` can be set on its own: not inside a node that is itself an interpolation (a callback's
    `reward: ${reward}` is set at its source, `reward.w_correct`)."""
    node = cfg
    for part in path.split(".")[:-1]:
        if OmegaConf.is_interpolation(node, part):
            return False
        node = node[part]
    return True


def test_every_rule_has_a_bad_value_here():
    assert {rule for _, rule in NUMBER_RULES} <= set(BAD_VALUES)


def test_every_numeric_setting_of_every_experiment_has_a_rule(experiments):
    """A new numeric setting needs its rule in NUMBER_RULES (or a pattern that already covers it)."""
    missing = {path for cfg in experiments.values() for path in numeric_settings(cfg) if number_rule(path) is None}
    assert not missing, f"numeric settings with no rule in dlr.config.NUMBER_RULES: {sorted(missing)}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_passes_the_start_checks_as_configured(experiments, experiment):
    check_settings(experiments[experiment])


def test_a_bad_value_of_every_numeric_setting_stops_the_run_naming_it(experiments):
    """Each numeric setting, in the first experiment that has it, set to a value its rule refuses: the start
    check fails with one line naming that key (a setting other keys read by interpolation is named itself)."""
    tried, wrong = set(), []
    for name, cfg in experiments.items():
        for path in numeric_settings(cfg):
            if path in tried or not settable(cfg, path):
                continue
            tried.add(path)
            bad = copy.deepcopy(cfg)
            OmegaConf.update(bad, path, BAD_VALUES[number_rule(path)], merge=False)
            try:
                check_settings(bad)
            except SystemExit as err:
                message = str(err)
                if "\n" in message or not message.startswith(f"error: {path} must be "):
                    wrong.append(f"{name}: {path}: {message}")
            else:
                wrong.append(f"{name}: {path}={BAD_VALUES[number_rule(path)]} passed")
    assert len(tried) > 100  # the walk reached every group, not a handful of keys
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("data.batch_size", 2.5, "data.batch_size must be an integer >= 1, got 2.5"),
        ("method.rl.lr", "fast", "method.rl.lr must be > 0, got 'fast'"),
        ("method.rl.num_samples", True, "method.rl.num_samples must be an integer >= 1, got True"),
        ("reward.w_correct", math.inf, "reward.w_correct must be >= 0, got inf"),
    ],
)
def test_a_value_of_the_wrong_kind_fails_naming_the_key(path, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_number(path, value)


def test_null_and_words_that_stand_for_numbers_pass():
    check_number("method.rl.heads_lr", None)  # null: the key's own meaning (here: method.rl.lr)
    check_number("trainer.devices", "auto")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["experiment=dlr", "method.rl.lr=-1"], "error: method.rl.lr must be > 0, got -1"),
        (
            ["experiment=eval_tiny", "data.test_per_depth=0"],
            "error: data.test_per_depth must be an integer >= 1, got 0",
        ),
    ],
)
def test_the_issue_s_bad_settings_stop_train_py_with_one_line(tmp_path, overrides, message):
    """Before, method.rl.lr=-1 ran a full evaluation and 10 steps, then stopped on NaN; data.test_per_depth=0
    exited 0 with an empty table."""
    result = run_train([*overrides, f"hydra.run.dir={tmp_path}"], timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stderr


def test_the_non_finite_stop_says_whether_a_checkpoint_exists(tmp_path):
    from dlr.methods.guard import NonFiniteGuard, NonFiniteTraining

    with pytest.raises(NonFiniteTraining, match="no checkpoint was saved before it") as err:
        NonFiniteGuard(1).record(False, 10, None)
    assert "ckpt_path" not in str(err.value)
    with pytest.raises(NonFiniteTraining, match="no checkpoint was saved"):  # a path, but no file there
        NonFiniteGuard(1).record(False, 10, str(tmp_path / "last.ckpt"))
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(NonFiniteTraining, match=f"resume from it with ckpt_path={tmp_path / 'last.ckpt'}"):
        NonFiniteGuard(1).record(False, 10, str(tmp_path / "last.ckpt"))
