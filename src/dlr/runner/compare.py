"""The comparison: every arm x seed from the same start, each trained until the same budget is spent and
evaluated on the way, with the forgetting and retention checks; then the report over all of them."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dlr.accounting import BUDGET_KINDS, reset_peak_memory
from dlr.callbacks.budget import BudgetMeter
from dlr.callbacks.evaluation import AlignmentEval
from dlr.data.datamodule import HUB_SOURCES, ReasoningDataModule
from dlr.data.schema import Record
from dlr.methods.dlr_module import DLRSettings
from dlr.methods.grpo_module import GRPOSettings
from dlr.methods.stage1 import STAGE1_COMMANDS, shipped_stage1_folder
from dlr.methods.warmstart_module import encode_sft_batch
from dlr.models.backbones import PromptFormat
from dlr.report.claims import claims_table
from dlr.report.report import SeedResult, arm_summary, write_report
from dlr.runner.arms import ARMS, Arm, check_protected, fit, method_settings, own_chain_scores
from dlr.runner.common import (
    device_name,
    evaluation_device,
    is_rank_zero,
    project_path,
    prompt_format,
    reward_config,
    write_json,
)
from dlr.scoring import DepthScore, SampledScore, overall_accuracy, sampled_by_depth, scores_as_dicts

log = logging.getLogger(__name__)


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
    return phase_datamodule(cfg, source).test_records()


def heldout_nll(
    model_and_tokenizer: tuple, fmt: PromptFormat, records: Sequence[Record], logit_positions: int
) -> float:
    """Mean NLL per token of the gold completions of `records`, written as the main writes its own chain
    (`PromptFormat.gold_completion`). Each forward pass computes full-vocabulary logits at no more than
    `logit_positions` completion positions (a boolean `logits_to_keep`), so peak memory is bounded by
    logit_positions x vocabulary, whatever the batch; a completion longer than that is scored in pieces."""
    if logit_positions < 1:
        raise ValueError(f"eval.nll_logit_positions must be at least 1, got {logit_positions}")
    model, tokenizer = model_and_tokenizer
    device = next(model.parameters()).device
    prompts = [fmt.prompt(r.question, tokenizer) for r in records]
    completions = [fmt.gold_completion(r.cot, r.answer, tokenizer.eos_token or "") for r in records]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for rows, first, last in nll_pieces(prompts, completions, tokenizer, logit_positions):
            ids, mask, labels = encode_sft_batch(
                [prompts[i] for i in rows], [completions[i] for i in rows], tokenizer, max_length=NLL_MAX_LENGTH
            )
            targets = labels[:, 1:]  # [B, L-1]: the token each position predicts
            keep = torch.zeros_like(ids, dtype=torch.bool)  # [B, L]: positions whose logits this pass computes
            keep[:, :-1] = targets != -100
            positions = keep.cumsum(dim=1) - 1  # [B, L]: each kept position's index within its row
            keep &= (positions >= first) & (positions < last)
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device)
            ).logits  # [N, V], N <= logit_positions
            gold = targets[keep[:, :-1]].to(device)  # [N]
            total += float(torch.nn.functional.cross_entropy(logits.float(), gold, reduction="sum"))
            tokens += gold.numel()
    return total / max(tokens, 1)


NLL_MAX_LENGTH = 4096  # tokens of prompt and gold completion scored by the held-out NLL


def nll_pieces(
    prompts: list[str], completions: list[str], tokenizer, logit_positions: int
) -> list[tuple[list[int], int, int]]:
    """The held-out NLL's forward passes: (rows, first, last), scoring completion tokens first..last-1 of
    each row. Consecutive rows share a pass while their scored tokens fit `logit_positions`; a row longer
    than that gets passes of its own, one per piece."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    scored = [  # next-token targets per row, as encode_sft_batch truncates and labels it
        max(min(len(p) + len(c), NLL_MAX_LENGTH) - max(len(p), 1), 0)
        for p, c in zip(prompt_ids, completion_ids, strict=True)
    ]
    pieces, group, group_tokens = [], [], 0
    for row, count in enumerate(scored):
        if count > logit_positions:
            pieces += [([row], first, first + logit_positions) for first in range(0, count, logit_positions)]
            continue
        if group and group_tokens + count > logit_positions:
            pieces.append((group, 0, logit_positions))
            group, group_tokens = [], 0
        group, group_tokens = group + [row], group_tokens + count
    if group:
        pieces.append((group, 0, logit_positions))
    return pieces


