"""Token-space GRPO on the main model with LoRA adapters (QLoRA), the baseline DLR is judged against
(DESIGN §8).

Per batch of B questions: sample K completions each at temperature 1 with a static KV cache, reward
them with the same reward as DLR, normalise advantages within each question's group, and minimise
the clipped surrogate (plus k3 KL to the adapters-disabled model when beta > 0), micro-batch by
micro-batch, accumulating and clipping gradients by hand.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from lightning import LightningModule
from transformers import PreTrainedTokenizerBase

from dlr.accounting import compute_parameters, forward_flops
from dlr.data.schema import Record
from dlr.methods.checkpointing import TrainableStateCheckpoints
from dlr.methods.guard import NonFiniteGuard, finite_on_every_rank
from dlr.methods.losses import (
    ADVANTAGE_SCALES,
    LOSS_TYPES,
    aggregate_token_loss,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    micro_batch_weight,
)
from dlr.models.backbones import PromptFormat
from dlr.models.generation import completion_log_probs, eos_token_ids, sample_completions
from dlr.ranks import gather_ranks, log_now
from dlr.rewards import RewardConfig, score_batch

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


class GRPOModule(TrainableStateCheckpoints, LightningModule):
    ddp_unused_parameters = False  # every step trains every adapter
    stage = "rl"  # one stage (a budget meter reads it: DLR's stage 1 may be set aside)

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        fmt: PromptFormat,
        settings: GRPOSettings,
        reward: RewardConfig,
        base_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapters only (see on_save_checkpoint)
        self.policy, self.tokenizer, self.fmt = policy, tokenizer, fmt
        self.settings, self.reward, self.base_sha256 = settings, reward, base_sha256
        self.register_buffer("generated_tokens", torch.zeros((), dtype=torch.long))  # TRL's num_tokens
        self.register_buffer("flops_spent", torch.zeros((), dtype=torch.float64))  # for the budget meter
        self.parameter_count = compute_parameters(policy)
        self.last_reward: float | None = None  # the meter reads these after each batch
        self.last_grad_norm: float | None = None
        self.last_rollout = None  # no latent chains: the meter traces no diversity
        self.last_scores: torch.Tensor | None = None  # [B, K, 3] of the last batch (the depth frontier reads it)
        self.register_buffer("eos_ids", torch.tensor(eos_token_ids(policy, tokenizer)), persistent=False)
        self._pending_backwards = 0
        self.guard = NonFiniteGuard(settings.max_consecutive_nonfinite)  # runner/arms.py may arm fault injection

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.adapter_parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay, betas=(0.9, 0.99)
        )

    def rollout(self, records: list[Record]):
        """K sampled completions per question, their texts and rewards [B, K, 3]."""
        s = self.settings
        prompts = [self.fmt.prompt(r.question, self.tokenizer) for r in records]
        start = time.perf_counter()
        prompt_ids, prompt_mask, completion_ids, completion_mask = sample_completions(
            self.policy, self.tokenizer, prompts, s.num_generations, s.max_new_tokens, s.temperature, s.cache
        )
        seconds = time.perf_counter() - start
        N, Lp, Lc = prompt_ids.shape[0], prompt_ids.shape[1], completion_ids.shape[1]
        self.flops_spent += forward_flops(self.parameter_count, N * (Lp + Lc))  # prefill + each sampled token
        texts = [
            self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(completion_ids, completion_mask, strict=True)
        ]
        golds = [r.answer for r in records for _ in range(s.num_generations)]
        tasks = [r.task for r in records for _ in range(s.num_generations)]
        scores = score_batch(texts, golds, tasks, **asdict(self.reward)).reshape(len(records), s.num_generations, 3)
        return prompt_ids, prompt_mask, completion_ids, completion_mask, scores.to(self.device), seconds

    def _log_probs_no_grad(
        self, prompt_ids, prompt_mask, completion_ids, completion_mask, adapters: bool
    ) -> torch.Tensor:
        """Per-token log-probs [N, Lc] without gradients, micro-batched; adapters off = the reference model."""
        chunks = []
        with torch.no_grad():
            for part in self._micro_batches(prompt_ids.shape[0]):
                args = (prompt_ids[part], prompt_mask[part], completion_ids[part], completion_mask[part])
                if adapters:
                    chunks.append(completion_log_probs(self.policy, *args, self.settings.temperature)[0])
                else:
                    with self.policy.disable_adapter():
                        chunks.append(completion_log_probs(self.policy, *args, self.settings.temperature)[0])
        return torch.cat(chunks)

    def _micro_batches(self, n: int) -> list[slice]:
        size = self.settings.micro_batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def training_step(self, batch: list[Record], batch_idx: int) -> None:
        s = self.settings
        optimizer = self.optimizers()
        step = self.trainer.global_step
        prompt_ids, prompt_mask, completion_ids, completion_mask, scores, gen_seconds = self.rollout(batch)
        self.last_scores = scores
        rewards = scores[..., 2]  # [B, K]
        advantages, zero_spread = group_advantages(rewards, s.scale_rewards)
        advantages = advantages.flatten()  # [N], question-major like the completions
        args = (prompt_ids, prompt_mask, completion_ids, completion_mask)
        old_logp = self._log_probs_no_grad(*args, adapters=True) if s.num_iterations > 1 else None
        ref_logp = self._log_probs_no_grad(*args, adapters=False) if s.beta > 0 else None

        N, mask = completion_ids.shape[0], completion_mask.float()
        sequence_tokens = N * (prompt_ids.shape[1] + completion_ids.shape[1])
        extra_passes = int(old_logp is not None) + int(ref_logp is not None)
        self.flops_spent += forward_flops(self.parameter_count, sequence_tokens * extra_passes)
        self.flops_spent += forward_flops(self.parameter_count, sequence_tokens * s.num_iterations, "activations")
        total_tokens = float(mask.sum())
        # dapo normalises by every token of the batch. Under DDP, which averages the ranks' gradients,
        # that is the ranks' mean token count (the rank's own count on one device).
        batch_tokens = float(gather_ranks(self.trainer, torch.tensor([total_tokens], dtype=torch.float64)).mean())
        parts = self._micro_batches(N)
        sums = dict.fromkeys(("entropy", "kl", "clip_low", "clip_high"), 0.0)
        for _ in range(s.num_iterations):
            nonfinite = False
            for part in parts:
                logp, entropy = completion_log_probs(  # [n, Lc] each
                    self.policy, *(a[part] for a in args), s.temperature, entropy_grad=s.entropy_coef != 0
                )
                old = old_logp[part] if old_logp is not None else logp.detach()
                per_token, low, high = clipped_surrogate(logp, old, advantages[part], s.eps_low, s.eps_high)
                m = mask[part]
                if ref_logp is not None:
                    kl = k3_kl(logp, ref_logp[part])
                    per_token = per_token + s.beta * kl
                    sums["kl"] += float((kl.detach() * m).sum())
                if s.entropy_coef:
                    per_token = per_token - s.entropy_coef * entropy
                weight = micro_batch_weight(s.loss_type, m.shape[0], N, float(m.sum()), batch_tokens, len(parts))
                loss = self.guard.inject(
                    aggregate_token_loss(per_token, m, s.loss_type, s.max_new_tokens) * weight, step
                )
                if not finite_on_every_rank(self.trainer, loss):  # never backpropagate it; the step is skipped below
                    nonfinite = True
                    continue
                self.manual_backward(loss / s.accumulate_grad_batches)
                sums["entropy"] += float((entropy.detach() * m).sum())
                sums["clip_low"] += float((low.float() * m).sum())
                sums["clip_high"] += float((high.float() * m).sum())
            norm = self._maybe_step(optimizer, nonfinite)
        self.guard.end_injection_batch(step)

        self.last_reward, self.last_grad_norm = float(rewards.mean()), float(norm) if norm is not None else None
        lengths = completion_mask.sum(1).float()  # [N]
        self.generated_tokens += int(lengths.sum())
        passes = s.num_iterations * max(total_tokens, 1.0)
        logs = {
            "train/reward": rewards.mean(),
            "train/reward_std": rewards.std(dim=1).mean(),
            "train/rewards/correct/mean": scores[..., 0].mean(),
            "train/rewards/format/mean": scores[..., 1].mean(),
            "train/frac_reward_zero_std": zero_spread.float().mean(),
            "train/completions/mean_length": lengths.mean(),
            "train/completions/max_length": lengths.max(),
            "train/completions/clipped_ratio": (~torch.isin(completion_ids, self.eos_ids).any(1)).float().mean(),
            "train/clip_ratio/low_mean": sums["clip_low"] / passes,
            "train/clip_ratio/high_mean": sums["clip_high"] / passes,
            "train/clip_ratio/region_mean": (sums["clip_low"] + sums["clip_high"]) / passes,
            "train/entropy": sums["entropy"] / passes,
            "train/kl": sums["kl"] / passes,
            "train/num_tokens": float(self.generated_tokens),
            "train/generation_tokens_per_s": total_tokens / max(gen_seconds, 1e-9),
        }
        if norm is not None and self.trainer.global_step % self.trainer.log_every_n_steps == 0:
            log_now(self.trainer, {**logs, "train/grad_norm": norm})
        self.log("reward", logs["train/reward"], prog_bar=True, logger=False, batch_size=len(batch))

    def _maybe_step(self, optimizer, nonfinite_loss: bool) -> torch.Tensor | None:
        """Step after `accumulate_grad_batches` batches, clipping by hand. A non-finite loss in the
        window or a non-finite gradient norm skips the step (counted; the guard stops a run of them)."""
        step = self.trainer.global_step
        if nonfinite_loss:
            self._pending_backwards = 0
            optimizer.zero_grad(set_to_none=True)
            self._skip(step)
            return None
        self._pending_backwards += 1
        if self._pending_backwards < self.settings.accumulate_grad_batches:
            return None
        self._pending_backwards = 0
        norm = torch.nn.utils.clip_grad_norm_(self.adapter_parameters(), self.settings.grad_clip)
        if torch.isfinite(norm):
            self.guard.record(True, step)
            optimizer.step()
        else:
            self._skip(step)
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _skip(self, step: int) -> None:
        log_now(self.trainer, {"train/skipped_nonfinite_steps": float(self.guard.skipped + 1)})
        self.guard.record(False, step)

    @torch.no_grad()
    def sample_attempts(self, records: list[Record], k: int, max_new_tokens: int) -> list[list[str]]:
        """k completions per question sampled as in training: the attempts pass@k counts."""
        prompts = [self.fmt.prompt(r.question, self.tokenizer) for r in records]
        _, _, ids, mask = sample_completions(
            self.policy, self.tokenizer, prompts, k, max_new_tokens, self.settings.temperature, self.settings.cache
        )
        texts = [
            self.tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask, strict=True)
        ]
        return [texts[i * k : (i + 1) * k] for i in range(len(records))]

    # --- checkpoints: adapters only; the 4-bit base is reloaded from the backbone -----------------

    arm_name = "GRPO"

    @property
    def protected_sha256(self) -> str | None:
        return self.base_sha256

    def is_backbone_key(self, key: str) -> bool:
        return key.startswith("policy.") and "lora_" not in key
