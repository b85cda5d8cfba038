"""What `src/train.py` runs: one function per `method.name`, each writing into the run folder.

The flow follows lightning-hydra-template: seed, instantiate data, model, callbacks, loggers and trainer
from the config, fit, evaluate, write results beside the resolved config.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf, open_dict

from dlr.callbacks.evaluation import AlignmentEval
from dlr.callbacks.progress import StepProgressBar
from dlr.data.datamodule import ReasoningDataModule
from dlr.data.schema import Record
from dlr.methods.guard import NonFiniteTraining
from dlr.models import tiny
from dlr.models.backbones import ModelSpec, PromptFormat, load_assistant, load_main, load_tokenizer, resolve_path
from dlr.resume import resolve_ckpt_path
from dlr.rewards import RewardConfig
from dlr.scoring import DepthScore, depth_table, evaluate_by_depth, scores_as_dicts

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    """The run folder: Hydra's when Hydra runs us, else `paths.output_dir` (tests, notebooks)."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def is_rank_zero() -> bool:
    """Rank 0 writes results and runs evaluations. A DDP child process knows its rank from the
    environment from its start, before any Trainer exists."""
    return rank_zero_only.rank == 0


def check_writable(folder: Path) -> None:
    """Fail at start, not after an hour of training, when results could not be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe_{os.getpid()}"  # DDP processes probe the same folder at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SystemExit(
            f"error: the run folder {folder} is not writable ({err}); set paths.log_dir to a writable folder"
        ) from err


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


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None, **overrides) -> L.Trainer:
    """The Trainer of `cfg.trainer` with the configured loggers and callbacks; `extra_callbacks` go first."""
    loggers = instantiate_list(cfg.get("logger"))
    callbacks = list(extra_callbacks or []) + instantiate_list(cfg.get("callbacks"))
    if not loggers:  # Lightning refuses a learning-rate monitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(StepProgressBar())  # Lightning's default would count epochs, which a stream never ends
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)


def rl_ddp_strategy(module: L.LightningModule) -> DDPStrategy:
    """What `trainer.strategy=ddp` builds for an RL arm. The modules' buffers are per-rank counters
    (FLOPs, tokens) that DDP must not overwrite with rank 0's at every forward; a module whose steps
    leave some parameters without a gradient says so. Between arms rank 0 evaluates alone while the
    other ranks wait in a collective, so the timeout is hours, not DDP's 30 minutes."""
    # Lightning deprecates the flag but keeps it for rank-local buffers, which these are.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    return DDPStrategy(
        find_unused_parameters=module.ddp_unused_parameters, broadcast_buffers=False, timeout=timedelta(hours=4)
    )


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
    if cfg.method.init_from:  # a curriculum phase: continue from saved weights, not from scratch
        start = (
            Path(cfg.method.init_from)
            if Path(cfg.method.init_from).is_absolute()
            else Path(cfg.paths.root_dir) / cfg.method.init_from
        )
        if not (start / "main").is_dir():
            raise SystemExit(f"error: method.init_from={cfg.method.init_from} has no main/ folder to start from")
        main = LlamaForCausalLM.from_pretrained(start / "main", dtype=torch.float32)
        assistant_dir = (
            start / "assistant"
            if (start / "assistant").is_dir()
            else Path(cfg.paths.data_dir) / "backbones/tiny/assistant"
        )
        assistant = Qwen2ForCausalLM.from_pretrained(assistant_dir, dtype=torch.float32)
        log.info("warm start continues from %s (assistant from %s)", start, assistant_dir)
    else:
        main = LlamaForCausalLM(tiny.main_config(tokenizer, tiny.TinyShape(**shapes.main)))
        assistant = Qwen2ForCausalLM(tiny.assistant_config(tokenizer, tiny.TinyShape(**shapes.assistant)))
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
            target = export_target(cfg.method.export_to, cfg.paths.root_dir)
            for name, _ in trained:  # an untrained assistant keeps its exported copy
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


def _settings(cls, cfg: DictConfig):
    try:
        return cls.from_dict(OmegaConf.to_container(cfg.method, resolve=True))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def arm_fault_injection(cfg: DictConfig, module) -> None:
    """`debug.inject_nonfinite_at_step`: make the loss NaN at that step, for testing the guard."""
    from dlr.methods.guard import NonFiniteGuard

    debug = cfg.get("debug") or {}
    if debug.get("inject_nonfinite_at_step") is not None:
        module.guard = NonFiniteGuard(
            module.settings.max_consecutive_nonfinite,
            debug.inject_nonfinite_at_step,
            debug.get("inject_nonfinite_times", 1),
        )