def phase_name(phase: str | DictConfig) -> str:
    """A continual phase's name: its data source, or the `name` of a phase given as data overrides."""
    return phase if isinstance(phase, str) else phase.name


def phase_datamodule(cfg: DictConfig, phase: str | DictConfig) -> ReasoningDataModule:
    """The configured data settings for one continual phase: another source (its own splits, no local
    file), or `{name, data}`, the configured data with the phase's `data` overrides (its training depths)."""
    data = copy.deepcopy(cfg.data)
    if isinstance(phase, str):
        with open_dict(data):  # that source's own splits, no local files
            data.source, data.mix_weights = phase, None
            for key in ("train_split", "test_split", "local_path", "train_path", "test_path"):
                data[key] = None
    else:
        if set(phase) != {"name", "data"}:
            raise SystemExit(f"error: a method.phases entry is a data source or {{name, data}}, got {dict(phase)}")
        data = OmegaConf.merge(data, phase.data)
    datamodule = instantiate(data)
    datamodule.check_source()
    return datamodule


def phase_test_records(cfg: DictConfig, phase: str | DictConfig) -> list[Record]:
    """What retention measures of a phase: its test set at the depths it trained on (all of a hub set)."""
    datamodule = phase_datamodule(cfg, phase)
    spec = datamodule.train_spec
    records = datamodule.test_records()
    return records if spec is None else [r for r in records if spec.min_depth <= r.depth <= spec.max_depth]


SCORE_LISTS = ("final_scores", "start_scores", "other_task_before_scores", "other_task_after_scores")


def load_seed_result(path: Path) -> SeedResult:
    """A finished (arm, seed)'s `result.json`, as the report reads it. One written before the results kept
    each test problem's outcome cannot be paired problem by problem: it stops the run, saying so."""
    fields = json.loads(path.read_text())
    scores = {key: [DepthScore(**s) for s in fields.get(key, [])] for key in SCORE_LISTS}
    if "sampled" not in fields or any(len(s.correct) != s.n for s in scores["final_scores"]):
        raise SystemExit(
            f"error: {path} was written before results kept each test problem's outcome and sampled attempts, "
            "which the report's intervals and sampled metrics need; move its folder aside to rerun that arm and seed"
        )
    return SeedResult(**{**fields, **scores, "sampled": [SampledScore(**s) for s in fields["sampled"]]})


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
    return {
        "readout": module.settings.readout,
        "free_answer_cue": module.readout.free_answer_cue,  # the report marks its format rate not applicable
        "filter": module.settings.rl.filter,
        "alignment": alignment,
        "after_alignment": scores_as_dicts(after),
    }


