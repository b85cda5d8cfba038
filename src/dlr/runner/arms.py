"""The RL arms, built from the config and ready to train: DLR and GRPO, with how each is evaluated,
sampled and checked; training one; and the check that its protected weights did not move."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dlr.callbacks.frontier import FrontierUpdate
from dlr.data.datamodule import ReasoningDataModule
from dlr.data.schema import Record
from dlr.methods.dlr_module import DLRModule, DLRSettings
from dlr.methods.grpo_module import GRPOModule, GRPOSettings
from dlr.methods.guard import NonFiniteGuard, NonFiniteTraining
from dlr.methods.stage1 import load_stage1
from dlr.models.backbones import add_lora, load_assistant, load_main, load_tokenizer, weights_sha256
from dlr.runner.common import (
    build_trainer,
    evaluation_device,
    model_spec,
    project_path,
    prompt_format,
    reward_config,
    rl_ddp_strategy,
    write_json,
)
from dlr.scoring import DepthScore, evaluate_by_depth

log = logging.getLogger(__name__)


@dataclass
class Arm:
    """One RL arm, built from the config, ready to train; the orchestrators run and measure it."""

    name: str
    module: L.LightningModule
    datamodule: ReasoningDataModule
    evaluate: Callable[[Sequence[Record], str], list[DepthScore]]  # the policy, as this arm uses it
    sample_attempts: Callable[[Sequence[Record], int], list[list[str]]]  # k sampled attempts per record (pass@k)
    text_model: tuple  # (model, tokenizer) that reads text for this arm: the held-out NLL is measured on it
    protected_hash: Callable[[], str]  # weights this arm must never change
    default_steps: int  # optimizer steps when neither the budget nor trainer.max_steps decides


def method_settings(cls, cfg: DictConfig):
    """`cfg.method` as the settings dataclass `cls`; a bad setting exits naming it."""
    try:
        return cls.from_dict(OmegaConf.to_container(cfg.method, resolve=True))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def arm_fault_injection(cfg: DictConfig, module) -> None:
    """`debug.inject_nonfinite_at_step`: make the loss NaN at that step, for testing the guard."""
    debug = cfg.get("debug") or {}
    if debug.get("inject_nonfinite_at_step") is not None:
        module.guard = NonFiniteGuard(
            module.settings.max_consecutive_nonfinite,
            debug.inject_nonfinite_at_step,
            debug.get("inject_nonfinite_times", 1),
        )


def stage1_command(readout: str) -> str:
    """The command that regenerates the shipped tiny stage 1 of `readout` (one folder per readout)."""
    return f"python src/train.py experiment=dlr_stage1_tiny method.readout={readout}"


def setup_dlr(cfg: DictConfig) -> Arm:
    """Frozen main + LoRA assistant + latent policy, projector and critic."""
    settings = method_settings(DLRSettings, cfg)
    datamodule: ReasoningDataModule = instantiate(cfg.data)
    datamodule.check_source()
    device = evaluation_device(cfg.trainer.accelerator)
    main_spec = model_spec(cfg.backbone.main, cfg.paths.root_dir)
    assistant_spec = model_spec(cfg.backbone.assistant, cfg.paths.root_dir)
    main, main_tokenizer = load_main(main_spec, device), load_tokenizer(main_spec.name_or_path)
    module = DLRModule(
        main,
        main_tokenizer,
        load_assistant(assistant_spec, device),
        load_tokenizer(assistant_spec.name_or_path),
        prompt_format(cfg),
        settings,
        reward_config(cfg),
        cfg.backbone.placeholder,
        main_sha256=weights_sha256(main),
    )

    if settings.alignment.init_from:
        folder = project_path(settings.alignment.init_from, cfg.paths.root_dir)
        try:
            module.stage1_info = load_stage1(module, folder, stage1_command(settings.readout))
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        log.info("DLR starts from the shipped stage 1 in %s", folder)

    def evaluate(records: Sequence[Record], label: str) -> list[DepthScore]:
        module.to(device)
        return module.evaluate_latent(records, label, cfg.eval.batch_size)

    arm_fault_injection(cfg, module)
    return Arm(
        "dlr",
        module,
        datamodule,
        evaluate,
        module.sample_attempts,
        (main, main_tokenizer),
        lambda: weights_sha256(module.main),
        settings.total_steps,
    )


def setup_grpo(cfg: DictConfig) -> Arm:
    """LoRA adapters on the 4-bit main model."""
    settings = method_settings(GRPOSettings, cfg)
    datamodule: ReasoningDataModule = instantiate(cfg.data)
    datamodule.check_source()
    fmt = prompt_format(cfg)
    device = evaluation_device(cfg.trainer.accelerator)
    main_spec = model_spec(cfg.backbone.main, cfg.paths.root_dir)
    tokenizer = load_tokenizer(main_spec.name_or_path)
    policy = add_lora(load_main(main_spec, device), settings.lora)
    base_hash = weights_sha256(policy, exclude="lora_")
    module = GRPOModule(policy, tokenizer, fmt, settings, reward_config(cfg), base_sha256=base_hash)

    def evaluate(records: Sequence[Record], label: str) -> list[DepthScore]:
        return own_chain_scores(cfg, module.policy.to(device), tokenizer, records, label)

    def sample_attempts(records: Sequence[Record], k: int) -> list[list[str]]:
        return module.sample_attempts(list(records), k, cfg.eval.max_new_tokens)

    arm_fault_injection(cfg, module)
    return Arm(
        "grpo",
        module,
        datamodule,
        evaluate,
        sample_attempts,
        (policy, tokenizer),
        lambda: weights_sha256(module.policy, exclude="lora_"),
        settings.steps,
    )


ARMS = {"dlr": setup_dlr, "grpo": setup_grpo}


def own_chain_scores(cfg: DictConfig, model, tokenizer, records: Sequence[Record], label: str) -> list[DepthScore]:
    """Greedy accuracy by depth of `model` writing its own text chain: GRPO's evaluation, and the
    forgetting check's common start for every arm."""
    return evaluate_by_depth(
        model,
        tokenizer,
        prompt_format(cfg),
        records,
        label=label,
        mode="cot",
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        reward=reward_config(cfg),
    )


