"""DLR: latent alignment (stage 1), then latent RL (stage 2), with a frozen main model (docs/design.md §7).

Stage 1 runs for `alignment.steps` optimizer steps: the assistant's mean chain, projected into the main
model's input, must make the frozen main model write the gold target; recurrent chains (answer readout)
are distilled from the gold chain itself (`chain_distillation_step`). Stage 2 runs `rl.steps` more:
sample G chains per question, keep K by the critic's predicted reward (or all G: `method=dlr_paper`,
the paper's Algorithm 1), decode them once with the main model, reward them, and update the policy
with the latent policy gradient, the contrastive term (`rl.contrastive`: the paper's dispersion of a
question's samples, Eq. 8, or our reward-aware InfoNCE), KL to the stage-1 policy and an entropy
bonus; the critic learns the rewards.

Only the assistant's adapters, the Gaussian heads, the projector and the critic are given to an
optimizer. Gradients are accumulated and clipped by hand (manual optimization).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from dlr.accounting import ModelCost, compute_parameters, model_cost
from dlr.data.schema import Record
from dlr.methods.losses import (
    LatentRLWeights,
    RecurrentChains,
    compress_chain_embeddings,
    group_advantages,
    group_chain_tokens,
    latent_pull_loss,
    latent_rl_loss,
    mode_separation_loss,
    soft_token_cross_entropy,
    stop_cross_entropy,
)
from dlr.methods.rl_base import RLModule
from dlr.methods.schedule import warmup_cosine
from dlr.methods.settings import DLRSettings
from dlr.models.backbones import PromptFormat, marker_token_id
from dlr.models.critic import RewardCritic, select_latents
from dlr.models.generation import (
    completion_mask_after_eos,
    eos_token_ids,
    greedy_decode_embeds,
    latent_target_nll,
)
from dlr.models.latent_policy import LatentDistribution, LatentPolicy, start_as_text_chain
from dlr.models.projector import LatentProjector, SoftTokenProjector, mean_embedding_norm
from dlr.models.readout import Readout, latent_main_inputs, right_padded, split_gold_completion
from dlr.rewards import TOTAL, RewardConfig
from dlr.scoring import DepthScore, score_by_depth


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
    step_mask: torch.Tensor | None = None  # [B, G, T] recurrent: each sampled chain's real steps

    def sigma_mean(self) -> torch.Tensor:
        """Mean sigma of the decoded chains, over their real steps."""
        sigma = self.log_sigma.exp()  # [B, K, T, Dz]
        if self.step_mask is None:
            return sigma.mean()
        real = gather_samples(self.step_mask, self.kept)[..., : sigma.shape[2]].bool()  # [B, K, T]
        return sigma[real].mean()


def gather_samples(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, G, ...], index: [B, K] -> [B, K, ...]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


class DLRModule(RLModule):
    arm_name = "DLR"
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
        super().__init__(settings, reward)
        self.fmt = fmt
        self.main_tokenizer, self.assistant_tokenizer = main_tokenizer, assistant_tokenizer
        for marker in (fmt.bol, fmt.eol):
            if marker_token_id(main_tokenizer, marker) is None:
                raise ValueError(f"the main tokenizer has no token {marker!r}: pick an existing token as latent marker")
        lat = settings.latent
        if lat.init == "assistant":  # the chain opens as the assistant's text chain does, after the opening marker
            if assistant_tokenizer.get_vocab() != main_tokenizer.get_vocab():
                raise ValueError(
                    "method.latent.init=assistant reads the assistant's next-token head as a distribution over the "
                    "main's vocabulary: the two tokenizers must share one vocabulary (use latent.init=random)"
                )
            placeholder = fmt.bol
        placeholder_id = marker_token_id(assistant_tokenizer, placeholder)
        if placeholder_id is None:
            raise ValueError(f"the assistant tokenizer has no placeholder token {placeholder!r} (backbone.placeholder)")

        self.main = main.requires_grad_(False).eval()  # frozen: never given to an optimizer
        self.main_sha256 = main_sha256
        main_dim = main.get_input_embeddings().embedding_dim
        self.policy = LatentPolicy(
            assistant,
            placeholder_id,
            lat.dim,
            lat.max_steps if lat.mode == "recurrent" else lat.steps,
            lat.log_sigma_min,
            lat.log_sigma_max,
            lat.log_sigma_init,
            lat.mode,
            lat.num_modes,
            feedback_dim=main_dim if lat.mode == "recurrent" else None,
        )
        self.embedding_norm = mean_embedding_norm(main)
        if lat.projector == "soft_tokens":
            rescale = self.embedding_norm if lat.compression > 1 else None  # as the compressed targets are
            self.projector = SoftTokenProjector(lat.dim, main.get_input_embeddings(), rescale)
            if lat.init == "assistant":
                start_as_text_chain(
                    self.policy, self.projector.to_vocabulary, main.get_input_embeddings().weight, len(main_tokenizer)
                )
        else:
            self.projector = LatentProjector(lat.dim, main_dim, self.embedding_norm)
        self.readout = Readout(settings.readout, fmt, settings.decode_tokens)
        self.critic = RewardCritic(assistant.get_input_embeddings().embedding_dim, lat.dim, settings.critic.hidden)
        # pi_ref for the KL term: a frozen copy, loaded with the policy's weights when stage 2 starts
        self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval() if settings.rl.beta > 0 else None
        self.register_buffer("rl_batches", torch.zeros((), dtype=torch.long))  # critic warm-up counter
        self.register_buffer("reference_synced", torch.zeros((), dtype=torch.bool))
        # FLOPs (docs/design.md §5): bodies at every position, output heads only where logits are computed
        self.main_cost, self.assistant_cost = model_cost(main), model_cost(assistant)
        policy = self.policy
        latent_heads = (policy.mu_head, policy.log_sigma_head, policy.latent_to_input, policy.stop_head)
        # mu, log-sigma and (recurrent) the stop head and input map run once per latent; no logits
        self.latent_heads_cost = ModelCost(sum(compute_parameters(m) for m in latent_heads if m is not None), 0)
        self.projector_cost, self.critic_cost = model_cost(self.projector), model_cost(self.critic)
        if isinstance(self.projector, SoftTokenProjector):  # its expected embedding is a [V] x [V, D] product
            self.projector_cost = ModelCost(self.projector_cost.body + main.get_input_embeddings().weight.numel(), 0)
        self.lora = any("lora_" in name for name, _ in assistant.named_parameters())
        self.assistant_backward = "activations" if self.lora else "weights"  # FLOPs factor of its backward passes
        self.last_rollout: Rollout | None = None
        self.stage1_info: dict | None = None  # what a shipped stage 1 cost and scored (methods/stage1.py)

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

        projector = [p for p in self.projector.parameters() if p.requires_grad]  # not the main's shared embeddings
        align = adamw([{"params": self.policy_parameters() + projector, "lr": s.alignment.lr}])
        if s.rl.heads_lr is None:
            policy = [{"params": self.policy_parameters(), "lr": s.rl.lr}]
        else:  # Table 2's two rates: the assistant's, and the projection's (our latent heads), each group clipped alone
            assistant = {id(p) for p in self.policy.assistant.parameters()}
            policy = [
                {"params": [p for p in self.policy_parameters() if id(p) in assistant], "lr": s.rl.lr},
                {"params": [p for p in self.policy_parameters() if id(p) not in assistant], "lr": s.rl.heads_lr},
            ]
        rl = adamw([*policy, {"params": list(self.critic.parameters()), "lr": s.critic.lr}])
        return [align, rl]

    def _backward_and_step(self, loss: torch.Tensor, optimizer) -> torch.Tensor | None:
        """One backward of `loss` and the step when due (rl_base.py); the policy's norm when a step was due."""
        return self.step_if_due(optimizer, self.backward_if_finite(loss))

    # --- text <-> tensors ---------------------------------------------------------------------

    def encode_questions(self, records: Sequence[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        """The assistant reads each question in its own tokenizer and prompt format: [B, Lq] left-padded."""
        prompts = [self.fmt.prompt(r.question, self.assistant_tokenizer) for r in records]
        enc = self.assistant_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def project_steps(self, chains: torch.Tensor, step_mask: torch.Tensor | None = None) -> torch.Tensor:
        """P(z) of chains [..., T, Dz] -> [..., T, Dmain]; with a step mask [..., T] only the real steps
        are projected (the padding stays 0), so the projector runs, and is charged, once per real latent."""
        if step_mask is None:
            return self.projector(chains)
        real = step_mask.bool()
        projected = self.projector(chains[real])  # [n real, Dmain]
        out = projected.new_zeros((*chains.shape[:-1], projected.shape[-1]))
        return out.masked_scatter(real[..., None], projected)

    def main_inputs(
        self, records: Sequence[Record], chains: torch.Tensor, step_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """chains: [B, K, T, Dz] (step_mask [B, K, T] for recurrent chains) -> the main model's input
        for each of the B*K chains (question-major). Only the questions are read: no other field of a
        record reaches the decode."""
        K = chains.shape[1]
        questions = [r.question for r in records for _ in range(K)]
        mask = None if step_mask is None else step_mask.flatten(0, 1)  # [B*K, T]
        projected = self.project_steps(chains.flatten(0, 1), mask)  # [B*K, T, Dmain]
        return latent_main_inputs(self.main, self.main_tokenizer, self.readout, questions, projected, mask)

    def charge_policy(
        self,
        rows: int,
        question_tokens: int,
        backward: str = "none",
        teacher_forced: bool = False,
        steps: int | None = None,
    ) -> None:
        """`rows` latent chains of the assistant over the question and `steps` latent positions in all
        (default rows * T: fixed-length chains): the body at every position; the assistant's own head
        (logits_to_keep=1) once per call, which is one call in parallel mode or teacher forced and one
        per latent in a recurrent rollout (a chain that has stopped leaves the batch, so a rollout's
        `steps` are its chains' real steps; a teacher-forced pass computes its padding too, so its
        `steps` are rows * the padded length); the latent heads once per latent."""
        steps = rows * self.policy.num_steps if steps is None else steps
        calls = rows if self.policy.mode == "parallel" or teacher_forced else steps
        self.charge(self.assistant_cost, rows * question_tokens + steps, calls, backward)
        self.charge(self.latent_heads_cost, steps, 0, backward)

    def charge_rollout(self, rows: int, question_tokens: int, dist: LatentDistribution, backward: str = "none"):
        """A recurrent rollout of `rows` chains (dist: their step mask): the assistant over their real
        steps, and the projector feeding each latent but the last back."""
        steps = int(dist.step_mask.sum())
        self.charge_policy(rows, question_tokens, backward, steps=steps)
        self.charge(self.projector_cost, steps - rows, 0, backward)

    @torch.no_grad()
    def decode(
        self,
        records: Sequence[Record],
        chains: torch.Tensor,
        charge: bool = False,
        step_mask: torch.Tensor | None = None,
        evaluation: bool = False,
    ) -> list[str]:
        """One greedy decode of each chain [B, K, T, Dz] (step_mask [B, K, T]: recurrent chains' real
        steps) by the frozen main model, as the readout says (its own chain and answer line, or the
        answer alone with the cue put back in front); returns B*K completions scored like any text
        completion. `charge`: count its compute. `evaluation`: the evaluation's decode budget, the one
        GRPO's completions get there (`method.eval_max_new_tokens`), instead of the training rollouts'."""
        embeds, mask = self.main_inputs(records, chains, step_mask)
        budget = self.settings.eval_decode_tokens if evaluation else self.readout.max_new_tokens
        texts, ids = greedy_decode_embeds(self.main, embeds, mask, self.main_tokenizer, budget)
        if charge:
            latents = chains.shape[0] * chains.shape[1] * chains.shape[2] if step_mask is None else int(step_mask.sum())
            self.charge(self.projector_cost, latents, 0)  # per real latent
            self.charge_generation(self.main_cost, embeds.shape[0], embeds.shape[1], ids.shape[1])
            self.generated_tokens += int(
                completion_mask_after_eos(ids, eos_token_ids(self.main, self.main_tokenizer)).sum()
            )
        return [self.readout.scored_text(t) for t in texts]

    def decode_and_score(
        self,
        records: Sequence[Record],
        chains: torch.Tensor,
        charge: bool = False,
        step_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores [B, K, 3] (correct, format, total) of the decoded chains [B, K, T, Dz]."""
        return self.score_rollouts(records, self.decode(records, chains, charge, step_mask))

    # --- training -----------------------------------------------------------------------------

    def train_batch(self, batch: list[Record]) -> None:
        align_opt, rl_opt = self.optimizers()
        if self.stage == "alignment":
            a = self.settings.alignment
            rate = a.lr * warmup_cosine(self.trainer.global_step, a.warmup_steps, a.steps, a.lr_floor)
            for group in align_opt.param_groups:
                group["lr"] = rate
            self.alignment_step(batch, align_opt)
        else:
            self.rl_step(batch, rl_opt)

    def alignment_step(self, records: list[Record], optimizer) -> None:
        """Stage 1: the frozen main model's NLL of the gold completion given the projected mean chain
        (rationale readout on a plain prompt: the rest of the chain after the T tokens the latents
        stand for), plus the pull of the latents toward those tokens' own embeddings. Recurrent
        chains are distilled from the gold chain instead (`chain_distillation_step`)."""
        if self.policy.mode == "recurrent":
            self.chain_distillation_step(records, optimizer)
            return
        ids, mask = self.encode_questions(records)
        chains = self.policy.mean_chain(ids, mask).mu  # [B, M, T, Dz]
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
        self.charge_policy(B * M, ids.shape[1], self.assistant_backward)
        self.charge(self.projector_cost, B * M * T, 0, "weights")
        rows, Lt = embeds.shape[0], target.shape[1]  # the main's logits at the Lt + 1 positions kept
        self.charge(self.main_cost, rows * (embeds.shape[1] + Lt), rows * (Lt + 1), "activations")
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
        self.log_step(logs, norm)
        self.last_grad_norm = float(norm) if norm is not None else None
        self.last_scores = None  # stage 1 scores no completions
        self.log("nll", logs["train/align_nll"], prog_bar=True, logger=False, batch_size=B)

    def gold_chain_tokens(self, records: Sequence[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each record's gold chain (`Readout.gold_chain`) in the main's tokens, cut at the
        `max_steps * compression` tokens a capped chain stands for: right-padded (ids [B, L], mask [B, L])."""
        limit = self.policy.num_steps * self.settings.latent.compression
        texts = [self.readout.gold_chain(r) for r in records]
        rows = [ids[:limit] for ids in self.main_tokenizer(texts, add_special_tokens=False)["input_ids"]]
        pad = self.main_tokenizer.pad_token_id if self.main_tokenizer.pad_token_id is not None else 0
        ids, mask = right_padded(rows, max(1, *(len(r) for r in rows)), pad)
        return ids.to(self.device), mask.to(self.device)

    def chain_distillation_step(self, records: list[Record], optimizer) -> None:
        """Stage 1 of recurrent chains (answer readout). Targets y_1..y_T: the main's own frozen input
        embeddings of the gold chain, compressed c to one (`compress_chain_embeddings`). Loss =
          distill_weight * teacher-forced distillation: the assistant reads y_<t fed back, and its
            latent mu_t must stand for y_t (with `self_feed` > 0 that share of the fed-back steps holds
            the policy's own P(mu_t) from a first gold-fed pass instead, so it learns to read its own
            latents, as it must at inference): squared distance of P(mu_t) to y_t in units of the mean
            embedding norm (mlp projector), or the cross-entropy of its soft token to the gold tokens;
          + stop_weight * the stop head's cross-entropy (stop at the chain's last step);
          + answer_weight * the main's NLL of the answer given the chain: with answer_chain=own the
            chain the policy writes on its own (closed loop: P(mu_t) fed back, its own stop decisions),
            so the chain works when it feeds on itself, gradients running back through the whole chain;
            with answer_chain=forced the teacher-forced chain, so each latent is made readable to the
            main in the gold context (the distance alone leaves errors the main misreads).
        A chain longer than max_steps * c tokens is cut there (no stop target: the cap ends it)."""
        align, lat = self.settings.alignment, self.settings.latent
        ids, mask = self.encode_questions(records)
        B, Lq = ids.shape
        chain_ids, chain_mask = self.gold_chain_tokens(records)  # [B, L]
        with torch.no_grad():
            gold = self.main.get_input_embeddings()(chain_ids).float()  # [B, L, Dmain]
        targets, target_mask = compress_chain_embeddings(gold, chain_mask, lat.compression, self.embedding_norm)
        T = targets.shape[1]
        fed = targets  # [B, T, Dmain], what the assistant reads back at each step
        if align.self_feed > 0:  # scheduled sampling: some steps read the policy's own P(mu_t), as at inference
            with torch.no_grad():
                own = self.projector(self.policy(ids, mask, targets[:, None], target_mask[:, None]).mu[:, 0])
            self.charge_policy(B, Lq, teacher_forced=True, steps=B * T)
            self.charge(self.projector_cost, B * T, 0)
            swap = torch.rand(B, T, 1, device=targets.device) < align.self_feed
            fed = torch.where(swap, own, targets)
        forced = self.policy(ids, mask, fed[:, None], target_mask[:, None])  # [B, 1, T, ...]
        mu = forced.mu[:, 0]  # [B, T, Dz]
        self.charge_policy(B, Lq, self.assistant_backward, teacher_forced=True, steps=B * T)
        if isinstance(self.projector, SoftTokenProjector):
            tokens, token_mask = group_chain_tokens(chain_ids, chain_mask, lat.compression)  # [B, T, c]
            distill = soft_token_cross_entropy(self.projector.vocabulary_logits(mu), tokens, token_mask)
            self.charge(model_cost(self.projector.to_vocabulary), B * T, 0, "weights")
        else:
            distill = latent_pull_loss(self.projector(mu), targets, target_mask, self.embedding_norm)
            self.charge(self.projector_cost, B * T, 0, "weights")
        stop = stop_cross_entropy(forced.stop_logit[:, 0], target_mask, self.policy.num_steps)  # [B]
        loss = align.distill_weight * distill.mean() + align.stop_weight * stop.mean()
        logs = {"train/align_distill": distill.detach().mean(), "train/align_stop": stop.detach().mean()}
        if align.answer_weight > 0:
            if align.answer_chain == "own":
                own = self.policy.mean_chain(ids, mask, self.projector)  # [B, 1, T', Dz], its own length
                self.charge_rollout(B, Lq, own, self.assistant_backward)
                chain, chain_mask = own.mu, own.step_mask
                logs["train/chain_length"] = own.step_mask.sum(-1).float().mean()
            else:  # the teacher-forced chain: each latent is read in the gold context, no backprop through the recurrence
                chain, chain_mask = forced.mu, target_mask[:, None]  # [B, 1, T, Dz]
            embeds, emask = self.main_inputs(records, chain, chain_mask)
            eos = self.main_tokenizer.eos_token or ""
            completions = [self.readout.gold_completion(r, eos) for r in records]
            _, _, answer, answer_mask = (
                t.to(self.device) for t in split_gold_completion(self.main_tokenizer, completions, 0, False)
            )
            nll = latent_target_nll(self.main, embeds, emask, answer, answer_mask)  # [B]
            self.charge(self.projector_cost, int(chain_mask.sum()), 0, "weights")
            La = answer.shape[1]  # the main's logits at the La + 1 positions kept
            self.charge(self.main_cost, B * (embeds.shape[1] + La), B * (La + 1), "activations")
            loss = loss + align.answer_weight * nll.mean()
            logs["train/align_nll"] = nll.detach().mean()
        logs["train/gold_chain_length"] = target_mask.sum(-1).float().mean()
        norm = self._backward_and_step(loss, optimizer)
        self.log_step(logs, norm)
        self.last_grad_norm = float(norm) if norm is not None else None
        self.last_scores = None  # stage 1 scores no completions
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=B)

    def frozen_projection(self, z: torch.Tensor) -> torch.Tensor:
        """P(z) with gradients to z only: stage 2 trains the policy, and leaves the projector as stage 1 made it."""
        weights = {name: p.detach() for name, p in self.projector.named_parameters()}
        return torch.func.functional_call(self.projector, weights, (z,))

    def rl_step(self, records: list[Record], optimizer) -> None:
        """Stage 2: sample G chains, decode the K the filter keeps, reward, and update (docs/design.md §7)."""
        s = self.settings.rl
        if s.sigma_start is not None and int(self.rl_batches) == 0:  # the exploration noise stage 2 starts from
            self.policy.set_sigma(s.sigma_start)
        if self.reference is not None and not self.reference_synced:
            self.reference.load_state_dict(self.policy.state_dict())  # pi_ref = the policy after stage 1
            self.reference_synced.fill_(True)
        ids, mask = self.encode_questions(records)
        B = ids.shape[0]
        recurrent = self.policy.mode == "recurrent"
        if recurrent:
            z_all, dist = self.policy.sample_recurrent(ids, mask, s.num_samples, self.projector)  # [B, G, T, Dz]
            self.charge_rollout(B * s.num_samples, ids.shape[1], dist)
            modes = None
        else:
            dist = self.policy(ids, mask)  # mu: [B, M, T, Dz]
            z_all, modes = self.policy.sample(dist, s.num_samples)  # [B, G, T, Dz], [G]
        all_steps = dist.step_mask  # [B, G, T] recurrent; None: fixed length

        predicted = self.critic(dist.pooled, z_all, all_steps)  # [B, G]
        self.charge(self.critic_cost, B * s.num_samples, 0, "weights")  # with L_critic's backward
        use_critic = s.filter == "critic" and int(self.rl_batches) >= self.settings.critic.warmup
        method = s.filter if s.filter != "critic" or use_critic else "random"
        kept = select_latents(predicted.detach(), s.num_decoded, s.k_explore if use_critic else 0, method)  # [B, K]
        z = gather_samples(z_all, kept)  # [B, K, T, Dz]
        step_mask, fed = None, None
        if recurrent:  # the decoded chains, cut to the longest of them, and their P(z) for rescoring
            step_mask = gather_samples(all_steps, kept)  # [B, K, T]
            longest = int(step_mask.sum(-1).max())
            z, step_mask = z[:, :, :longest], step_mask[:, :, :longest]
            with torch.no_grad():
                fed = self.project_steps(z, step_mask)  # [B, K, T, Dmain]
            self.charge(self.projector_cost, int(step_mask.sum()), 0)

        scores = self.decode_and_score(records, z, charge=True, step_mask=step_mask)  # [B, K, 3]
        rewards = scores[..., TOTAL]  # [B, K]
        critic_loss = F.mse_loss(gather_samples(predicted, kept), rewards)
        advantages, zero_spread = group_advantages(rewards, s.scale)  # [B, K], [B]
        weights = LatentRLWeights(
            s.contrastive, s.lambda_con, s.contrastive_normalize, s.tau, s.beta, s.lambda_ent, s.clip_eps
        )

        old_logp = None
        for epoch in range(s.ppo_epochs):
            if epoch > 0 or recurrent:
                dist = self.policy(ids, mask, fed, step_mask) if recurrent else self.policy(ids, mask)
            mu, log_sigma, anchors, ref, chains = self._scored_latents(dist, ids, mask, kept, modes, fed, step_mask)
            rows = B * (s.num_decoded if recurrent else self.policy.num_modes)
            steps = rows * z.shape[2] if recurrent else None  # a teacher-forced pass computes the padding too
            self.charge_policy(rows, ids.shape[1], self.assistant_backward, teacher_forced=True, steps=steps)
            if ref is not None:
                self.charge_policy(rows, ids.shape[1], teacher_forced=True, steps=steps)
            loss, terms = latent_rl_loss(mu, log_sigma, z, advantages, anchors, weights, ref, old_logp, chains)
            if epoch == 0:
                loss = loss + self.settings.critic.weight * critic_loss
            if s.ppo_epochs > 1 and epoch == 0:
                old_logp = terms["logp"]
            if self.settings.latent.num_modes > 1:
                loss = loss + s.lambda_modes * mode_separation_loss(dist.mu, s.tau)
            norm = self._backward_and_step(loss, optimizer)
        self.rl_batches += 1
        self.last_rollout = Rollout(
            records, z_all, predicted.detach(), kept, rewards, log_sigma.detach(), mu.detach(), all_steps
        )

        logs = {
            "train/loss/pg": terms["pg"],
            "train/loss/contrastive": terms["contrastive"],
            "train/loss/critic": critic_loss.detach(),
            "train/kl": terms["kl"],
            "train/entropy": terms["entropy"],
            "train/sigma_mean": self.last_rollout.sigma_mean(),
            "train/contrastive_skipped_questions": terms["contrastive_skipped"],
            "train/filter_uses_critic": float(use_critic),
            "train/chain_sq_norm": terms["chain_sq_norm"],  # |z|^2 of the decoded chains: raw Eq. (8)'s s_kk
        }
        if "contrastive_logit_gap" in terms:  # dispersion: s_kk - s_kj, how saturated Eq. (8) is
            logs["train/contrastive_logit_gap"] = terms["contrastive_logit_gap"]
        self.finish_rl_batch(scores, zero_spread, norm, logs)

    def _scored_latents(self, dist, ids, mask, kept, modes, fed, step_mask):
        """The current policy's (mu, log_sigma) for each decoded chain [B, K, T, Dz], the anchors
        [B, T, Dz] when the contrastive term reads them (reward_infonce; else None), when beta > 0 the
        reference policy's (mu, log_sigma) for the same chains and, for recurrent chains, their stop
        logits and step masks (`RecurrentChains`)."""
        chains = None
        with_anchors = self.settings.rl.contrastive == "reward_infonce"
        if self.policy.mode == "recurrent":  # dist was teacher-forced on the K decoded chains
            mu, log_sigma = dist.mu, dist.log_sigma
            anchors, anchor_mask = None, None
            if with_anchors:  # mu(q), with gradients: one more rollout of the mean chain
                anchor = self.policy.mean_chain(ids, mask, self.frozen_projection)
                self.charge_rollout(ids.shape[0], ids.shape[1], anchor, self.assistant_backward)
                anchors, anchor_mask = anchor.mu[:, 0], anchor.step_mask[:, 0]
            ref_stop = None
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref_dist = self.reference(ids, mask, fed, step_mask)
                ref, ref_stop = (ref_dist.mu, ref_dist.log_sigma), ref_dist.stop_logit
            chains = RecurrentChains(dist.stop_logit, step_mask, anchor_mask, self.policy.num_steps, ref_stop)
            return mu, log_sigma, anchors, ref, chains
        mode_of = modes[kept]  # [B, K]
        mu, log_sigma = gather_samples(dist.mu, mode_of), gather_samples(dist.log_sigma, mode_of)
        anchors = dist.mu.mean(1) if with_anchors else None  # mean over modes: mu(q)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref_dist = self.reference(ids, mask)
                ref = (gather_samples(ref_dist.mu, mode_of), gather_samples(ref_dist.log_sigma, mode_of))
        return mu, log_sigma, anchors, ref, chains

    # --- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def greedy_completions(self, records: Sequence[Record]) -> list[str]:
        """The noise-free chain (mode 0) of each question, decoded once by the main model. Reads
        only each record's question."""
        ids, mask = self.encode_questions(records)
        chain = self.policy.mean_chain(ids, mask, self.projector)
        step_mask = None if chain.step_mask is None else chain.step_mask[:, :1]
        return self.decode(records, chain.mu[:, :1], step_mask=step_mask, evaluation=True)

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
                z, dist = self.policy.sample_recurrent(ids, mask, k, self.projector)
                texts = self.decode(
                    records, z, step_mask=dist.step_mask, evaluation=True
                )  # question-major: k per record
            else:
                z, _ = self.policy.sample(self.policy(ids, mask), k)
                texts = self.decode(records, z, evaluation=True)
            return [texts[i * k : (i + 1) * k] for i in range(len(records))]
        finally:
            self.train(was_training)

    # --- checkpoints --------------------------------------------------------------------------

    @property
    def protected_sha256(self) -> str | None:
        return self.main_sha256

    def is_backbone_key(self, key: str) -> bool:
        """Weights reloaded from the backbone at start: the main model (and its input embeddings,
        which a soft-token projector shares), and the assistant's base weights when it trains through
        LoRA adapters."""
        if key.startswith(("main.", "projector.embeddings.")):
            return True
        in_assistant = key.startswith(("policy.assistant.", "reference.assistant."))
        return self.lora and in_assistant and "lora_" not in key
