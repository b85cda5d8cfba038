"""The single-run jobs: the tiny backbone's warm start, evaluating a backbone, one DLR or GRPO arm; each
writes its scores by depth into the run folder."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase, Qwen2ForCausalLM

from dlr.callbacks.evaluation import AlignmentEval
from dlr.data.datamodule import ReasoningDataModule
from dlr.methods.stage1 import STAGE1_COMMANDS, export_stage1
from dlr.methods.warmstart_module import WarmStartModule
from dlr.models import tiny
from dlr.models.backbones import ModelSpec, PromptFormat, load_assistant, load_main, load_tokenizer
from dlr.runner.arms import Arm, check_protected, fit, setup_dlr, setup_grpo
from dlr.runner.common import (
    build_trainer,
    device_name,
    evaluation_device,
    is_rank_zero,
    model_spec,
    project_path,
    prompt_format,
    reward_config,
    write_json,
)
from dlr.scoring import DepthScore, depth_table, evaluate_by_depth, scores_as_dicts

log = logging.getLogger(__name__)


def evaluate_models(cfg: DictConfig, models: dict[str, tuple], fmt: PromptFormat, records) -> list[DepthScore]:
    """Evaluate each named (model, tokenizer) in each configured mode on the fixed test set."""
    scores: list[DepthScore] = []
    for name, (model, tokenizer) in models.items():
        for mode in cfg.eval.modes:
            scores += evaluate_by_depth(
                model,
                tokenizer,
                fmt,
                records,
                label=f"{name}/{mode}",
                mode=mode,
                max_new_tokens=cfg.eval.max_new_tokens,
                batch_size=cfg.eval.batch_size,
                reward=reward_config(cfg),
            )
    return scores


def write_eval(out: Path, scores: list[DepthScore], skipped: dict, title: str) -> None:
    table = depth_table(scores)
    (out / "eval.md").write_text(f"# {title}\n\nGreedy accuracy on the fixed test set, by depth.\n\n{table}\n")
    write_json(out / "eval.json", {"scores": scores_as_dicts(scores), "skipped_records": skipped})
    log.info("evaluation written to %s", out / "eval.md")
    print(f"\n{title}\n{table}\nwritten to {out / 'eval.md'}")


BACKBONE_FILES = {"main", "assistant", "eval.md", "WIP.md"}  # WIP.md: notes of a curriculum in progress


def export_target(export_to: str, root_dir: str) -> Path:
    """Where to publish a trained backbone; refuses any folder that holds more than a backbone,
    so a typo (`export_to=.`) cannot delete the checkout."""
    target = Path(export_to) if Path(export_to).is_absolute() else Path(root_dir) / export_to
    if target.exists() and not {p.name for p in target.iterdir()} <= BACKBONE_FILES:
        raise SystemExit(
            f"error: method.export_to={export_to} holds files other than a backbone ({sorted(BACKBONE_FILES)}); "
            "refusing to overwrite it"
        )
    return target


def run_warmstart(cfg: DictConfig, out: Path) -> None:
    """Train the tiny main and assistant from scratch, evaluate them, save them in `save_pretrained` format."""
    if cfg.method.export_to:
        export_target(cfg.method.export_to, cfg.paths.root_dir)  # fail now, not after training
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps < 1:
        raise SystemExit("error: the warm start needs trainer.max_steps > 0 (its learning-rate schedule ends there)")
    datamodule: ReasoningDataModule = instantiate(cfg.data)
    datamodule.check_source()
    tokenizer = tiny.build_tokenizer()
    main, assistant = warmstart_models(cfg, tokenizer)
    log.info(
        "tiny main: %.2fM parameters, assistant: %.2fM", main.num_parameters() / 1e6, assistant.num_parameters() / 1e6
    )

    fmt = prompt_format(cfg)
    module = WarmStartModule(
        main,
        assistant,
        tokenizer,
        fmt,
        lr=cfg.method.lr,
        weight_decay=cfg.method.weight_decay,
        warmup_steps=cfg.method.warmup_steps,
        direct_fraction=cfg.method.direct_fraction,
        max_length=cfg.method.max_length,
        seed=cfg.seed,
        train_assistant=cfg.method.train_assistant,
    )
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    if trainer.is_global_zero:
        saved = out / "backbone"
        trained = (("main", main), ("assistant", assistant)) if cfg.method.train_assistant else (("main", main),)
        for name, model in trained:
            model.save_pretrained(saved / name)
            tokenizer.save_pretrained(saved / name)
        device = evaluation_device(cfg.trainer.accelerator)  # Lightning hands the module back on the CPU
        models = {"main": (main.to(device), tokenizer), "assistant": (assistant.to(device), tokenizer)}
        scores = evaluate_models(cfg, models, fmt, datamodule.test_records())
        write_eval(out, scores, datamodule.skip_counts(), f"Tiny backbone after {trainer.global_step} warm-start steps")
        if cfg.method.export_to:
            export_backbone(cfg.method.export_to, cfg.paths.root_dir, saved, [name for name, _ in trained], out)


def warmstart_models(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[LlamaForCausalLM, Qwen2ForCausalLM]:
    """The tiny main and assistant to train: new, or a curriculum phase's saved weights (`method.init_from`)."""
    shapes = cfg.backbone.shapes
    if not cfg.method.init_from:
        main = LlamaForCausalLM(tiny.main_config(tokenizer, tiny.TinyShape(**shapes.main)))
        assistant = Qwen2ForCausalLM(tiny.assistant_config(tokenizer, tiny.TinyShape(**shapes.assistant)))
        return main, assistant
    start = (
        Path(cfg.method.init_from)
        if Path(cfg.method.init_from).is_absolute()
        else Path(cfg.paths.root_dir) / cfg.method.init_from
    )
    if not (start / "main").is_dir():
        raise SystemExit(f"error: method.init_from={cfg.method.init_from} has no main/ folder to start from")
    main = LlamaForCausalLM.from_pretrained(start / "main", dtype=torch.float32)
    assistant_dir = (
        start / "assistant" if (start / "assistant").is_dir() else Path(cfg.paths.data_dir) / "backbones/tiny/assistant"
    )
    assistant = Qwen2ForCausalLM.from_pretrained(assistant_dir, dtype=torch.float32)
    log.info("warm start continues from %s (assistant from %s)", start, assistant_dir)
    return main, assistant


