"""The Hydra configuration composed outside `src/train.py` (tests, benchmarks), and settings built from it:
configs/ is the one source of every setting's value (docs/design.md §3)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dlr.rewards import RewardConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "configs"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """`configs/train.yaml` with Hydra overrides, as `src/train.py` composes it (no run folder)."""
    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))  # paths.root_dir reads it
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def with_changes(cls, values: dict, changes: dict | None) -> dict:
    """`values` (a resolved `cfg.method`) with `changes`: a group of settings (`cls.GROUPS`, e.g. DLR's
    `rl`) updated key by key, any other setting (`lora`, `max_new_tokens`) replaced whole."""
    values = dict(values)
    for key, value in (changes or {}).items():
        values[key] = {**values[key], **value} if key in cls.GROUPS else value
    return values


def settings_from_yaml(cls, method: str, changes: dict | None = None, overrides: Sequence[str] = ()):
    """`cls.from_dict` of configs/method/<method>.yaml composed with Hydra `overrides` (e.g. a backbone),
    with `changes` applied: what a test or a benchmark changes, and nothing it would repeat."""
    cfg = compose_config([f"method={method}", *overrides])
    return cls.from_dict(with_changes(cls, OmegaConf.to_container(cfg.method, resolve=True), changes))


def reward_from_yaml(overrides: Sequence[str] = ()) -> RewardConfig:
    """The reward settings of configs/reward/, as the runner builds them."""
    return RewardConfig.from_dict(OmegaConf.to_container(compose_config(overrides).reward, resolve=True))