def train_arm_seed(
    cfg: DictConfig, name: str, kind: str, seed: int, out: Path, fractions: list[float], common_start: dict
):
    """One (arm, seed) of a comparison: train each phase until its budget is spent, evaluating on the way.
    `common_start` holds the forgetting check's start, measured by the first (arm, seed) that needs it.

    Rerun in the same folder (`hydra.run.dir=` a killed run's folder), a finished (arm, seed) is read
    from its `result.json` and an interrupted one resumes from its `checkpoints/last.ckpt` with its
    budget meter, data position and random state (continual runs restart the interrupted arm instead).
    Under DDP the other ranks only train (and return None); rank 0 evaluates and writes.
    """
    arm_cfg = arm_config(cfg, name, seed, out)
    seed_dir = Path(arm_cfg.paths.output_dir)
    if (seed_dir / "result.json").exists():
        log.info("%s seed %d: finished earlier, reading %s", name, seed, seed_dir / "result.json")
        return load_seed_result(seed_dir / "result.json")
    last = seed_dir / "checkpoints" / "last.ckpt"
    phases = list(cfg.method.get("phases") or [])  # data sources (or depth ranges) trained one after the other
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
    label = seed_label(name, seed)
    others = other_task_records(arm_cfg, cfg.method.other_task) if cfg.method.other_task and rank_zero else []
    if "before" not in common_start:  # the same frozen main and test set for every arm and seed
        common_start["before"] = main_text_chain_probe(cfg, arm, fmt, others, label)
    before = common_start["before"]
    training = train_phases(cfg, arm_cfg, arm, kind, name, seed, phases, fractions)
    if not rank_zero:
        return None
    unchanged = check_protected(arm, start_hash, Path(arm_cfg.paths.output_dir))
    sampled = arm_sampled(cfg, arm, training.records, label) if cfg.method.samples_per_problem else []
    meter = training.meters[-1]  # curves and final scores: the last phase's
    final = meter.points[-1].scores if meter.points[-1].fraction >= 1.0 else arm.evaluate(training.records, label)
    after = other_task_probe(arm, fmt, others, label, cfg.eval.nll_logit_positions)
    arm_info = dlr_arm_info(arm, training.meters[0], training.aligner) if kind == "dlr" else {}
    result = seed_result(seed, training, final, before, after, unchanged, sampled, arm_info)
    # Kept as soon as it exists: a later arm that crashes does not lose this one.
    write_json(Path(arm_cfg.paths.output_dir) / "result.json", dataclasses.asdict(result))
    return result


@dataclass
class ArmTraining:
    """What training one (arm, seed) through its phases leaves for its result."""

    meters: list[BudgetMeter]  # one per phase
    aligner: list[AlignmentEval]  # the last phase's evaluation after stage 1, when it ran one
    records: Sequence[Record]  # the last phase's test set
    retention: dict[str, dict[str, float]]  # after phase -> {task source: accuracy}


def seed_label(name: str, seed: int) -> str:
    """The model label of an (arm, seed)'s scores."""
    return f"{name}/seed_{seed}"


def train_phases(
    cfg: DictConfig,
    arm_cfg: DictConfig,
    arm: Arm,
    kind: str,
    name: str,
    seed: int,
    phases: list[str | DictConfig],
    fractions: list[float],
) -> ArmTraining:
    """Train the arm on each phase's data in turn (the configured data without phases); after each phase,
    rank 0 measures the accuracy on every phase's test problems so far (`phase_test_records`)."""
    label = seed_label(name, seed)
    training = ArmTraining([], [], [], {})
    for index, phase in enumerate(phases or [None]):
        if phase is not None:
            arm.datamodule = phase_datamodule(arm_cfg, phase)
        training.records = arm.datamodule.test_records()
        meter = phase_meter(cfg, arm, label, training.records, fractions, first=not training.meters)
        log.info(
            "%s seed %d%s: training until %g %s are spent",
            name,
            seed,
            f" on {phase_name(phase)}" if phase is not None else "",
            cfg.budget.amount,
            cfg.budget.kind,
        )
        training.aligner = (
            [AlignmentEval(cfg.eval.batch_size)]
            if kind == "dlr" and not training.meters and arm.module.settings.alignment.steps
            else []
        )
        fit(arm_cfg, arm, extra_callbacks=[meter, *training.aligner], budgeted=True)
        training.meters.append(meter)
        if phase is not None and is_rank_zero():  # every phase's problems so far, after this phase
            training.retention[phase_name(phase)] = {
                phase_name(earlier): overall_accuracy(arm.evaluate(phase_test_records(arm_cfg, earlier), label))
                for earlier in phases[: index + 1]
            }
    return training


