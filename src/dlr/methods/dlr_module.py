"""DLR: latent alignment (stage 1), then latent RL (stage 2), with a frozen main model (DESIGN §7).

Stage 1 runs for `alignment.steps` optimizer steps: the assistant's mean chain, projected into the main
model's input, must make the frozen main model write the gold target. Stage 2 runs `rl.steps` more:
sample G chains per question, keep K by the critic's predicted reward, decode them once with the main
model, reward them, and update the policy with the latent policy gradient, the bidirectional
contrastive term, KL to the stage-1 policy and an entropy bonus; the critic learns the rewards.

Only the assistant's adapters, the Gaussian heads, the projector and the critic are given to an
optimizer. Gradients are accumulated and clipped by hand (manual optimization).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from lightning import LightningModule
from transformers import PreTrainedTokenizerBase

from dlr.accounting import compute_parameters, forward_flops
from dlr.data.schema import Record
from dlr.methods.checkpointing import TrainableStateCheckpoints
from dlr.methods.guard import NonFiniteGuard, finite_on_every_rank
from dlr.methods.losses import (
    LatentRLWeights,
    group_advantages,
    latent_pull_loss,
    latent_rl_loss,
    mode_separation_loss,
)
from dlr.models.backbones import PromptFormat
from dlr.models.critic import FILTERS, RewardCritic, select_latents
from dlr.models.generation import (
    completion_mask_after_eos,
    eos_token_ids,
    greedy_decode_embeds,
    latent_target_nll,
)
from dlr.models.latent_policy import LATENT_MODES, LatentPolicy
from dlr.models.projector import LatentProjector, mean_embedding_norm
from dlr.models.readout import READOUTS, Readout, latent_main_inputs, split_gold_completion
from dlr.ranks import log_now
from dlr.rewards import RewardConfig, score_batch
from dlr.scoring import DepthScore, score_by_depth


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
    sigma_start: float | None = None  # latent sigma stage 2 starts from; None: the log-sigma head's own


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


@dataclass
class Rollout:
    """What one stage-2 step sampled and decoded; the diagnostics callbacks read it."""

    records: list[Record]
    z: torch.Tensor  # [B, G, T, Dz] all sampled chains
    predicted: torch.Tensor  # [B, G] the critic's predicted reward
    kept: torch.Tensor  # [B, K] indices of the decoded chains
    rewards: torch.Tensor  # [B, K] total reward of the decoded chains
    log_sigma: torch.Tensor  # [B, K, T, Dz]
    mu: torch.Tensor  # [B, K, T, Dz]


def gather_samples(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, G, ...], index: [B, K] -> [B, K, ...]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


class DLRModule(TrainableStateCheckpoints, LightningModule):
    ddp_unused_parameters = True  # a stage-1 (alignment) step never runs the critic

    def __init__(
        self,
        main: torch.nn.Module,
        main_tokenizer: PreTrainedTokenizerBase,
        assistant: torch.nn.Module,
        assistant_tokenizer: PreTrainedTokenizerBase,
        fmt: PromptFormat,
        settings: DLRSettings,
        reward: RewardConfig,
        placeholder: str,
        main_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave out the frozen backbone weights (see on_save_checkpoint)
        self.settings, self.fmt, self.reward = settings, fmt, reward
        self.main_tokenizer, self.assistant_tokenizer = main_tokenizer, assistant_tokenizer
        for marker in (fmt.bol, fmt.eol):
            if main_tokenizer.convert_tokens_to_ids(marker) in (None, main_tokenizer.unk_token_id):
                raise ValueError(f"the main tokenizer has no token {marker!r}: pick an existing token as latent marker")
        placeholder_id = assistant_tokenizer.convert_tokens_to_ids(placeholder)
        if placeholder_id in (None, assistant_tokenizer.unk_token_id):
            raise ValueError(f"the assistant tokenizer has no placeholder token {placeholder!r} (backbone.placeholder)")

        self.main = main.requires_grad_(False).eval()  # frozen: never given to an optimizer
        self.main_sha256 = main_sha256
        lat = settings.latent
        self.policy = LatentPolicy(
            assistant,
            placeholder_id,
            lat.dim,
            lat.steps,
            lat.log_sigma_min,
            lat.log_sigma_max,
            lat.log_sigma_init,
            lat.mode,
            lat.num_modes,
        )
        main_dim = main.get_input_embeddings().embedding_dim
        self.embedding_norm = mean_embedding_norm(main)
        self.projector = LatentProjector(lat.dim, main_dim, self.embedding_norm)
        self.readout = Readout(settings.readout, fmt, settings.decode_tokens)
        self.critic = RewardCritic(assistant.get_input_embeddings().embedding_dim, lat.dim, settings.critic.hidden)
        # pi_ref for the KL term: a frozen copy, loaded with the policy's weights when stage 2 starts
        self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval() if settings.rl.beta > 0 else None
        self.register_buffer("rl_batches", torch.zeros((), dtype=torch.long))  # critic warm-up counter
        self.register_buffer("reference_synced", torch.zeros((), dtype=torch.bool))
        # compute spent on training, for the budget meter (DESIGN §9); evaluation is not counted
        self.register_buffer("flops_spent", torch.zeros((), dtype=torch.float64))
        self.register_buffer("generated_tokens", torch.zeros((), dtype=torch.long))
        self.main_parameters, self.assistant_parameters = compute_parameters(main), compute_parameters(assistant)
        self.last_reward: float | None = None  # the meter reads these after each batch
        self.last_grad_norm: float | None = None
        self.lora = any("lora_" in name for name, _ in assistant.named_parameters())
        self.assistant_backward = "activations" if self.lora else "weights"  # FLOPs factor of its backward passes
        self.last_rollout: Rollout | None = None
        self.last_scores: torch.Tensor | None = None  # [B, K, 3] of the last RL batch (the depth frontier reads it)
        self.stage1_info: dict | None = None  # what a shipped stage 1 cost and scored (methods/stage1.py)
        self._pending_backwards = 0
        self.guard = NonFiniteGuard(settings.max_consecutive_nonfinite)  # runner/arms.py may arm fault injection

    # --- stages and optimizers ---------------------------------------------------------------

    @property
    def stage(self) -> str:
        return "alignment" if self.trainer.global_step < self.settings.alignment.steps else "rl"

    def train(self, mode: bool = True):
        super().train(mode)
        self.main.eval()  # frozen models never run in training mode (dropout)
        if self.reference is not None:
            self.reference.eval()
        return self

    def on_train_start(self) -> None:
        if self.trainer.global_step == 0:  # a fresh fit (a later phase of a continual run too): stage 2 re-syncs pi_ref
            self.reference_synced.fill_(False)

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def configure_optimizers(self):
        s = self.settings

        def adamw(groups):
            return torch.optim.AdamW(groups, weight_decay=s.weight_decay, betas=(0.9, 0.95))

        align = adamw([{"params": self.policy_parameters() + list(self.projector.parameters()), "lr": s.alignment.lr}])
        rl = adamw(
            [
                {"params": self.policy_parameters(), "lr": s.rl.lr},
                {"params": list(self.critic.parameters()), "lr": s.critic.lr},
            ]
        )
        return [align, rl]

    def _backward_and_step(self, loss: torch.Tensor, optimizer) -> torch.Tensor | None:
        """Accumulate `accumulate_grad_batches` backward passes, then clip and step. Each parameter
        group (policy, critic) is clipped on its own, so a large critic error cannot shrink the policy's
        step. Returns the first group's (the policy's) norm before clipping when a step was taken; a
        non-finite norm skips the step."""
        step = self.trainer.global_step
        loss = self.guard.inject(loss, step)
        if not finite_on_every_rank(self.trainer, loss):  # never backpropagate it: drop this accumulation window
            self._pending_backwards = 0
            optimizer.zero_grad(set_to_none=True)
            self._skip(step)
            return None
        self.manual_backward(loss / self.settings.accumulate_grad_batches)
        self._pending_backwards += 1
        if self._pending_backwards < self.settings.accumulate_grad_batches:
            return None
        self._pending_backwards = 0
        norms = [
            torch.nn.utils.clip_grad_norm_([p for p in group["params"] if p.grad is not None], self.settings.grad_clip)
            for group in optimizer.param_groups
        ]
        if all(torch.isfinite(n) for n in norms):
            self.guard.record(True, step)
            optimizer.step()
        else:
            self._skip(step)
        optimizer.zero_grad(set_to_none=True)
        return norms[0]

    def _skip(self, step: int) -> None:
        """A non-finite step: counted and logged; the guard stops the run after too many in a row."""
        log_now(self.trainer, {"train/skipped_nonfinite_steps": float(self.guard.skipped + 1)})
        self.guard.record(False, step)

    def _log_step(self, logs: dict[str, torch.Tensor], grad_norm: torch.Tensor | None) -> None:
        """Log this batch's metrics when an optimizer step was taken on a logging step."""
        if grad_norm is None or self.trainer.global_step % self.trainer.log_every_n_steps:
            return
        log_now(self.trainer, {**logs, "train/grad_norm": grad_norm})

    # --- text <-> tensors ---------------------------------------------------------------------

    def encode_questions(self, records: Sequence[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        """The assistant reads each question in its own tokenizer and prompt format: [B, Lq] left-padded."""
        prompts = [self.fmt.prompt(r.question, self.assistant_tokenizer) for r in records]
        enc = self.assistant_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def main_inputs(self, records: Sequence[Record], chains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """chains: [B, K, T, Dz] -> the main model's input for each of the B*K chains (question-major).
        Only the questions are read: no other field of a record reaches the decode."""
        K = chains.shape[1]
        questions = [r.question for r in records for _ in range(K)]
        projected = self.projector(chains.flatten(0, 1))  # [B*K, T, Dmain]
        return latent_main_inputs(self.main, self.main_tokenizer, self.readout, questions, projected)

    def charge(self, parameters: int, tokens: int, backward: str = "none") -> None:
        """Add a pass over `tokens` tokens of a model with `parameters` parameters to the FLOPs spent."""
        self.flops_spent += forward_flops(parameters, tokens, backward)

    @torch.no_grad()
    def decode(self, records: Sequence[Record], chains: torch.Tensor, charge: bool = False) -> list[str]:
        """One greedy decode of each chain [B, K, T, Dz] by the frozen main model, as the readout says
        (its own chain and answer line, or the answer alone with the cue put back in front); returns
        B*K completions scored like any text completion. `charge`: count its compute."""
        embeds, mask = self.main_inputs(records, chains)
        texts, ids = greedy_decode_embeds(self.main, embeds, mask, self.main_tokenizer, self.readout.max_new_tokens)
        if charge:
            self.charge(self.main_parameters, embeds.shape[0] * (embeds.shape[1] + ids.shape[1]))  # prefill + decode
            self.generated_tokens += int(
                completion_mask_after_eos(ids, eos_token_ids(self.main, self.main_tokenizer)).sum()
            )
        return [self.readout.scored_text(t) for t in texts]

    def decode_and_score(self, records: Sequence[Record], chains: torch.Tensor, charge: bool = False) -> torch.Tensor:
        """Rewards [B, K, 3] (correct, format, total) of the decoded chains [B, K, T, Dz]."""
        B, K = chains.shape[:2]
        completions = self.decode(records, chains, charge)
        golds = [r.answer for r in records for _ in range(K)]
        tasks = [r.task for r in records for _ in range(K)]
        scores = score_batch(completions, golds, tasks, **asdict(self.reward))
        return scores.reshape(B, K, 3).to(self.device)

    # --- training -----------------------------------------------------------------------------

    def training_step(self, batch: list[Record], batch_idx: int) -> None:
        align_opt, rl_opt = self.optimizers()
        step = self.trainer.global_step
        if self.stage == "alignment":
            self.alignment_step(batch, align_opt)
        else:
            self.rl_step(batch, rl_opt)
        self.guard.end_injection_batch(step)

    def alignment_step(self, records: list[Record], optimizer) -> None:
        """Stage 1: the frozen main model's NLL of the gold completion given the projected mean chain
        (rationale readout on a plain prompt: the rest of the chain after the T tokens the latents
        stand for), plus the pull of the latents toward those tokens' own embeddings."""
        ids, mask = self.encode_questions(records)
        chains = self.policy.mean_chain(ids, mask)  # [B, M, T, Dz]
        B, M, T = chains.shape[:3]
        rows = [r for r in records for _ in range(M)]
        projected = self.projector(chains.flatten(0, 1))  # [B*M, T, Dmain]
        embeds, emask = latent_main_inputs(
            self.main, self.main_tokenizer, self.readout, [r.question for r in rows], projected
        )
        eos = self.main_tokenizer.eos_token or ""
        opening, opening_mask, target, target_mask = (
            t.to(self.device)
            for t in split_gold_completion(
                self.main_tokenizer,
                [self.readout.gold_completion(r, eos) for r in rows],
                T,
                self.readout.latents_open_the_chain,
            )
        )
        nll = latent_target_nll(self.main, embeds, emask, target, target_mask)  # [B*M]
        self.charge(self.assistant_parameters, B * M * (ids.shape[1] + T), self.assistant_backward)
        self.charge(self.main_parameters, embeds.shape[0] * (embeds.shape[1] + target.shape[1]), "activations")
        loss = nll.mean()
        logs = {"train/align_nll": nll.detach().mean()}
        if self.readout.kind == "rationale" and self.settings.alignment.pull_weight > 0:
            with torch.no_grad():
                opening_embeds = self.main.get_input_embeddings()(opening)  # [B*M, T, Dmain]
            pull = latent_pull_loss(projected, opening_embeds, opening_mask, self.embedding_norm).mean()
            loss = loss + self.settings.alignment.pull_weight * pull
            logs["train/align_pull"] = pull.detach()
        if M > 1:
            separation = mode_separation_loss(chains, self.settings.rl.tau)
            loss = loss + self.settings.rl.lambda_modes * separation
            logs["train/mode_separation"] = separation.detach()
        norm = self._backward_and_step(loss, optimizer)
        self._log_step(logs, norm)
        self.last_grad_norm = float(norm) if norm is not None else None
        self.log("nll", logs["train/align_nll"], prog_bar=True, logger=False, batch_size=B)

    def rl_step(self, records: list[Record], optimizer) -> None:
        """Stage 2: sample G chains, decode the K the filter keeps, reward, and update (DESIGN §7)."""
        s = self.settings.rl
        if s.sigma_start is not None and int(self.rl_batches) == 0:  # the exploration noise stage 2 starts from
            self.policy.set_sigma(s.sigma_start)
        if self.reference is not None and not self.reference_synced:
            self.reference.load_state_dict(self.policy.state_dict())  # pi_ref = the policy after stage 1
            self.reference_synced.fill_(True)
        ids, mask = self.encode_questions(records)
        B = ids.shape[0]
        pass_tokens = ids.shape[1] + self.policy.num_steps  # one assistant pass per chain or mode
        if self.policy.mode == "recurrent":
            self.charge(self.assistant_parameters, B * s.num_samples * pass_tokens)
            z_all, dist = self.policy.sample_recurrent(ids, mask, s.num_samples)  # [B, G, T, Dz]
            modes = None
        else:
            dist = self.policy(ids, mask)  # mu: [B, M, T, Dz]
            z_all, modes = self.policy.sample(dist, s.num_samples)  # [B, G, T, Dz], [G]

        predicted = self.critic(dist.pooled, z_all)  # [B, G]
        use_critic = s.filter == "critic" and int(self.rl_batches) >= self.settings.critic.warmup
        method = s.filter if s.filter != "critic" or use_critic else "random"
        kept = select_latents(predicted.detach(), s.num_decoded, s.k_explore if use_critic else 0, method)  # [B, K]
        z = gather_samples(z_all, kept)  # [B, K, T, Dz]

        scores = self.decode_and_score(records, z, charge=True)  # [B, K, 3]
        self.last_scores = scores
        rewards = scores[..., 2]
        critic_loss = F.mse_loss(gather_samples(predicted, kept), rewards)
        advantages, zero_spread = group_advantages(rewards, s.scale)  # [B, K], [B]
        weights = LatentRLWeights(s.lambda_con, s.tau, s.beta, s.lambda_ent, s.clip_eps)

        old_logp = None
        for epoch in range(s.ppo_epochs):
            if epoch > 0 or self.policy.mode == "recurrent":
                dist = self.policy(ids, mask, z if self.policy.mode == "recurrent" else None)
            mu, log_sigma, anchors, ref = self._scored_latents(dist, ids, mask, z, kept, modes)
            rows = B * (s.num_decoded if self.policy.mode == "recurrent" else self.policy.num_modes)
            self.charge(self.assistant_parameters, rows * pass_tokens, self.assistant_backward)
            if ref is not None:
                self.charge(self.assistant_parameters, rows * pass_tokens)
            loss, terms = latent_rl_loss(mu, log_sigma, z, advantages, anchors, weights, ref, old_logp)
            if epoch == 0:
                loss = loss + self.settings.critic.weight * critic_loss
            if s.ppo_epochs > 1 and epoch == 0:
                old_logp = terms["logp"]
            if self.settings.latent.num_modes > 1:
                loss = loss + s.lambda_modes * mode_separation_loss(dist.mu, s.tau)
            norm = self._backward_and_step(loss, optimizer)
        self.rl_batches += 1
        self.last_reward, self.last_grad_norm = float(rewards.mean()), float(norm) if norm is not None else None
        self.last_rollout = Rollout(records, z_all, predicted.detach(), kept, rewards, log_sigma.detach(), mu.detach())

        logs = {
            "train/reward": rewards.mean(),
            "train/reward_std": rewards.std(dim=1).mean() if rewards.shape[1] > 1 else rewards.new_zeros(()),
            "train/rewards/correct/mean": scores[..., 0].mean(),
            "train/rewards/format/mean": scores[..., 1].mean(),
            "train/frac_reward_zero_std": zero_spread.float().mean(),
            "train/loss/pg": terms["pg"],
            "train/loss/contrastive": terms["contrastive"],
            "train/loss/critic": critic_loss.detach(),
            "train/kl": terms["kl"],
            "train/entropy": terms["entropy"],
            "train/sigma_mean": log_sigma.detach().exp().mean(),
            "train/contrastive_skipped_questions": terms["contrastive_skipped"],
            "train/filter_uses_critic": float(use_critic),
        }
        self._log_step(logs, norm)
        self.log("reward", logs["train/reward"], prog_bar=True, logger=False, batch_size=B)

    def _scored_latents(self, dist, ids, mask, z, kept, modes):
        """The current policy's (mu, log_sigma) for each decoded chain [B, K, T, Dz], the anchors
        [B, T, Dz] and, when beta > 0, the reference policy's (mu, log_sigma) for the same chains."""
        if self.policy.mode == "recurrent":  # dist was teacher-forced on the K decoded chains
            mu, log_sigma = dist.mu, dist.log_sigma
            anchors = self.policy.mean_chain(ids, mask)[:, 0]  # mu(q): the noise-free chain, with gradients
            self.charge(
                self.assistant_parameters,
                ids.shape[0] * (ids.shape[1] + self.policy.num_steps),
                self.assistant_backward,
            )
        else:
            mode_of = modes[kept]  # [B, K]
            mu, log_sigma = gather_samples(dist.mu, mode_of), gather_samples(dist.log_sigma, mode_of)
            anchors = dist.mu.mean(1)  # mean over modes: mu(q)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                if self.policy.mode == "recurrent":
                    ref_dist = self.reference(ids, mask, z)
                    ref = (ref_dist.mu, ref_dist.log_sigma)
                else:
                    ref_dist = self.reference(ids, mask)
                    ref = (gather_samples(ref_dist.mu, mode_of), gather_samples(ref_dist.log_sigma, mode_of))
        return mu, log_sigma, anchors, ref

    # --- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def greedy_completions(self, records: Sequence[Record]) -> list[str]:
        """The noise-free chain (mode 0) of each question, decoded once by the main model. Reads
        only each record's question."""
        ids, mask = self.encode_questions(records)
        return self.decode(records, self.policy.mean_chain(ids, mask)[:, :1])

    @torch.no_grad()
    def evaluate_latent(self, records: Sequence[Record], label: str, batch_size: int) -> list[DepthScore]:
        """Greedy accuracy by depth of `greedy_completions`."""
        was_training = self.training
        self.eval()
        try:
            return score_by_depth(
                records, self.greedy_completions, label=label, batch_size=batch_size, reward=self.reward
            )
        finally:
            self.train(was_training)

    @torch.no_grad()
    def sample_attempts(self, records: Sequence[Record], k: int) -> list[list[str]]:
        """k sampled latent chains per question, each decoded once: the attempts pass@k counts."""
        was_training = self.training
        self.eval()
        try:
            ids, mask = self.encode_questions(records)
            if self.policy.mode == "recurrent":
                z, _ = self.policy.sample_recurrent(ids, mask, k)
            else:
                z, _ = self.policy.sample(self.policy(ids, mask), k)
            texts = self.decode(records, z)  # question-major: k per record
            return [texts[i * k : (i + 1) * k] for i in range(len(records))]
        finally:
            self.train(was_training)

    # --- checkpoints --------------------------------------------------------------------------

    arm_name = "DLR"

    @property
    def protected_sha256(self) -> str | None:
        return self.main_sha256

    def is_backbone_key(self, key: str) -> bool:
        """Weights reloaded from the backbone at start: the main model, and the assistant's base
        weights when it trains through LoRA adapters."""
        if key.startswith("main."):
            return True
        in_assistant = key.startswith(("policy.assistant.", "reference.assistant."))
        return self.lora and in_assistant and "lora_" not in key