STAGE1_COMMAND = "python src/train.py experiment=dlr_stage1_tiny"  # regenerates the shipped tiny stage 1


def project_path(path: str, root_dir: str) -> Path:
    """A relative path is taken from the project root (Hydra runs in the run folder)."""
    return Path(path) if Path(path).is_absolute() else Path(root_dir) / path


def setup_dlr(cfg: DictConfig) -> Arm:
    """Frozen main + LoRA assistant + latent policy, projector and critic."""
    from dlr.methods.dlr_module import DLRModule, DLRSettings
    from dlr.models.backbones import weights_sha256

    settings = _settings(DLRSettings, cfg)
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
        from dlr.methods.stage1 import load_stage1

        folder = project_path(settings.alignment.init_from, cfg.paths.root_dir)
        try:
            module.stage1_info = load_stage1(module, folder, STAGE1_COMMAND)
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
    from dlr.methods.grpo_module import GRPOModule, GRPOSettings
    from dlr.models.backbones import add_lora, weights_sha256

    settings = _settings(GRPOSettings, cfg)
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
        return evaluate_by_depth(
            module.policy.to(device),
            tokenizer,
            fmt,
            records,
            label=label,
            mode="cot",
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
            reward=reward_config(cfg),
        )

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
    from dlr.methods.stage1 import export_stage1

    settings = arm.module.settings
    if settings.rl.steps:
        raise SystemExit("error: method.alignment.export_to saves stage 1 alone: set method.rl.steps=0")
    folder = project_path(settings.alignment.export_to, cfg.paths.root_dir)
    info = {
        "alignment_steps": settings.alignment.steps,
        "batch_size": cfg.data.batch_size,
        "lr": settings.alignment.lr,
        "pull_weight": settings.alignment.pull_weight,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "flops": float(arm.module.flops_spent),
        "process_seconds": seconds,  # training only, on this machine
        "device": device_name(cfg.trainer.accelerator),
        "accuracy_by_depth": {f"{s.task}/{s.depth}": s.accuracy for s in aligned},
        "command": STAGE1_COMMAND,
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


def arm_kind(cfg: DictConfig, name: str) -> str:
    """`dlr` or `grpo` for an arm name: itself, or the base arm of a variant in `method.variants`."""
    variants = cfg.method.get("variants") or {}
    kind = variants[name].arm if name in variants else name
    if kind not in ARMS:
        raise SystemExit(f"error: arm {name!r} is neither one of {sorted(ARMS)} nor a variant in method.variants")
    return kind


def arm_config(cfg: DictConfig, name: str, seed: int, out: Path) -> DictConfig:
    """The single-arm config of one (arm, seed) run of a comparison, writing under `out/name/seed_N`.
    A variant's `overrides` are merged into its base arm's settings."""
    kind = arm_kind(cfg, name)
    variants = cfg.method.get("variants") or {}
    arm_cfg = copy.deepcopy(cfg)
    with open_dict(arm_cfg):
        # resolved against the comparison's config: an arm's settings may read the other arm's (DLR's decode budget)
        arm_cfg.method = OmegaConf.create(OmegaConf.to_container(cfg.method[kind], resolve=True))
        if name in variants:
            arm_cfg.method = OmegaConf.merge(arm_cfg.method, variants[name].get("overrides") or {})
        arm_cfg.seed = seed
        arm_cfg.paths.output_dir = str(out / name / f"seed_{seed}")
        arm_cfg.data.batch_size = cfg.backbone[f"{kind}_scale"].questions_per_batch
        arm_cfg.ckpt_path = None
        if arm_cfg.get("logger") and arm_cfg.logger.get("tensorboard"):  # all arms, all seeds side by side
            arm_cfg.logger.tensorboard.save_dir = str(out / "tensorboard")
            arm_cfg.logger.tensorboard.version = f"{name}_seed_{seed}"
    return arm_cfg


def other_task_records(cfg: DictConfig, source: str) -> list[Record]:
    """The fixed test set of data source `source` with the same depths and sizes: the forgetting check."""
    other = copy.deepcopy(cfg.data)
    with open_dict(other):  # that source's own splits and no local file
        other.source, other.mix_weights, other.train_split, other.test_split, other.local_path = (
            source,
            None,
            None,
            None,
            None,
        )
    return instantiate(other).test_records()


def heldout_nll(model_and_tokenizer: tuple, fmt: PromptFormat, records: Sequence[Record], batch_size: int) -> float:
    """Mean NLL per token of the gold completions (`<bol> reasoning <eol> #### answer`) of `records`."""
    from dlr.methods.warmstart_module import encode_sft_batch, sft_completion

    model, tokenizer = model_and_tokenizer
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            prompts = [fmt.prompt(r.question, tokenizer) for r in chunk]
            completions = [sft_completion(r, fmt, tokenizer.eos_token or "", with_reasoning=True) for r in chunk]
            ids, mask, labels = encode_sft_batch(prompts, completions, tokenizer, max_length=4096)
            count = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            total, tokens = total + float(loss) * count, tokens + count
    return total / max(tokens, 1)


def device_name(accelerator: str) -> str:
    if evaluation_device(accelerator) == "cuda":
        return torch.cuda.get_device_name()
    import platform

    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({model}, {torch.get_num_threads()} threads)"


def phase_datamodule(cfg: DictConfig, source: str) -> ReasoningDataModule:
    """The configured data settings with another source (its own splits, no local file)."""
    data = copy.deepcopy(cfg.data)
    with open_dict(data):
        data.source, data.mix_weights, data.train_split, data.test_split, data.local_path = (
            source,
            None,
            None,
            None,
            None,
        )
    datamodule = instantiate(data)
    datamodule.check_source()
    return datamodule


def load_seed_result(path: Path):
    """A finished (arm, seed)'s `result.json`, as the report reads it."""
    from dlr.report.report import SeedResult

    fields = json.loads(path.read_text())
    scores = {key: [DepthScore(**s) for s in fields.get(key, [])] for key in ("final_scores", "start_scores")}
    return SeedResult(**{**fields, **scores})


def dlr_arm_info(arm: Arm, meter, aligner: list) -> dict:
    """DLR's readout, what its stage 1 cost, and its greedy scores after stage 1, before any RL step."""
    module = arm.module
    shipped = module.stage1_info
    alignment = {
        "source": "shipped" if shipped else "trained in the run",
        "shipped_from": module.settings.alignment.init_from if shipped else None,
        "steps": (shipped["alignment_steps"] if shipped else 0) + module.settings.alignment.steps,
        "flops": (shipped["flops"] if shipped else 0.0) + meter.alignment_flops,
        "process_seconds": (shipped["process_seconds"] if shipped else 0.0) + meter.alignment_seconds,
        "counted_in_budget": meter.include_alignment,
    }
    after = aligner[0].scores if aligner else meter.points[0].scores  # no steps in the run: the start is stage 1
    return {"readout": module.settings.readout, "alignment": alignment, "after_alignment": scores_as_dicts(after)}


def train_arm_seed(cfg: DictConfig, name: str, kind: str, seed: int, out: Path, fractions: list[float]):
    """One (arm, seed) of a comparison: train each phase until its budget is spent, evaluating on the way.

    Rerun in the same folder (`hydra.run.dir=` a killed run's folder), a finished (arm, seed) is read
    from its `result.json` and an interrupted one resumes from its `checkpoints/last.ckpt` with its
    budget meter, data position and random state (continual runs restart the interrupted arm instead).
    Under DDP the other ranks only train (and return None); rank 0 evaluates and writes.
    """
    from dlr.accounting import reset_peak_memory
    from dlr.callbacks.budget import BudgetMeter
    from dlr.report.report import SeedResult, overall_accuracy

    arm_cfg = arm_config(cfg, name, seed, out)
    seed_dir = Path(arm_cfg.paths.output_dir)
    if (seed_dir / "result.json").exists():
        log.info("%s seed %d: finished earlier, reading %s", name, seed, seed_dir / "result.json")
        return load_seed_result(seed_dir / "result.json")
    last = seed_dir / "checkpoints" / "last.ckpt"
    phases = list(cfg.method.get("phases") or [])  # data sources trained one after the other
    if last.exists() and not phases:
        log.info("%s seed %d: resuming from %s", name, seed, last)
        with open_dict(arm_cfg):
            arm_cfg.ckpt_path = str(last)
    reset_peak_memory(torch.device(evaluation_device(cfg.trainer.accelerator)))  # the previous arm is gone
    L.seed_everything(seed, workers=True)
    arm = ARMS[kind](arm_cfg)
    rank_zero = is_rank_zero()
    fmt = prompt_format(cfg)
    start_hash = arm.protected_hash() if rank_zero else ""
    label = f"{name}/seed_{seed}"
    others = other_task_records(arm_cfg, cfg.method.other_task) if cfg.method.other_task and rank_zero else []
    other_before = overall_accuracy(arm.evaluate(others, label)) if others else None
    nll_before = heldout_nll(arm.text_model, fmt, others, cfg.eval.batch_size) if others else None
    retention: dict[str, dict[str, float]] = {}  # after phase -> {task source: accuracy}
    meters = []
    for source in phases or [None]:
        if source is not None:
            arm.datamodule = phase_datamodule(arm_cfg, source)
        records = arm.datamodule.test_records()
        evaluate = (lambda module, r=records: arm.evaluate(r, label)) if rank_zero else None
        meter = BudgetMeter(
            cfg.budget.kind, cfg.budget.amount, evaluate, fractions, include_alignment=cfg.budget.include_alignment
        )
        shipped = getattr(arm.module, "stage1_info", None)
        if shipped and cfg.budget.include_alignment and not meters:  # the shipped stage 1's recorded cost
            meter.seconds, meter.flops = shipped["process_seconds"], shipped["flops"]
        meter.record(arm.module, 0.0)
        log.info(
            "%s seed %d%s: training until %g %s are spent",
            name,
            seed,
            f" on {source}" if source else "",
            cfg.budget.amount,
            cfg.budget.kind,
        )
        aligner = (
            [AlignmentEval(cfg.eval.batch_size)]
            if kind == "dlr" and not meters and arm.module.settings.alignment.steps
            else []
        )
        fit(arm_cfg, arm, extra_callbacks=[meter, *aligner], budgeted=True)
        meters.append(meter)
        if source is not None and rank_zero:  # every phase's task so far, after this phase
            retention[source] = {
                task: overall_accuracy(arm.evaluate(phase_datamodule(arm_cfg, task).test_records(), label))
                for task in phases[: phases.index(source) + 1]
            }
    if not rank_zero:
        return None
    unchanged = check_protected(arm, start_hash, Path(arm_cfg.paths.output_dir))
    pass_at_k = None
    if cfg.method.pass_at_k:
        from dlr.scoring import pass_at_k_by_depth

        pass_at_k = overall_accuracy(
            pass_at_k_by_depth(
                records,
                arm.sample_attempts,
                cfg.method.pass_at_k,
                label=label,
                batch_size=cfg.eval.batch_size,
                reward=reward_config(cfg),
            )
        )
    meter = meters[-1]  # curves and final scores: the last phase's
    final = meter.points[-1].scores if meter.points[-1].fraction >= 1.0 else arm.evaluate(records, label)
    result = SeedResult(
        seed=seed,
        curve=[
            {
                "budget_fraction": p.fraction,
                "seconds": p.seconds,
                "flops": p.flops,
                "generated_tokens": p.generated_tokens,
                "accuracy": overall_accuracy(p.scores),
            }
            for p in meter.points
        ],
        final_scores=final,
        spent={
            "seconds": sum(m.seconds for m in meters),
            "flops": sum(m.flops for m in meters),
            "generated_tokens": sum(m.generated_tokens for m in meters),
            "peak_memory_gb": max(m.peak_memory for m in meters) / 2**30,
        },
        other_task_before=other_before,
        other_task_after=overall_accuracy(arm.evaluate(others, label)) if others else None,
        heldout_nll_before=nll_before,
        heldout_nll_after=heldout_nll(arm.text_model, fmt, others, cfg.eval.batch_size) if others else None,
        grad_norm_cv=meter.grad_norm_cv(),
        protected_unchanged=unchanged,
        trace=vars(meter.trace),
        retention=retention,
        pass_at_k=pass_at_k,
        start_scores=meters[0].points[0].scores,
        arm_info=dlr_arm_info(arm, meters[0], aligner) if kind == "dlr" else {},
    )
    # Kept as soon as it exists: a later arm that crashes does not lose this one.
    write_json(
        Path(arm_cfg.paths.output_dir) / "result.json",
        {**dataclasses.asdict(result), "final_scores": scores_as_dicts(result.final_scores)},
    )
    return result


def run_dlr_vs_grpo(cfg: DictConfig, out: Path) -> None:
    """Every arm x seed from the same starting backbone, each stopped by the budget meter; then the report."""
    from dlr.report.report import arm_summary, write_report

    seeds = (
        cfg.method.seeds
        if cfg.method.seeds is not None
        else ([0, 1, 2] if evaluation_device(cfg.trainer.accelerator) == "cuda" else [0, 1])
    )
    if not cfg.method.arms or not seeds:
        raise SystemExit("error: method.arms and method.seeds must each name at least one")
    if not 0 < cfg.method.eval_every <= 1:
        raise SystemExit(f"error: method.eval_every must be in (0, 1], got {cfg.method.eval_every}")
    kinds = {name: arm_kind(cfg, name) for name in cfg.method.arms}  # fails now on an unknown arm
    from dlr.accounting import BUDGET_KINDS

    if cfg.budget.kind not in BUDGET_KINDS:
        raise SystemExit(f"error: budget.kind must be one of {BUDGET_KINDS}, got {cfg.budget.kind!r}")
    if cfg.budget.amount is None:  # the device's default: a GPU does the CPU's work in far fewer seconds
        if cfg.budget.kind != "seconds":
            raise SystemExit(f"error: a {cfg.budget.kind} budget needs budget.amount")
        with open_dict(cfg):
            cfg.budget.amount = (
                cfg.budget.amount_gpu if evaluation_device(cfg.trainer.accelerator) == "cuda" else cfg.budget.amount_cpu
            )
    fractions = [round(cfg.method.eval_every * i, 6) for i in range(1, int(round(1 / cfg.method.eval_every)) + 1)]
    # Every setting is checked now, not when its arm's turn comes after hours of the others.
    from dlr.callbacks.budget import BudgetMeter
    from dlr.methods.dlr_module import DLRSettings
    from dlr.methods.grpo_module import GRPOSettings

    try:
        BudgetMeter(cfg.budget.kind, cfg.budget.amount)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for name, kind in kinds.items():
        _settings({"dlr": DLRSettings, "grpo": GRPOSettings}[kind], arm_config(cfg, name, seeds[0], out))
    results = {
        name: [train_arm_seed(cfg, name, kinds[name], seed, out, fractions) for seed in seeds]
        for name in cfg.method.arms
    }
    if not is_rank_zero():
        return
    summary = {
        "experiment": cfg.task_name,
        "device": device_name(cfg.trainer.accelerator),
        "budget": {"kind": cfg.budget.kind, "amount": float(cfg.budget.amount)},
        "pass_at_k": cfg.method.pass_at_k,
        "arms": {name: arm_summary(seed_results) for name, seed_results in results.items()},
    }
    short = write_report(summary, results, out)
    print("\n".join([*short, f"report: {out / 'report.md'}"]))


METHODS = {
    "warmstart": run_warmstart,
    "evaluate": run_evaluate,
    "dlr": run_dlr,
    "grpo": run_grpo,
    "dlr_vs_grpo": run_dlr_vs_grpo,
}


def run(cfg: DictConfig) -> None:
    if cfg.method.name not in METHODS:
        raise SystemExit(f"error: method.name must be one of {sorted(METHODS)}, got {cfg.method.name!r}")
    reward_config(cfg), prompt_format(cfg)  # a bad reward or prompt setting fails before any model loads
    # A missing checkpoint fails here too; `last` becomes the newest of this task's.
    typed = cfg.get("ckpt_path")
    with open_dict(cfg):
        cfg.ckpt_path = resolve_ckpt_path(
            typed, Path(cfg.paths.log_dir) / cfg.task_name, comparison=cfg.method.name == "dlr_vs_grpo"
        )
    if cfg.ckpt_path != typed and is_rank_zero():
        print(f"ckpt_path={typed}: resuming from {cfg.ckpt_path}")
    out = output_dir(cfg)
    check_writable(out)
    if is_rank_zero():
        OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(cfg.get("num_threads") or torch.get_num_threads())
    METHODS[cfg.method.name](cfg, out)