def phase_meter(
    cfg: DictConfig, arm: Arm, label: str, records: Sequence[Record], fractions: list[float], first: bool
) -> BudgetMeter:
    """The budget meter of one phase, with its start evaluated (rank 0) and, in the first phase, the
    recorded cost of a shipped stage 1 already charged when stage 1 counts."""
    evaluate = (lambda module, r=records: arm.evaluate(r, label)) if is_rank_zero() else None
    meter = BudgetMeter(
        cfg.budget.kind, cfg.budget.amount, evaluate, fractions, include_alignment=cfg.budget.include_alignment
    )
    shipped = getattr(arm.module, "stage1_info", None)
    if shipped and cfg.budget.include_alignment and first:  # the shipped stage 1's recorded cost
        meter.seconds, meter.flops = shipped["process_seconds"], shipped["flops"]
    meter.record(arm.module, 0.0)
    return meter


def main_text_chain_probe(
    cfg: DictConfig, arm: Arm, fmt: PromptFormat, others: Sequence[Record], label: str
) -> tuple[list[DepthScore], float | None]:
    """The forgetting check's common start for every arm: the frozen main writing its own chain on the
    other task (GRPO's adapters start at zero, so its policy is that main), and the held-out NLL. An
    untrained DLR pipeline (random projector and heads) would measure the projector, not forgetting."""
    if not others:
        return [], None
    scores = own_chain_scores(cfg, *arm.text_model, others, label)
    return scores, heldout_nll(arm.text_model, fmt, others, cfg.eval.nll_logit_positions)


def other_task_probe(
    arm: Arm, fmt: PromptFormat, others: Sequence[Record], label: str, logit_positions: int
) -> tuple[list[DepthScore], float | None]:
    """Scores on the other task's test set and the held-out NLL of its gold completions; none without one."""
    if not others:
        return [], None
    return arm.evaluate(others, label), heldout_nll(arm.text_model, fmt, others, logit_positions)


def arm_sampled(cfg: DictConfig, arm: Arm, records: Sequence[Record], label: str) -> list[SampledScore]:
    """`method.samples_per_problem` attempts per test problem at the arm's own sampling, scored."""
    return sampled_by_depth(
        records,
        arm.sample_attempts,
        cfg.method.samples_per_problem,
        label=label,
        batch_size=cfg.eval.batch_size,
        reward=reward_config(cfg),
    )


def seed_result(
    seed: int,
    training: ArmTraining,
    final: list[DepthScore],
    before: tuple[list[DepthScore], float | None],
    after: tuple[list[DepthScore], float | None],
    unchanged: bool,
    sampled: list[SampledScore],
    arm_info: dict,
) -> SeedResult:
    """The (arm, seed)'s result: the last phase's curve, what all phases spent, the forgetting probes
    (`before`, `after`: other-task scores and held-out NLL), the sampled attempts and the stability measures."""
    meters, meter = training.meters, training.meters[-1]
    return SeedResult(
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
            "questions": sum(m.questions for m in meters),
            "main_decoded_sequences": sum(m.main_decoded_sequences for m in meters),
            "main_forward_positions": sum(m.main_forward_positions for m in meters),
        },
        other_task_before=overall_accuracy(before[0]) if before[0] else None,
        other_task_after=overall_accuracy(after[0]) if after[0] else None,
        heldout_nll_before=before[1],
        heldout_nll_after=after[1],
        grad_norm_cv=meter.grad_norm_cv(),
        protected_unchanged=unchanged,
        trace=vars(meter.trace),
        retention=training.retention,
        sampled=sampled,
        start_scores=meters[0].points[0].scores,
        arm_info=arm_info,
        other_task_before_scores=before[0],
        other_task_after_scores=after[0],
    )


