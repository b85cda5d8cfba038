"""The settings of both RL arms, `cfg.method` of `method=dlr` and `method=grpo`, validated once at start
so that a bad value fails before any training, with a message naming its config key.

No field has a default: configs/method/dlr.yaml and grpo.yaml are the one source of the values and
say what each means (docs/design.md §3). Tests and benchmarks build them with `dlr.config.settings_from_yaml`."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

from dlr.methods.losses import ADVANTAGE_SCALES, CONTRASTIVE_KINDS, LOSS_TYPES
from dlr.models.critic import FILTERS
from dlr.models.latent_policy import LATENT_INITS, LATENT_MODES
from dlr.models.projector import PROJECTORS
from dlr.models.readout import READOUTS

ANSWER_CHAINS = ("own", "forced")  # the chain stage 1's answer term reads (alignment.answer_chain)
# latent settings a readout decides when the config leaves them null (configs/method/dlr.yaml)
READOUT_DEFAULTS = {
    "rationale": {"mode": "parallel", "projector": "mlp"},
    "answer": {"mode": "recurrent", "projector": "soft_tokens"},
}


def default_latent_init(latent: dict) -> str:
    """latent.init left null: a recurrent soft-token chain at c=1 starts as the assistant's text chain
    (README: 100% at math depths 1-4 after 300 stage-1 steps, where fresh heads reached 80-85% in 1000-2000),
    anything else from fresh heads."""
    text_like = (latent.get("mode"), latent.get("projector"), latent.get("compression")) == (
        "recurrent",
        "soft_tokens",
        1,
    )
    return "assistant" if text_like else "random"


def from_values(cls, values: dict, key: str):
    """`cls(**values)` for the config node `key`; an unknown or a missing setting fails naming it."""
    known = {f.name for f in fields(cls)}
    unknown, missing = set(values) - known, known - set(values)
    if unknown:
        raise ValueError(f"{key} has unknown settings {sorted(unknown)}; known: {sorted(known)}")
    if missing:
        raise ValueError(f"{key} lacks the settings {sorted(missing)}: configs/method/ sets every one")
    return cls(**values)


def raise_first_failed(checks: list[tuple[bool, str]]) -> None:
    """Raise ValueError with the message of the first check that fails."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass(frozen=True)
class LatentSettings:
    steps: int  # T of parallel mode
    max_steps: int  # recurrent mode: the cap on a chain's length
    dim: int  # Dz
    mode: str  # parallel | recurrent (DLRSettings.from_dict fills a null from READOUT_DEFAULTS)
    projector: str  # mlp | soft_tokens (a null: READOUT_DEFAULTS)
    init: str  # random | assistant: a recurrent soft-token chain that starts as the assistant's text chain (null: default_latent_init)
    compression: int  # c: gold-chain tokens per latent in stage 1's targets
    num_modes: int
    log_sigma_min: float
    log_sigma_max: float
    log_sigma_init: float


@dataclass(frozen=True)
class AlignmentSettings:
    steps: int
    lr: float
    warmup_steps: int  # linear warm-up of the learning rate
    lr_floor: float  # the cosine's end, a fraction of lr (1 with no warm-up: constant)
    self_feed: float  # recurrent chains: share of fed-back steps that hold the policy's own latent
    pull_weight: float  # rationale readout: weight of the pull toward the chain's opening embeddings
    distill_weight: float  # recurrent chains: teacher-forced distillation to the gold chain
    stop_weight: float  # recurrent chains: the stop head's cross-entropy
    answer_weight: float  # recurrent chains: the main's NLL of the answer given the chain
    answer_chain: str  # own: the chain the policy writes on its own (closed loop) | forced: the teacher-forced one
    init_from: str | None  # a shipped stage 1 (folder) to start from
    export_to: str | None  # save the state after stage 1 here (folder), with the main's hash


