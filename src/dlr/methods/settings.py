"""The settings of both RL arms, `cfg.method` of `method=dlr` and `method=grpo`, validated once at start
so that a bad value fails before any training, with a message naming its config key."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from dlr.methods.losses import ADVANTAGE_SCALES, LOSS_TYPES
from dlr.models.critic import FILTERS
from dlr.models.latent_policy import LATENT_MODES
from dlr.models.readout import READOUTS


@dataclass(frozen=True)
class LatentSettings:
    steps: int = 8  # T
    dim: int = 64  # Dz
    mode: str = "parallel"
    num_modes: int = 1
    log_sigma_min: float = -5.0
    log_sigma_max: float = 0.5
    log_sigma_init: float = -1.0


@dataclass(frozen=True)
class AlignmentSettings:
    steps: int = 100
    lr: float = 1e-3
    pull_weight: float = 1.0  # rationale readout: weight of the pull toward the chain's opening embeddings
    init_from: str | None = None  # a shipped stage 1 (folder) to start from
    export_to: str | None = None  # save the state after stage 1 here (folder), with the main's hash


@dataclass(frozen=True)
class RLSettings:
    steps: int = 100
    lr: float = 1e-4
    num_samples: int = 16  # G
    num_decoded: int = 4  # K
    filter: str = "critic"
    k_explore: int = 1
    scale: str = "group"
    ppo_epochs: int = 1
    clip_eps: float = 0.2
    lambda_con: float = 0.1
    tau: float = 0.1
    beta: float = 0.0
    lambda_ent: float = 0.0
    lambda_modes: float = 0.1


@dataclass(frozen=True)
class CriticSettings:
    hidden: int = 256
    lr: float = 1e-3
    warmup: int = 10  # RL batches with a random filter before the critic chooses
    weight: float = 1.0  # of L_critic in the stage-2 loss


@dataclass(frozen=True)
class DLRSettings:
    """`cfg.method` of `method=dlr`, validated once at start so a bad value fails before any training."""

    latent: LatentSettings = field(default_factory=LatentSettings)
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)
    rl: RLSettings = field(default_factory=RLSettings)
    critic: CriticSettings = field(default_factory=CriticSettings)
    readout: str = "rationale"  # rationale: the main writes its own chain after the latents | answer
    max_new_tokens: dict = field(default_factory=lambda: {"rationale": 64, "answer": 4})  # decode budget by readout
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    accumulate_grad_batches: int = 1
    max_consecutive_nonfinite: int = 5  # skipped steps in a row before the run stops

    @classmethod
    def from_dict(cls, values: dict) -> DLRSettings:
        groups = {"latent": LatentSettings, "alignment": AlignmentSettings, "rl": RLSettings, "critic": CriticSettings}
        kwargs = {}
        for key, value in values.items():
            if key == "name":
                continue
            if key not in {f.name for f in fields(cls)}:
                raise ValueError(f"method.{key} is not a DLR setting")
            if key in groups:
                known = {f.name for f in fields(groups[key])}
                unknown = set(value) - known
                if unknown:
                    raise ValueError(f"method.{key} has unknown settings {sorted(unknown)}; known: {sorted(known)}")
                value = groups[key](**value)
            kwargs[key] = value
        return cls(**kwargs)

    def __post_init__(self) -> None:
        rl, latent = self.rl, self.latent
        checks = [
            (latent.mode in LATENT_MODES, f"method.latent.mode must be one of {LATENT_MODES}, got {latent.mode!r}"),
            (self.readout in READOUTS, f"method.readout must be one of {READOUTS}, got {self.readout!r}"),
            (
                set(self.max_new_tokens) == set(READOUTS) and all(int(v) >= 1 for v in self.max_new_tokens.values()),
                f"method.max_new_tokens needs a budget >= 1 for each readout {READOUTS}, got {self.max_new_tokens}",
            ),
            (
                self.readout != "rationale"
                or self.max_new_tokens.get("rationale", 0) > self.max_new_tokens.get("answer", 0),
                "method.max_new_tokens.rationale must exceed method.max_new_tokens.answer: the main writes its chain "
                f"and then the answer line, got {self.max_new_tokens}",
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
                rl.ppo_epochs == 1 or self.accumulate_grad_batches == 1,
                "method.rl.ppo_epochs > 1 updates on each batch several times: use accumulate_grad_batches=1",
            ),
            (self.accumulate_grad_batches >= 1, "method.accumulate_grad_batches must be >= 1"),
            (self.grad_clip > 0, f"method.grad_clip must be > 0, got {self.grad_clip}"),
            (rl.tau > 0, f"method.rl.tau must be > 0, got {rl.tau}"),
            (
                latent.steps >= 1 and latent.dim >= 1 and latent.num_modes >= 1,
                f"method.latent.steps, dim and num_modes must be >= 1, got {latent.steps}, {latent.dim}, {latent.num_modes}",
            ),
            (self.max_consecutive_nonfinite >= 1, "method.max_consecutive_nonfinite must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def decode_tokens(self) -> int:
        """The main model's decode budget per kept chain under this readout."""
        return int(self.max_new_tokens[self.readout])

    @property
    def total_steps(self) -> int:
        return self.alignment.steps + self.rl.steps


CACHES = ("static", "dynamic")


@dataclass(frozen=True)
class GRPOSettings:
    """`cfg.method` of `method=grpo`, validated at start."""

    steps: int = 100
    lr: float = 5e-4
    num_generations: int = 4  # K completions per question
    max_new_tokens: int = 64
    temperature: float = 1.0
    cache: str = "static"
    scale_rewards: str = "group"
    loss_type: str = "grpo"
    eps_low: float = 0.2
    eps_high: float = 0.28
    num_iterations: int = 1
    beta: float = 0.0
    entropy_coef: float = 0.0
    micro_batch_size: int = 16
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    accumulate_grad_batches: int = 1
    max_consecutive_nonfinite: int = 5  # skipped steps in a row before the run stops
    lora: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> GRPOSettings:
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known - {"name"}
        if unknown:
            raise ValueError(f"method has unknown GRPO settings {sorted(unknown)}")
        return cls(**{k: v for k, v in values.items() if k != "name"})

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
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