def run_dlr_vs_grpo(cfg: DictConfig, out: Path) -> None:
    """Every arm x seed from the same starting backbone, each stopped by the budget meter; then the report."""
    seeds = (
        cfg.method.seeds
        if cfg.method.seeds is not None
        else ([0, 1, 2] if evaluation_device(cfg.trainer.accelerator) == "cuda" else [0, 1])
    )
    kinds = check_comparison(cfg, seeds, out)
    check_shipped_stage1(cfg, kinds, seeds, out)
    fractions = [round(cfg.method.eval_every * i, 6) for i in range(1, int(round(1 / cfg.method.eval_every)) + 1)]
    common_start: dict = {}
    results = {
        name: [train_arm_seed(cfg, name, kinds[name], seed, out, fractions, common_start) for seed in seeds]
        for name in cfg.method.arms
    }
    if not is_rank_zero():
        return
    summary = {
        "experiment": cfg.task_name,
        "device": device_name(cfg.trainer.accelerator),
        "budget": {"kind": cfg.budget.kind, "amount": float(cfg.budget.amount)},
        "samples_per_problem": cfg.method.samples_per_problem,
        "pass_at_k": cfg.method.pass_at_k if cfg.method.samples_per_problem else None,
        "arms": {
            name: arm_summary(seed_results, kinds[name], cfg.method.pass_at_k) for name, seed_results in results.items()
        },
    }
    procedural = cfg.data.source not in HUB_SOURCES  # a hub dataset trains on every depth (its step count)
    summary["trained_depths"] = list(cfg.data.train_depths) if procedural else None  # inclusive range, or none
    summary["claims"] = claims_table(summary, results, summary["trained_depths"], cfg.method.other_task)
    short = write_report(summary, results, out)
    print("\n".join([*short, f"report: {out / 'report.md'}"]))


def check_comparison(cfg: DictConfig, seeds: Sequence[int], out: Path) -> dict[str, str]:
    """Every setting of the comparison, checked now, not when its arm's turn comes after hours of the
    others; a null budget.amount becomes the kind's default. Returns each arm's kind."""
    if not cfg.method.arms or not seeds:
        raise SystemExit("error: method.arms and method.seeds must each name at least one")
    if not 0 < cfg.method.eval_every <= 1:
        raise SystemExit(f"error: method.eval_every must be in (0, 1], got {cfg.method.eval_every}")
    samples, k = cfg.method.samples_per_problem, cfg.method.pass_at_k
    if not isinstance(samples, int) or samples < 0:
        raise SystemExit(f"error: method.samples_per_problem must be an integer >= 0, got {samples!r}")
    if samples and (not isinstance(k, int) or not 1 <= k <= samples):
        raise SystemExit(
            f"error: method.pass_at_k must be an integer in [1, method.samples_per_problem={samples}], got {k!r}"
        )
    kinds = {name: arm_kind(cfg, name) for name in cfg.method.arms}  # fails now on an unknown arm
    if cfg.budget.kind not in BUDGET_KINDS:
        raise SystemExit(f"error: budget.kind must be one of {BUDGET_KINDS}, got {cfg.budget.kind!r}")
    if cfg.budget.amount is None:  # the kind's default; seconds by device: a GPU does the CPU's work in far fewer
        with open_dict(cfg):
            if cfg.budget.kind == "flops":
                cfg.budget.amount = cfg.budget.amount_flops
            else:
                gpu = evaluation_device(cfg.trainer.accelerator) == "cuda"
                cfg.budget.amount = cfg.budget.amount_gpu if gpu else cfg.budget.amount_cpu
    try:
        BudgetMeter(cfg.budget.kind, cfg.budget.amount)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for name, kind in kinds.items():
        method_settings({"dlr": DLRSettings, "grpo": GRPOSettings}[kind], arm_config(cfg, name, seeds[0], out))
    return kinds


def check_shipped_stage1(cfg: DictConfig, kinds: dict[str, str], seeds: Sequence[int], out: Path) -> None:
    """Every DLR arm that starts from a shipped stage 1 (`method.alignment.init_from`) finds its
    readout's files now, before any model loads, not when its turn comes after the other arms trained."""
    for name, kind in kinds.items():
        if kind != "dlr":
            continue
        settings = method_settings(DLRSettings, arm_config(cfg, name, seeds[0], out))
        if not settings.alignment.init_from:
            continue
        path = project_path(settings.alignment.init_from, cfg.paths.root_dir)
        try:
            shipped_stage1_folder(path, settings.readout, STAGE1_COMMANDS[settings.readout])
        except ValueError as err:
            raise SystemExit(f"error: arm {name}: {err}") from None