@dataclass(frozen=True)
class RLSettings:
    steps: int
    lr: float
    heads_lr: float | None  # the latent heads' own learning rate (their own parameter group); None: lr
    num_samples: int  # G
    num_decoded: int  # K
    filter: str
    k_explore: int
    scale: str
    ppo_epochs: int
    clip_eps: float
    contrastive: str  # CONTRASTIVE_KINDS
    contrastive_normalize: bool  # dispersion: cos / tau instead of raw dot products
    lambda_con: float  # the contrastive term's weight (the paper's gamma)
    tau: float
    beta: float
    lambda_ent: float
    lambda_modes: float
    sigma_start: float | None  # latent sigma stage 2 starts from; None: the log-sigma head's own


@dataclass(frozen=True)
class CriticSettings:
    hidden: int
    lr: float
    warmup: int  # RL batches with a random filter before the critic chooses
    weight: float  # of L_critic in the stage-2 loss


@dataclass(frozen=True)
class DLRSettings:
    """`cfg.method` of `method=dlr`, validated once at start so a bad value fails before any training."""

    GROUPS: ClassVar[tuple[str, ...]] = ("latent", "alignment", "rl", "critic")  # nested groups of settings

    latent: LatentSettings
    alignment: AlignmentSettings
    rl: RLSettings
    critic: CriticSettings
    readout: str  # rationale: the main writes its own chain after the latents | answer
    max_new_tokens: dict  # decode budget by readout (training rollouts)
    eval_max_new_tokens: dict  # decode budget by readout at evaluation
    weight_decay: float
    grad_clip: float
    accumulate_grad_batches: int
    max_consecutive_nonfinite: int  # skipped steps in a row before the run stops

    @classmethod
    def from_dict(cls, values: dict) -> DLRSettings:
        """From the resolved `cfg.method` (its `name`, the dispatch key, is not a setting)."""
        groups = dict(zip(cls.GROUPS, (LatentSettings, AlignmentSettings, RLSettings, CriticSettings), strict=True))
        kwargs = {k: v for k, v in values.items() if k != "name"}
        latent, readout = kwargs.get("latent"), kwargs.get("readout")
        if isinstance(latent, dict) and readout in READOUT_DEFAULTS:  # an unknown readout fails below, by name
            defaults = READOUT_DEFAULTS[readout]
            latent = {**latent, **{k: defaults[k] for k in defaults if latent.get(k) is None}}
            kwargs["latent"] = {**latent, "init": latent.get("init") or default_latent_init(latent)}
        for key, group in groups.items():
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = from_values(group, kwargs[key], f"method.{key}")
        return from_values(cls, kwargs, "method")

    def __post_init__(self) -> None:
        rl, latent = self.rl, self.latent
        checks = [
            (self.readout in READOUTS, f"method.readout must be one of {READOUTS}, got {self.readout!r}"),
            (latent.mode in LATENT_MODES, f"method.latent.mode must be one of {LATENT_MODES}, got {latent.mode!r}"),
            (
                latent.projector in PROJECTORS,
                f"method.latent.projector must be one of {PROJECTORS}, got {latent.projector!r}",
            ),
            (
                isinstance(latent.max_steps, int) and latent.max_steps >= 1,
                f"method.latent.max_steps must be a whole number >= 1, got {latent.max_steps!r}",
            ),
            (
                isinstance(latent.compression, int)
                and not isinstance(latent.compression, bool)
                and latent.compression >= 1,
                f"method.latent.compression (gold-chain tokens per latent) must be a whole number >= 1, "
                f"got {latent.compression!r}",
            ),
            (
                latent.init in LATENT_INITS,
                f"method.latent.init must be one of {LATENT_INITS}, got {latent.init!r}",
            ),
            (
                latent.init != "assistant"
                or (latent.mode == "recurrent" and latent.projector == "soft_tokens" and latent.compression == 1),
                "method.latent.init=assistant starts the chain as the assistant's text chain, one soft token per "
                "token: it needs method.latent.mode=recurrent, projector=soft_tokens and compression=1, got "
                f"{latent.mode}, {latent.projector} and {latent.compression}",
            ),
            (
                latent.mode != "recurrent" or self.readout == "answer",
                "method.latent.mode=recurrent needs method.readout=answer: in the rationale readout the latents "
                "stand for the first method.latent.steps tokens of the main's chain, a fixed length",
            ),
            (
                latent.mode != "recurrent" or latent.num_modes == 1,
                "method.latent.num_modes > 1 needs method.latent.mode=parallel (a recurrent chain has one start)",
            ),
            (
                min(self.alignment.distill_weight, self.alignment.stop_weight, self.alignment.answer_weight) >= 0,
                "method.alignment.distill_weight, stop_weight and answer_weight must be >= 0",
            ),
            *(
                (
                    set(budgets) == set(READOUTS) and all(int(v) >= 1 for v in budgets.values()),
                    f"method.{key} needs a budget >= 1 for each readout {READOUTS}, got {budgets}",
                )
                for key, budgets in (
                    ("max_new_tokens", self.max_new_tokens),
                    ("eval_max_new_tokens", self.eval_max_new_tokens),
                )
            ),
            (
                self.readout != "rationale"
                or self.max_new_tokens.get("rationale", 0) > self.max_new_tokens.get("answer", 0),
                "method.max_new_tokens.rationale must exceed method.max_new_tokens.answer: the main writes its chain "
                f"and then the answer line, got {self.max_new_tokens}",
            ),
            (
                self.alignment.warmup_steps >= 0 and 0 < self.alignment.lr_floor <= 1,
                "method.alignment.warmup_steps must be >= 0 and method.alignment.lr_floor in (0, 1], got "
                f"{self.alignment.warmup_steps} and {self.alignment.lr_floor}",
            ),
            (
                self.alignment.answer_chain in ANSWER_CHAINS,
                f"method.alignment.answer_chain must be one of {ANSWER_CHAINS}, got {self.alignment.answer_chain!r}",
            ),
            (
                0 <= self.alignment.self_feed <= 1,
                f"method.alignment.self_feed (a share of the fed-back steps) must be in [0, 1], got "
                f"{self.alignment.self_feed}",
            ),
            (
                self.alignment.pull_weight >= 0,
                f"method.alignment.pull_weight must be >= 0, got {self.alignment.pull_weight}",
            ),
            (rl.filter in FILTERS, f"method.rl.filter must be one of {FILTERS}, got {rl.filter!r}"),
            (
                1 <= rl.num_decoded <= rl.num_samples,
                f"need 1 <= method.rl.num_decoded (K={rl.num_decoded}) <= method.rl.num_samples (G={rl.num_samples})",
            ),
            (0 <= rl.k_explore <= rl.num_decoded, f"need 0 <= method.rl.k_explore <= K, got {rl.k_explore}"),
            (
                rl.filter != "none" or rl.num_decoded == rl.num_samples,
                "method.rl.filter=none decodes all G: set num_decoded = num_samples",
            ),
            (self.alignment.steps >= 0 and rl.steps >= 0, "method.alignment.steps and method.rl.steps must be >= 0"),
            (rl.ppo_epochs >= 1, f"method.rl.ppo_epochs must be >= 1, got {rl.ppo_epochs}"),
            (
                rl.sigma_start is None
                or math.exp(latent.log_sigma_min) <= rl.sigma_start <= math.exp(latent.log_sigma_max),
                f"method.rl.sigma_start must lie within exp(method.latent.log_sigma_min..log_sigma_max), "
                f"got {rl.sigma_start}",
            ),
            (
                rl.ppo_epochs == 1 or self.accumulate_grad_batches == 1,
                "method.rl.ppo_epochs > 1 updates on each batch several times: use accumulate_grad_batches=1",
            ),
            (self.accumulate_grad_batches >= 1, "method.accumulate_grad_batches must be >= 1"),
            (self.grad_clip > 0, f"method.grad_clip must be > 0, got {self.grad_clip}"),
            (rl.tau > 0, f"method.rl.tau must be > 0, got {rl.tau}"),
            (
                rl.contrastive in CONTRASTIVE_KINDS,
                f"method.rl.contrastive must be one of {CONTRASTIVE_KINDS}, got {rl.contrastive!r}",
            ),
            (
                isinstance(rl.contrastive_normalize, bool),
                f"method.rl.contrastive_normalize must be true or false, got {rl.contrastive_normalize!r}",
            ),
            (rl.lambda_con >= 0, f"method.rl.lambda_con must be >= 0, got {rl.lambda_con}"),
            (rl.heads_lr is None or rl.heads_lr > 0, f"method.rl.heads_lr must be > 0 or null, got {rl.heads_lr}"),
            (
                latent.steps >= 1 and latent.dim >= 1 and latent.num_modes >= 1,
                f"method.latent.steps, dim and num_modes must be >= 1, got {latent.steps}, {latent.dim}, {latent.num_modes}",
            ),
            (self.max_consecutive_nonfinite >= 1, "method.max_consecutive_nonfinite must be >= 1"),
        ]
        raise_first_failed(checks)

    @property
    def decode_tokens(self) -> int:
        """The main model's decode budget per kept chain under this readout."""
        return int(self.max_new_tokens[self.readout])

    @property
    def eval_decode_tokens(self) -> int:
        """The main model's decode budget per chain at evaluation under this readout."""
        return int(self.eval_max_new_tokens[self.readout])

    @property
    def total_steps(self) -> int:
        return self.alignment.steps + self.rl.steps


