"""Token-space GRPO on the main model with LoRA adapters (QLoRA), the baseline DLR is judged against
(docs/design.md §8).

Per batch of B questions: sample K completions each at temperature 1 with a static KV cache, reward
them with the same reward as DLR, normalise advantages within each question's group, and minimise
the clipped surrogate (plus k3 KL to the adapters-disabled model when beta > 0), micro-batch by
micro-batch, accumulating and clipping gradients by hand.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from dlr.accounting import model_cost
from dlr.data.schema import Record
from dlr.methods.losses import (
    aggregate_token_loss,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    micro_batch_weight,
)
from dlr.methods.rl_base import RLModule
from dlr.methods.settings import GRPOSettings
from dlr.models.backbones import PromptFormat
from dlr.models.generation import completion_log_probs, eos_token_ids, sample_completions
from dlr.ranks import gather_ranks
from dlr.rewards import TOTAL, RewardConfig


def shuffle_across_batch(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [B, K] permuted uniformly over all B*K places (torch's seeded generator), so a reward no
    longer says anything about the completion it is paired with: the negative control of
    `method.shuffle_rewards`, which keeps the reward's distribution and the batch's spread."""
    flat = rewards.flatten()
    return flat[torch.randperm(flat.numel(), device=flat.device)].view_as(rewards)


class GRPOModule(RLModule):
    arm_name = "GRPO"
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
        super().__init__(settings, reward)  # last_rollout stays None: no latent chains, no diversity traced
        self.policy, self.tokenizer, self.fmt, self.base_sha256 = policy, tokenizer, fmt, base_sha256
        self.cost = model_cost(policy)  # body at every position, head where logits are computed
        self.main_cost = self.cost  # the policy is the main model: all its passes are main-model work (rl_base)
        self.register_buffer("eos_ids", torch.tensor(eos_token_ids(policy, tokenizer)), persistent=False)

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.adapter_parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay, betas=(0.9, 0.99)
        )

    def sample(self, records: Sequence[Record], k: int, max_new_tokens: int):
        """k sampled completions per question, question-major: prompt and completion ids and masks, and
        the completions' texts."""
        prompts = [self.fmt.prompt(r.question, self.tokenizer) for r in records]
        prompt_ids, prompt_mask, completion_ids, completion_mask = sample_completions(
            self.policy, self.tokenizer, prompts, k, max_new_tokens, self.settings.temperature, self.settings.cache
        )
        texts = [
            self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(completion_ids, completion_mask, strict=True)
        ]
        return prompt_ids, prompt_mask, completion_ids, completion_mask, texts

    def rollout(self, records: list[Record]):
        """K sampled completions per question (charged), their scores [B, K, 3] and the sampling seconds."""
        s = self.settings
        start = time.perf_counter()
        prompt_ids, prompt_mask, completion_ids, completion_mask, texts = self.sample(
            records, s.num_generations, s.max_new_tokens
        )
        seconds = time.perf_counter() - start
        N, Lp, Lc = prompt_ids.shape[0], prompt_ids.shape[1], completion_ids.shape[1]
        self.charge_generation(self.cost, N, Lp, Lc)
        scores = self.score_rollouts(records, texts)
        return prompt_ids, prompt_mask, completion_ids, completion_mask, scores, seconds

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

    def train_batch(self, batch: list[Record]) -> None:
        """One GRPO step (docs/design.md §4): sample, score, and minimise the clipped surrogate."""
        s = self.settings
        optimizer = self.optimizers()
        prompt_ids, prompt_mask, completion_ids, completion_mask, scores, gen_seconds = self.rollout(batch)
        rewards = scores[..., TOTAL]  # [B, K]
        advantages, zero_spread = group_advantages(rewards, s.scale_rewards)
        if s.shuffle_rewards:  # the negative control learns from rewards that belong to other completions
            advantages = group_advantages(shuffle_across_batch(rewards), s.scale_rewards)[0]  # logs keep the true ones
        advantages = advantages.flatten()  # [N], question-major like the completions
        args = (prompt_ids, prompt_mask, completion_ids, completion_mask)
        old_logp = self._log_probs_no_grad(*args, adapters=True) if s.num_iterations > 1 else None
        ref_logp = self._log_probs_no_grad(*args, adapters=False) if s.beta > 0 else None

        N, mask = completion_ids.shape[0], completion_mask.float()
        # each log-prob pass reads prompt and completion and computes logits at the Lc + 1 positions kept
        sequence_tokens, logit_tokens = (
            N * (prompt_ids.shape[1] + completion_ids.shape[1]),
            N * (completion_ids.shape[1] + 1),
        )
        extra_passes = int(old_logp is not None) + int(ref_logp is not None)
        self.charge(self.cost, sequence_tokens * extra_passes, logit_tokens * extra_passes)
        self.charge(self.cost, sequence_tokens * s.num_iterations, logit_tokens * s.num_iterations, "activations")
        total_tokens = float(mask.sum())
        # dapo normalises by every token of the batch. Under DDP, which averages the ranks' gradients,
        # that is the ranks' mean token count (the rank's own count on one device).
        batch_tokens = float(gather_ranks(self.trainer, torch.tensor([total_tokens], dtype=torch.float64)).mean())
        parts = self._micro_batches(N)
        sums = dict.fromkeys(("entropy", "kl", "clip_low", "clip_high"), 0.0)
        for _ in range(s.num_iterations):
            finite = True
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
                loss = aggregate_token_loss(per_token, m, s.loss_type, s.max_new_tokens) * weight
                if not self.backward_if_finite(loss):  # the step is skipped below
                    finite = False
                    continue
                sums["entropy"] += float((entropy.detach() * m).sum())
                sums["clip_low"] += float((low.float() * m).sum())
                sums["clip_high"] += float((high.float() * m).sum())
            norm = self.step_if_due(optimizer, finite)

        lengths = completion_mask.sum(1).float()  # [N]
        self.generated_tokens += int(lengths.sum())
        passes = s.num_iterations * max(total_tokens, 1.0)
        logs = {
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
        self.finish_rl_batch(scores, zero_spread, norm, logs)

    @torch.no_grad()
    def sample_attempts(self, records: list[Record], k: int, max_new_tokens: int) -> list[list[str]]:
        """k completions per question sampled as in training: the attempts pass@k counts."""
        texts = self.sample(records, k, max_new_tokens)[-1]
        return [texts[i * k : (i + 1) * k] for i in range(len(records))]

    # --- checkpoints: adapters only; the 4-bit base is reloaded from the backbone -----------------

    @property
    def protected_sha256(self) -> str | None:
        return self.base_sha256

    def is_backbone_key(self, key: str) -> bool:
        return key.startswith("policy.") and "lora_" not in key