def export_backbone(export_to: str, root_dir: str, saved: Path, trained: list[str], out: Path) -> None:
    """Publish the trained models saved in `saved` and the run's eval.md; an untrained assistant keeps
    its exported copy."""
    target = export_target(export_to, root_dir)
    for name in trained:
        shutil.rmtree(target / name, ignore_errors=True)
        shutil.copytree(saved / name, target / name)
    shutil.copy(out / "eval.md", target / "eval.md")
    print(f"exported the backbone to {target}")


def run_evaluate(cfg: DictConfig, out: Path) -> None:
    """Evaluate the configured backbone (main as loaded for RL: frozen and quantized) on the test set."""
    datamodule: ReasoningDataModule = instantiate(cfg.data)
    datamodule.check_source()
    fmt = prompt_format(cfg)
    main_spec = model_spec(cfg.backbone.main, cfg.paths.root_dir)
    device = evaluation_device(cfg.trainer.accelerator)
    models = {"main": (load_main(main_spec, device), load_tokenizer(main_spec.name_or_path))}
    if cfg.method.include_assistant:  # as a plain text generator, in its own tokenizer, without adapters
        spec = model_spec(cfg.backbone.assistant, cfg.paths.root_dir)
        plain = ModelSpec(spec.name_or_path, spec.quantization, spec.dtype)
        models["assistant"] = (load_assistant(plain, device), load_tokenizer(spec.name_or_path))
    scores = evaluate_models(cfg, models, fmt, datamodule.test_records())
    write_eval(out, scores, datamodule.skip_counts(), f"Backbone {cfg.backbone.name}")