def fit(cfg: DictConfig, arm: Arm, extra_callbacks: list | None = None, budgeted: bool = False) -> L.Trainer:
    """Train an arm; stops at trainer.max_steps if set, else at the budget (budgeted) or the arm's own steps."""
    # Lightning warns that manual-optimization checkpoints hold the weights after the step; that is
    # what resuming at that step needs.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    if cfg.trainer.max_steps not in (None, -1):
        max_steps = cfg.trainer.max_steps
    else:
        max_steps = -1 if budgeted else arm.default_steps
    overrides = {"strategy": rl_ddp_strategy(arm.module)} if cfg.trainer.strategy == "ddp" else {}
    extra_callbacks = list(extra_callbacks or [])  # the budget meter, when given, stays first
    if arm.datamodule.frontier is not None:  # the arm's rollouts steer its training depths
        extra_callbacks.append(FrontierUpdate(arm.datamodule.frontier, cfg.trainer.log_every_n_steps))
    trainer = build_trainer(cfg, max_steps=max_steps, extra_callbacks=extra_callbacks, **overrides)
    try:
        trainer.fit(arm.module, datamodule=arm.datamodule, ckpt_path=cfg.get("ckpt_path"))
    except NonFiniteTraining as err:
        raise SystemExit(f"error: {arm.name}: {err}") from None
    return trainer


def check_protected(arm: Arm, start_hash: str, out: Path) -> bool:
    """Compare the weights the arm must not change with their hash at start; fail loudly if they moved."""
    end_hash = arm.protected_hash()
    name = "main_sha256.json" if arm.name == "dlr" else "base_sha256.json"
    write_json(out / name, {"start": start_hash, "end": end_hash, "unchanged": end_hash == start_hash})
    if end_hash != start_hash:
        what = "frozen main model's weights" if arm.name == "dlr" else "4-bit base weights under the adapters"
        raise SystemExit(
            f"error: the {what} changed during training (SHA-256 {start_hash[:12]}… at start, {end_hash[:12]}… "
            f"at the end): the no-forgetting guarantee is broken; the run in {out} is not valid"
        )
    log.info("%s: protected weights unchanged, SHA-256 %s", arm.name, start_hash)
    return True
