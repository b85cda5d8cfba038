"""What `src/train.py` runs: one function per `method.name`, each writing into the run folder.

The flow follows lightning-hydra-template: seed, instantiate data, model, callbacks, loggers and trainer
from the config, fit, evaluate, write results beside the resolved config.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from dlr.callbacks.evaluation import DepthScore, depth_table, evaluate_by_depth, scores_as_dicts
from dlr.data.datamodule import ReasoningDataModule
from dlr.models import tiny
from dlr.models.backbones import ModelSpec, PromptFormat, load_assistant, load_main, load_tokenizer, resolve_path
from dlr.rewards import RewardConfig

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    """The run folder: Hydra's when Hydra runs us, else `paths.output_dir` (tests, notebooks)."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def check_writable(folder: Path) -> None:
    """Fail at start, not after an hour of training, when results could not be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"error: the run folder {folder} is not writable ({err}); set paths.log_dir to a writable folder")


def model_spec(node: DictConfig, root_dir: str) -> ModelSpec:
    fields = OmegaConf.to_container(node, resolve=True)
    fields["name_or_path"] = resolve_path(fields["name_or_path"], root_dir)
    return ModelSpec(**fields)


def prompt_format(cfg: DictConfig) -> PromptFormat:
    return PromptFormat(**OmegaConf.to_container(cfg.backbone.prompt, resolve=True))


def reward_config(cfg: DictConfig) -> RewardConfig:
    fields = OmegaConf.to_container(cfg.reward, resolve=True)
    return RewardConfig(**{k: v for k, v in fields.items() if v is not None})  # null = the default


def instantiate_list(group: DictConfig | None) -> list:
    """Instantiate every entry of a callbacks/logger group that has a `_target_`."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def build_trainer(cfg: DictConfig, **overrides) -> L.Trainer:
    loggers = instantiate_list(cfg.get("logger"))
    callbacks = instantiate_list(cfg.get("callbacks"))
    if not loggers:  # Lightning refuses a learning-rate monitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)


def write_json(path: Path, payload) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)  # atomic: a reader never sees half a file