def run_dlr(cfg: DictConfig, out: Path) -> None:
    """DLR: latent alignment then latent RL against the frozen main model; evaluates the main model
    alone, the policy after alignment and after RL; fails loudly if the main model's weights changed."""
    arm = setup_dlr(cfg)
    if not is_rank_zero():  # a DDP process: it trains its shard of the rollouts, rank 0 does the rest
        fit(cfg, arm)
        return
    start_hash = arm.protected_hash()
    records = arm.datamodule.test_records()
    scores = evaluate_models(cfg, {"main": arm.text_model}, prompt_format(cfg), records)  # the frozen main alone
    started = time.process_time()
    trainer = fit(cfg, arm)
    seconds = time.process_time() - started
    check_protected(arm, start_hash, out)
    if trainer.is_global_zero:
        aligned = next((c.scores for c in trainer.callbacks if isinstance(c, AlignmentEval) and c.scores), [])
        if arm.module.settings.alignment.export_to:
            export_dlr_stage1(cfg, arm, aligned, seconds)
        final = arm.evaluate(records, "dlr/final")
        write_eval(
            out,
            scores + aligned + final,
            arm.datamodule.skip_counts(),
            f"DLR on {cfg.backbone.name}: {trainer.global_step} steps ({arm.module.settings.alignment.steps} alignment + RL)",
        )


def export_dlr_stage1(cfg: DictConfig, arm: Arm, aligned: list[DepthScore], seconds: float) -> None:
    """Save the DLR state after stage 1 (a run with rl.steps=0), with what it cost and scored."""
    settings = arm.module.settings
    if settings.rl.steps:
        raise SystemExit("error: method.alignment.export_to saves stage 1 alone: set method.rl.steps=0")
    folder = project_path(settings.alignment.export_to, cfg.paths.root_dir)
    earlier = getattr(arm.module, "stage1_info", None) or {}  # continued from a shipped stage 1: its cost counts
    info = {
        "alignment_steps": earlier.get("alignment_steps", 0) + settings.alignment.steps,
        "batch_size": cfg.data.batch_size,
        "alignment": {k: v for k, v in asdict(settings.alignment).items() if k not in ("init_from", "export_to")},
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "flops": earlier.get("flops", 0.0) + float(arm.module.flops_spent),
        "process_seconds": earlier.get("process_seconds", 0.0) + seconds,  # training only
        "device": device_name(cfg.trainer.accelerator),
        "accuracy_by_depth": {f"{s.task}/{s.depth}": s.accuracy for s in aligned},
        "command": STAGE1_COMMANDS[settings.readout],
    }
    export_stage1(arm.module, folder, info)
    print(f"exported the stage-1 state to {folder}")


def run_grpo(cfg: DictConfig, out: Path) -> None:
    """Token-space GRPO: LoRA adapters on the 4-bit main model; evaluates the main model before and
    the policy after; fails loudly if the base weights under the adapters changed."""
    arm = setup_grpo(cfg)
    if not is_rank_zero():  # a DDP process: it trains its shard of the rollouts, rank 0 does the rest
        fit(cfg, arm)
        return
    start_hash = arm.protected_hash()
    records = arm.datamodule.test_records()
    fmt = prompt_format(cfg)
    scores = evaluate_models(cfg, {"main": arm.text_model}, fmt, records)  # zero-initialised adapters: the main model
    trainer = fit(cfg, arm)
    check_protected(arm, start_hash, out)
    if trainer.is_global_zero:
        scores += evaluate_models(cfg, {"grpo": arm.text_model}, fmt, records)
        write_eval(
            out, scores, arm.datamodule.skip_counts(), f"GRPO on {cfg.backbone.name}: {trainer.global_step} steps"
        )