CACHES = ("static", "dynamic")


@dataclass(frozen=True)
class GRPOSettings:
    """`cfg.method` of `method=grpo`, validated at start."""

    GROUPS: ClassVar[tuple[str, ...]] = ()  # no nested groups (`lora` is one setting: peft's LoraConfig)

    steps: int
    lr: float
    num_generations: int  # K completions per question
    max_new_tokens: int
    temperature: float
    cache: str
    scale_rewards: str
    shuffle_rewards: bool  # negative control: rewards permuted across the batch before advantages
    loss_type: str
    eps_low: float
    eps_high: float
    num_iterations: int
    beta: float
    entropy_coef: float
    micro_batch_size: int
    weight_decay: float
    grad_clip: float
    accumulate_grad_batches: int
    max_consecutive_nonfinite: int  # skipped steps in a row before the run stops
    lora: dict

    @classmethod
    def from_dict(cls, values: dict) -> GRPOSettings:
        """From the resolved `cfg.method` (its `name`, the dispatch key, is not a setting)."""
        return from_values(cls, {k: v for k, v in values.items() if k != "name"}, "method")

    def __post_init__(self) -> None:
        checks = [
            (self.loss_type in LOSS_TYPES, f"method.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}"),
            (
                self.scale_rewards in ADVANTAGE_SCALES,
                f"method.scale_rewards must be one of {ADVANTAGE_SCALES}, got {self.scale_rewards!r}",
            ),
            (self.cache in CACHES, f"method.cache must be one of {CACHES}, got {self.cache!r}"),
            (
                self.num_generations >= 2,
                f"method.num_generations must be >= 2 (advantages are relative), got {self.num_generations}",
            ),
            (
                self.max_new_tokens >= 1 and self.micro_batch_size >= 1 and self.steps >= 0,
                "method.max_new_tokens and method.micro_batch_size must be >= 1, method.steps >= 0",
            ),
            (self.temperature > 0, f"method.temperature must be > 0, got {self.temperature}"),
            (0 <= self.eps_low < 1 and self.eps_high >= 0, "need 0 <= method.eps_low < 1 and method.eps_high >= 0"),
            (self.num_iterations >= 1, f"method.num_iterations must be >= 1, got {self.num_iterations}"),
            (
                self.num_iterations == 1 or self.accumulate_grad_batches == 1,
                "method.num_iterations > 1 updates on each batch several times: use accumulate_grad_batches=1",
            ),
            (
                self.accumulate_grad_batches >= 1 and self.grad_clip > 0,
                "need accumulate_grad_batches >= 1 and grad_clip > 0",
            ),
            (bool(self.lora), "method.lora must configure the adapters (GRPO trains LoRA on the 4-bit main model)"),
            (self.max_consecutive_nonfinite >= 1, "method.max_consecutive_nonfinite must be >= 1"),
        ]
        raise_first_failed(checks)