def evaluation_device(accelerator: str) -> str:
    """The device `trainer.accelerator` asks for, for work done outside Lightning's loop."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def evaluate_models(cfg: DictConfig, models: dict[str, tuple], fmt: PromptFormat, records) -> list[DepthScore]:
    """Evaluate each named (model, tokenizer) in each configured mode on the fixed test set."""
    scores: list[DepthScore] = []
    for name, (model, tokenizer) in models.items():
        for mode in cfg.eval.modes:
            scores += evaluate_by_depth(
                model, tokenizer, fmt, records,
                label=f"{name}/{mode}", mode=mode,
                max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                reward=reward_config(cfg),
            )
    return scores


def write_eval(out: Path, scores: list[DepthScore], skipped: dict, title: str) -> None:
    table = depth_table(scores)
    (out / "eval.md").write_text(f"# {title}\n\nGreedy accuracy on the fixed test set, by depth.\n\n{table}\n")
    write_json(out / "eval.json", {"scores": scores_as_dicts(scores), "skipped_records": skipped})
    log.info("evaluation written to %s", out / "eval.md")
    print(f"\n{title}\n{table}\nwritten to {out / 'eval.md'}")


BACKBONE_FILES = {"main", "assistant", "eval.md"}


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
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    from dlr.methods.warmstart_module import WarmStartModule

    if cfg.method.export_to:
        export_target(cfg.method.export_to, cfg.paths.root_dir)  # fail now, not after training
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps < 1:
        raise SystemExit("error: the warm start needs trainer.max_steps > 0 (its learning-rate schedule ends there)")
    datamodule: ReasoningDataModule = instantiate(cfg.data)
    datamodule.check_source()
    tokenizer = tiny.build_tokenizer()
    shapes = cfg.backbone.shapes
    main = LlamaForCausalLM(tiny.main_config(tokenizer, tiny.TinyShape(**shapes.main)))
    assistant = Qwen2ForCausalLM(tiny.assistant_config(tokenizer, tiny.TinyShape(**shapes.assistant)))
    log.info("tiny main: %.2fM parameters, assistant: %.2fM", main.num_parameters() / 1e6, assistant.num_parameters() / 1e6)

    fmt = prompt_format(cfg)
    module = WarmStartModule(
        main, assistant, tokenizer, fmt,
        lr=cfg.method.lr, weight_decay=cfg.method.weight_decay, warmup_steps=cfg.method.warmup_steps,
        direct_fraction=cfg.method.direct_fraction, max_length=cfg.method.max_length, seed=cfg.seed,
    )
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    if trainer.is_global_zero:
        saved = out / "backbone"
        for name, model in (("main", main), ("assistant", assistant)):
            model.save_pretrained(saved / name)
            tokenizer.save_pretrained(saved / name)
        device = evaluation_device(cfg.trainer.accelerator)  # Lightning hands the module back on the CPU
        models = {"main": (main.to(device), tokenizer), "assistant": (assistant.to(device), tokenizer)}
        scores = evaluate_models(cfg, models, fmt, datamodule.test_records())
        write_eval(out, scores, datamodule.skip_counts(), f"Tiny backbone after {trainer.global_step} warm-start steps")
        if cfg.method.export_to:
            target = export_target(cfg.method.export_to, cfg.paths.root_dir)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(saved, target)
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
    from dlr.callbacks.evaluation import AlignmentEval
    from dlr.methods.dlr_module import DLRModule, DLRSettings
    from dlr.models.backbones import weights_sha256

    try:
        settings = DLRSettings.from_dict(OmegaConf.to_container(cfg.method, resolve=True))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    datamodule: ReasoningDataModule = instantiate(cfg.data)
    datamodule.check_source()
    fmt = prompt_format(cfg)
    device = evaluation_device(cfg.trainer.accelerator)
    main_spec = model_spec(cfg.backbone.main, cfg.paths.root_dir)
    assistant_spec = model_spec(cfg.backbone.assistant, cfg.paths.root_dir)
    main, main_tokenizer = load_main(main_spec, device), load_tokenizer(main_spec.name_or_path)
    main_hash = weights_sha256(main)
    module = DLRModule(
        main, main_tokenizer, load_assistant(assistant_spec, device), load_tokenizer(assistant_spec.name_or_path),
        fmt, settings, reward_config(cfg), cfg.backbone.placeholder, main_sha256=main_hash,
    )
    records = datamodule.test_records()
    scores = evaluate_models(cfg, {"main": (main, main_tokenizer)}, fmt, records)  # the frozen main alone

    # Lightning warns that manual-optimization checkpoints hold the weights after the step; that is
    # what resuming at that step needs.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    max_steps = settings.total_steps if cfg.trainer.max_steps in (None, -1) else cfg.trainer.max_steps
    trainer = build_trainer(cfg, max_steps=max_steps)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    final_hash = weights_sha256(module.main)
    write_json(out / "main_sha256.json", {"start": main_hash, "end": final_hash, "unchanged": final_hash == main_hash})
    if final_hash != main_hash:
        raise SystemExit(
            f"error: the frozen main model's weights changed during training (SHA-256 {main_hash[:12]}… at start, "
            f"{final_hash[:12]}… at the end): the no-forgetting guarantee is broken; the run in {out} is not valid"
        )
    log.info("main model unchanged: SHA-256 %s", main_hash)
    if trainer.is_global_zero:
        module.to(device)
        aligned = next((c.scores for c in trainer.callbacks if isinstance(c, AlignmentEval) and c.scores), [])
        final = module.evaluate_latent(records, "dlr/final", cfg.eval.batch_size)
        write_eval(out, scores + aligned + final, datamodule.skip_counts(),
                   f"DLR on {cfg.backbone.name}: {trainer.global_step} steps ({settings.alignment.steps} alignment + RL)")


def run_grpo(cfg: DictConfig, out: Path) -> None:
    """Token-space GRPO: LoRA adapters on the 4-bit main model; evaluates the main model before and
    the policy after; fails loudly if the base weights under the adapters changed."""
    from dlr.methods.grpo_module import GRPOModule, GRPOSettings
    from dlr.models.backbones import add_lora, weights_sha256

    try:
        settings = GRPOSettings.from_dict(OmegaConf.to_container(cfg.method, resolve=True))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    datamodule: ReasoningDataModule = instantiate(cfg.data)
    datamodule.check_source()
    fmt = prompt_format(cfg)
    device = evaluation_device(cfg.trainer.accelerator)
    main_spec = model_spec(cfg.backbone.main, cfg.paths.root_dir)
    tokenizer = load_tokenizer(main_spec.name_or_path)
    policy = add_lora(load_main(main_spec, device), settings.lora)
    base_hash = weights_sha256(policy, exclude="lora_")
    records = datamodule.test_records()
    scores = evaluate_models(cfg, {"main": (policy, tokenizer)}, fmt, records)  # zero-initialised adapters: the main model

    module = GRPOModule(policy, tokenizer, fmt, settings, reward_config(cfg), base_sha256=base_hash)
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    max_steps = settings.steps if cfg.trainer.max_steps in (None, -1) else cfg.trainer.max_steps
    trainer = build_trainer(cfg, max_steps=max_steps)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    final_hash = weights_sha256(module.policy, exclude="lora_")
    write_json(out / "base_sha256.json", {"start": base_hash, "end": final_hash, "unchanged": final_hash == base_hash})
    if final_hash != base_hash:
        raise SystemExit(f"error: the 4-bit base weights under the adapters changed during training; the run in {out} is not valid")
    if trainer.is_global_zero:
        scores += evaluate_models(cfg, {"grpo": (module.policy.to(device), tokenizer)}, fmt, records)
        write_eval(out, scores, datamodule.skip_counts(), f"GRPO on {cfg.backbone.name}: {trainer.global_step} steps")


METHODS = {"warmstart": run_warmstart, "evaluate": run_evaluate, "dlr": run_dlr, "grpo": run_grpo}


def run(cfg: DictConfig) -> None:
    if cfg.method.name not in METHODS:
        raise SystemExit(f"error: method.name must be one of {sorted(METHODS)}, got {cfg.method.name!r}")
    reward_config(cfg), prompt_format(cfg)  # a bad reward or prompt setting fails before any model loads
    out = output_dir(cfg)
    check_writable(out)
    OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(cfg.get("num_threads") or torch.get_num_threads())
    METHODS[cfg.method.name](cfg, out)
