"""The Hydra configuration composed outside `src/train.py` (tests, benchmarks), settings built from it, and the
checks every run's settings pass at start: configs/ is the one source of every setting's value (docs/design.md §3)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
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


# --- numeric settings, checked at start --------------------------------------------------------------------


@dataclass(frozen=True)
class NumberRule:
    """What a numeric setting may hold: "KEY must be {describe}" when `holds` is false."""

    describe: str
    holds: Callable[[float], bool]
    whole: bool  # a count: an integer, not 2.5
    words: bool = False  # a word stands for a number too (trainer.devices=auto)


POSITIVE = NumberRule("> 0", lambda v: v > 0, whole=False)
NON_NEGATIVE = NumberRule(">= 0", lambda v: v >= 0, whole=False)
SHARE = NumberRule("in [0, 1]", lambda v: 0 <= v <= 1, whole=False)
POSITIVE_SHARE = NumberRule("in (0, 1]", lambda v: 0 < v <= 1, whole=False)
ANY_NUMBER = NumberRule("a finite number", lambda v: True, whole=False)
ANY_INTEGER = NumberRule("an integer", lambda v: True, whole=True)
COUNT = NumberRule("an integer >= 1", lambda v: v >= 1, whole=True)
COUNT_OR_OFF = NumberRule("an integer >= 0", lambda v: v >= 0, whole=True)  # 0: none, or off
COUNT_OR_ALL = NumberRule("an integer >= -1 (-1: all)", lambda v: v >= -1, whole=True)
COUNT_OR_UNLIMITED = NumberRule("an integer >= 1, or -1 for no limit", lambda v: v == -1 or v >= 1, whole=True)
DEVICES = NumberRule("an integer >= 1, or a word Lightning knows (auto)", lambda v: v >= 1, whole=True, words=True)

# (pattern on the setting's dotted path, rule): the first pattern that matches decides, so the specific come
# first. Every numeric setting of every experiment matches one (tests/test_settings_rules.py); null always
# passes (each key's comment says what it means); lists are checked where they are read (depth ranges by
# ProceduralSpec, seeds by the comparison).
NUMBER_RULES: tuple[tuple[str, NumberRule], ...] = (
    ("*seed", ANY_INTEGER),
    ("*log_sigma_*", ANY_NUMBER),  # log-scale bounds of the latent sigma
    ("debug.inject_nonfinite_at_step", COUNT_OR_OFF),  # an optimizer step number
    ("trainer.devices", DEVICES),
    ("trainer.max_steps", COUNT_OR_UNLIMITED),
    ("trainer.max_epochs", COUNT_OR_UNLIMITED),
    ("trainer.num_sanity_val_steps", COUNT_OR_ALL),
    ("*save_top_k", COUNT_OR_ALL),
    ("trainer.limit_val_batches", NON_NEGATIVE),  # a share or a count; 0: no validation
    ("trainer.gradient_clip_val", NON_NEGATIVE),
    ("*projector_every_n_steps", COUNT_OR_OFF),  # 0: no projector logging
    ("*every_n_train_steps", COUNT_OR_OFF),  # checkpoints; 0: none by step
    ("*every_n_steps", COUNT),  # intervals a step number is divided by
    ("*latent*steps", COUNT),  # the latent chain's length, not a stage's
    ("*warmup*", COUNT_OR_OFF),  # steps or batches of warm-up; 0: none
    ("*steps", COUNT_OR_OFF),  # a stage's optimizer steps; 0 skips the stage
    ("*lr_floor", POSITIVE_SHARE),  # the cosine's end, a share of lr
    ("*lr", POSITIVE),
    ("*temperature", POSITIVE),
    ("*tau", POSITIVE),
    ("*grad_clip", POSITIVE),
    ("*clip_eps", POSITIVE),
    ("*sigma_start", POSITIVE),
    ("*timeout_s", POSITIVE),
    ("budget.amount*", POSITIVE),
    ("*lora_alpha", POSITIVE),
    ("*lora_dropout", SHARE),
    ("*lora.r", COUNT),  # LoRA rank
    ("*eps_low", SHARE),
    ("*eps_high", NON_NEGATIVE),
    ("*self_feed", SHARE),
    ("*direct_fraction", SHARE),
    ("*eval_every", POSITIVE_SHARE),  # a share of the budget
    ("data.frontier.floor", POSITIVE),
    ("data.frontier.decay", POSITIVE_SHARE),
    ("*mix_weights.*", NON_NEGATIVE),
    ("*weight_decay", NON_NEGATIVE),
    ("*weight", NON_NEGATIVE),  # a loss term's weight
    ("*w_correct", NON_NEGATIVE),
    ("*w_format", NON_NEGATIVE),
    ("*beta", NON_NEGATIVE),
    ("*lambda_*", NON_NEGATIVE),
    ("*entropy_coef", NON_NEGATIVE),
    ("*k_explore", COUNT_OR_OFF),
    ("*samples_per_problem", COUNT_OR_OFF),  # 0: no sampled metrics
    ("*num_*", COUNT),  # num_samples, num_generations, num_threads, ...
    ("*_size", COUNT),  # batch sizes, test_size, model widths, vocab_size
    ("*max_position_embeddings", COUNT),
    ("*batches", COUNT),  # accumulate_grad_batches
    ("*per_depth", COUNT),
    ("*max_new_tokens*", COUNT),
    ("*_tokens", COUNT),
    ("*_positions", COUNT),
    ("*max_length", COUNT),
    ("*pass_at_k", COUNT),
    ("*ppo_epochs", COUNT),
    ("*max_consecutive_nonfinite", COUNT),
    ("*inject_nonfinite_times", COUNT),
    ("*questions_per_batch", COUNT),
    ("*dim", COUNT),
    ("*hidden", COUNT),
    ("*compression", COUNT),
)


def number_rule(path: str) -> NumberRule | None:
    """The rule of the setting at dotted `path` (e.g. "method.dlr.rl.lr"), or None if it has none."""
    return next((rule for pattern, rule in NUMBER_RULES if fnmatchcase(path, pattern)), None)


def scalar_settings(resolved, written, path: str = "") -> Iterator[tuple[str, object, bool]]:
    """(dotted path, value, derived) of every scalar under the resolved container `resolved`, lists left out;
    `written` is the same node unresolved, so a value written as an interpolation (`${...}`) is derived."""
    if isinstance(resolved, dict):
        for key, value in resolved.items():
            raw = written.get(key) if isinstance(written, dict) else written  # under an interpolated node: its text
            yield from scalar_settings(value, raw, f"{path}.{key}" if path else str(key))
    elif not isinstance(resolved, list):
        yield path, resolved, isinstance(written, str) and "${" in written


def check_number(path: str, value: object) -> None:
    """Raise ValueError naming `path` when `value` breaks its rule (null and settings without a rule pass)."""
    rule = number_rule(path)
    if rule is None or value is None or (rule.words and isinstance(value, str)):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path} must be {rule.describe}, got {value!r}")
    if (rule.whole and value != int(value)) or not rule.holds(value):
        raise ValueError(f"{path} must be {rule.describe}, got {value!r}")


def check_settings(cfg: DictConfig) -> None:
    """What `src/train.py` checks before any model loads, failing with one line naming the key: every numeric
    setting against NUMBER_RULES, then the data (its files; for a method that trains, a training stream the
    test set leaves records to)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from dlr.data.hub import HubUnavailable

    try:
        settings = scalar_settings(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg))
        # the settings written out first, so that an error names the key to change rather than one that reads it
        for path, value, _ in sorted(settings, key=lambda setting: setting[2]):
            check_number(path, value)
        datamodule = instantiate(cfg.data)
        if cfg.method.name != "evaluate":  # evaluation reads only the test set
            datamodule.check_training_data()
    except InstantiationException as err:  # Hydra wraps the data module's own message in several lines
        if not isinstance(err.__cause__, ValueError):
            raise
        raise SystemExit(f"error: {err.__cause__}") from None
    except (ValueError, HubUnavailable) as err:
        raise SystemExit(f"error: {err}") from None
