"""The latent policy pi(z | q): an assistant LM reads the question and T placeholder tokens; Gaussian
heads on the placeholders' last hidden states give mu_t and a clamped log sigma_t (docs/design.md §7).

`parallel` mode reads all T placeholders in one pass (SoftCoT-style). `recurrent` mode (Coconut /
CoLaR-style) reads one placeholder, then at each step t the last hidden state h_t gives mu_t, log
sigma_t and a stop logit; z_t is sampled, and its projection into the main model's input space, P(z_t),
is fed back through a learned input map as the assistant's next input. So z_t depends on z_<t, the
chain ends when the drawn stop bit is 1 (z_t is then its last latent) or at `num_steps` (the cap,
`latent.max_steps`), and the assistant reads the chain as the main model will: in the main's space,
which is also what stage 1 teacher-forces with the gold chain's embeddings. With `num_modes` M > 1
(parallel only), M learned start embeddings are added to the placeholders, giving M Gaussian modes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LATENT_MODES = ("parallel", "recurrent")
LATENT_INITS = ("random", "assistant")  # latent.init: fresh heads, or the assistant's own text chain


@dataclass
class LatentDistribution:
    """A batch of diagonal Gaussians over latent chains, plus what the critic reads."""

    mu: torch.Tensor  # [B, M, T, Dz]
    log_sigma: torch.Tensor  # [B, M, T, Dz]
    pooled: torch.Tensor  # [B, H] mean of the assistant's last hidden state over the question tokens
    stop_logit: torch.Tensor | None = None  # [B, M, T] recurrent: logit of "z_t is the chain's last latent"
    step_mask: torch.Tensor | None = None  # [B, M, T] recurrent: 1 on each chain's real steps, 0 after its end


Projection = Callable[[torch.Tensor], torch.Tensor]  # z [..., Dz] -> P(z) [..., Dmain], the main's input space


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token. [B, L] -> [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LatentPolicy(nn.Module):
    def __init__(
        self,
        assistant: nn.Module,
        placeholder_id: int,
        latent_dim: int,
        num_steps: int,
        log_sigma_min: float = -5.0,
        log_sigma_max: float = 0.5,
        log_sigma_init: float = -1.0,
        mode: str = "parallel",
        num_modes: int = 1,
        feedback_dim: int | None = None,
    ) -> None:
        """num_steps: T in parallel mode, the cap on a chain's length in recurrent mode; feedback_dim
        (recurrent): the width of the fed-back P(z_t), the main model's embedding width."""
        super().__init__()
        if mode not in LATENT_MODES:
            raise ValueError(f"latent.mode must be one of {LATENT_MODES}, got {mode!r}")
        if num_steps < 1 or latent_dim < 1 or num_modes < 1:
            raise ValueError(
                f"latent steps, width and modes must be >= 1, got T={num_steps}, Dz={latent_dim}, M={num_modes}"
            )
        if mode == "recurrent" and num_modes > 1:
            raise ValueError("latent.num_modes > 1 needs latent.mode=parallel (recurrent chains have one start)")
        if mode == "recurrent" and (feedback_dim is None or feedback_dim < 1):
            raise ValueError("recurrent mode feeds P(z_t) back: give feedback_dim, the main model's embedding width")
        if not log_sigma_min < log_sigma_max:
            raise ValueError(f"latent.log_sigma_min must be < log_sigma_max, got {log_sigma_min} >= {log_sigma_max}")
        self.assistant = assistant
        hidden = assistant.get_input_embeddings().embedding_dim
        self.placeholder_id, self.num_steps, self.mode, self.num_modes = placeholder_id, num_steps, mode, num_modes
        self.log_sigma_min, self.log_sigma_max = log_sigma_min, log_sigma_max
        self.mu_head = nn.Linear(hidden, latent_dim)
        self.log_sigma_head = nn.Linear(hidden, latent_dim)
        nn.init.zeros_(self.log_sigma_head.weight)  # start with one sigma everywhere, then learn it
        nn.init.constant_(self.log_sigma_head.bias, log_sigma_init)
        self.mode_embeddings = nn.Parameter(torch.randn(num_modes, hidden) * 0.02) if num_modes > 1 else None
        recurrent = mode == "recurrent"
        self.latent_to_input = nn.Linear(feedback_dim, hidden) if recurrent else None  # P(z_t) -> next input
        self.stop_head = nn.Linear(hidden, 1) if recurrent else None

    @property
    def latent_dim(self) -> int:
        return self.mu_head.out_features

    @torch.no_grad()
    def set_sigma(self, sigma: float) -> None:
        """One sigma for every question and position: the log-sigma head's output becomes log(sigma)."""
        self.log_sigma_head.weight.zero_()
        self.log_sigma_head.bias.fill_(math.log(sigma))

    def _heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and log sigma in float32 even under bf16 autocast: log-probs of small sigmas need the precision."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            log_sigma = self.log_sigma_head(h).clamp(self.log_sigma_min, self.log_sigma_max)
            return self.mu_head(h), log_sigma

    def _stop_logit(self, h: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [...], in float32 like the Gaussian heads."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.stop_head(h.float()).squeeze(-1)

    def _fed_back(self, projected: torch.Tensor) -> torch.Tensor:
        """P(z_t) [..., Dmain] -> the assistant's next input embedding [..., H]."""
        return self._as_input(self.latent_to_input(projected.float()))

    def _as_input(self, x: torch.Tensor) -> torch.Tensor:
        """Latent-side embeddings in the assistant's own dtype (it may run in bf16)."""
        return x.to(self.assistant.get_input_embeddings().weight.dtype)

    def _question_pass(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, extra_embeds: torch.Tensor, use_cache: bool = False
    ):
        """Run the assistant on [question ; extra_embeds]; return last hidden states of the extra
        positions [N, E, H], the pooled question state [N, H] and the KV cache."""
        embed = self.assistant.get_input_embeddings()
        q_embeds = embed(input_ids)  # [N, Lq, H]
        inputs = torch.cat([q_embeds, extra_embeds.to(q_embeds.dtype)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(extra_embeds.shape[:2])], dim=1)
        out = self.assistant(
            inputs_embeds=inputs,
            attention_mask=mask,
            position_ids=left_padded_positions(mask),
            output_hidden_states=True,
            use_cache=use_cache,
            logits_to_keep=1,  # hidden states are what we read
        )
        hidden = out.hidden_states[-1]  # [N, Lq + E, H]
        q_mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden[:, : input_ids.shape[1]] * q_mask).sum(1) / q_mask.sum(1).clamp(min=1)
        return hidden[:, input_ids.shape[1] :], pooled, out.cache, mask

    def _placeholders(self, batch: int, device: torch.device) -> torch.Tensor:
        """Placeholder embeddings [B*M, T, H], with each mode's start embedding added."""
        ids = torch.full((batch, self.num_steps), self.placeholder_id, device=device)
        embeds = self.assistant.get_input_embeddings()(ids)  # [B, T, H]
        if self.mode_embeddings is None:
            return embeds
        embeds = embeds[:, None] + self.mode_embeddings[None, :, None, :]  # [B, M, T, H]
        return embeds.flatten(0, 1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        fed: torch.Tensor | None = None,
        step_mask: torch.Tensor | None = None,
    ) -> LatentDistribution:
        """The distribution of latent chains given left-padded questions [B, Lq].

        Parallel mode: one pass, M modes per question. Recurrent mode: the distribution of each step
        given the chain's earlier steps, teacher-forced in one pass: fed [B, G, T, Dmain] holds each
        chain's steps in the main's input space (P(z_t) of sampled chains, or stage 1's gold-chain
        targets; the last step is never read) and step_mask [B, G, T] its real steps (all of them
        when None); the M axis of the result is then the G chains.
        """
        if self.mode == "recurrent":
            if fed is None:
                raise ValueError("recurrent mode scores given chains: pass fed, or sample with sample_recurrent()")
            return self._teacher_forced(input_ids, attention_mask, fed, step_mask)
        B, M = input_ids.shape[0], self.num_modes
        ids, mask = input_ids.repeat_interleave(M, 0), attention_mask.repeat_interleave(M, 0)
        h, pooled, _, _ = self._question_pass(ids, mask, self._placeholders(B, input_ids.device))
        mu, log_sigma = self._heads(h)  # [B*M, T, Dz]
        return LatentDistribution(
            mu.unflatten(0, (B, M)), log_sigma.unflatten(0, (B, M)), pooled.unflatten(0, (B, M))[:, 0]
        )

    def _teacher_forced(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, fed: torch.Tensor, step_mask: torch.Tensor | None
    ) -> LatentDistribution:
        B, G, T, _ = fed.shape
        ids, mask = input_ids.repeat_interleave(G, 0), attention_mask.repeat_interleave(G, 0)
        start = self._placeholders(B * G, input_ids.device)[:, :1]  # [B*G, 1, H]
        inputs = torch.cat([start, self._fed_back(fed[:, :, :-1].flatten(0, 1))], dim=1)  # [B*G, T, H]
        # steps after a chain's end sit after its real ones: causal attention keeps them out of its steps
        h, pooled, _, _ = self._question_pass(ids, mask, inputs)
        mu, log_sigma = self._heads(h)  # [B*G, T, Dz]
        if step_mask is None:
            step_mask = torch.ones(B, G, T, dtype=torch.long, device=fed.device)
        return LatentDistribution(
            mu.unflatten(0, (B, G)),
            log_sigma.unflatten(0, (B, G)),
            pooled.unflatten(0, (B, G))[:, 0],
            self._stop_logit(h).unflatten(0, (B, G)),
            step_mask,
        )

    def sample(
        self, dist: LatentDistribution, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Parallel mode: G chains per question, spread evenly over the modes. Returns (z [B, G, T, Dz], mode index [G])."""
        B, M, T, Dz = dist.mu.shape
        modes = torch.arange(num_samples, device=dist.mu.device) % M  # [G]
        mu, log_sigma = dist.mu[:, modes], dist.log_sigma[:, modes]  # [B, G, T, Dz]
        noise = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        return (mu + log_sigma.exp() * noise).detach(), modes

    @torch.no_grad()
    def sample_recurrent(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_samples: int,
        project: Projection,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, LatentDistribution]:
        """Recurrent mode: sample G chains per question step by step, each P(z_t) fed back as the next
        input and each stop bit drawn. Returns (z [B, G, T, Dz] detached, 0 after each chain's end; the
        per-step distributions with their stop logits and step mask, M axis = G), T the longest chain."""
        return self._recurrent_rollout(input_ids, attention_mask, num_samples, project, generator, noise=True)

    def mean_chain(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, project: Projection | None = None
    ) -> LatentDistribution:
        """The noise-free chain, with gradients, as its distribution's mu: of every mode [B, M, T, Dz]
        in parallel mode; in recurrent mode [B, 1, T, Dz], each P(mu_t) fed back as the next input
        (`project` required) and the chain ending where the stop head's probability passes 1/2, with
        its step mask. Stage 1 trains it, greedy evaluation decodes it and stage 2 anchors on it."""
        if self.mode == "parallel":
            return self(input_ids, attention_mask)
        if project is None:
            raise ValueError("a recurrent mean chain feeds P(mu_t) back: pass the projector")
        return self._recurrent_rollout(input_ids, attention_mask, 1, project, None, noise=False)[1]

    def _recurrent_rollout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_samples: int,
        project: Projection,
        generator: torch.Generator | None,
        noise: bool,
    ) -> tuple[torch.Tensor, LatentDistribution]:
        """The B*G chains step together on one KV cache; a chain that has stopped leaves the batch (its
        cache rows are dropped), so every assistant call computes real steps only."""
        if self.mode != "recurrent":
            raise RuntimeError("recurrent rollouts need latent.mode=recurrent")
        B, G = input_ids.shape[0], num_samples
        N = B * G
        ids, mask = input_ids.repeat_interleave(G, 0), attention_mask.repeat_interleave(G, 0)
        start = self._placeholders(N, input_ids.device)[:, :1]  # [N, 1, H]
        h, pooled, cache, full_mask = self._question_pass(ids, mask, start, use_cache=True)
        h = h[:, -1]  # [N, H]
        running = torch.arange(N, device=input_ids.device)  # the chains still going, by row
        lengths = torch.zeros(N, dtype=torch.long, device=input_ids.device)
        steps: list[tuple[torch.Tensor, ...]] = []  # per step (mu, log_sigma, stop_logit, z) of all N rows
        for t in range(self.num_steps):
            mu, log_sigma = self._heads(h)  # [n, Dz]
            stop_logit = self._stop_logit(h)  # [n]
            if noise:
                eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
                z = (mu + log_sigma.exp() * eps).detach()
                u = torch.rand(stop_logit.shape, device=mu.device, generator=generator)
                stop = u < torch.sigmoid(stop_logit)
            else:
                z, stop = mu, stop_logit > 0
            steps.append(tuple(_scatter_rows(x, running, N) for x in (mu, log_sigma, stop_logit, z)))
            lengths[running] += 1
            going = (~stop).nonzero().squeeze(1)
            if t + 1 == self.num_steps or going.numel() == 0:
                break
            if going.numel() < running.numel():  # drop the finished chains from the batch and the cache
                running, z, full_mask = running[going], z[going], full_mask[going]
                cache.batch_select_indices(going)
            full_mask = torch.cat([full_mask, full_mask.new_ones(running.numel(), 1)], dim=1)
            out = self.assistant(
                inputs_embeds=self._fed_back(project(z))[:, None],
                attention_mask=full_mask,
                position_ids=left_padded_positions(full_mask)[:, -1:],
                cache=cache,  # transformers >= 5.24's name (`past_key_values` goes in 5.40)
                output_hidden_states=True,
                use_cache=True,
                logits_to_keep=1,
            )
            h, cache = out.hidden_states[-1][:, -1], out.cache

        mu, log_sigma, stop_logit, z = (
            torch.stack(parts, dim=1).unflatten(0, (B, G)) for parts in zip(*steps, strict=True)
        )
        step_mask = torch.arange(len(steps), device=lengths.device) < lengths[:, None]  # [N, T]
        dist = LatentDistribution(
            mu, log_sigma, pooled.unflatten(0, (B, G))[:, 0], stop_logit, step_mask.long().unflatten(0, (B, G))
        )
        return z, dist


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    """values [n, ...] of the given rows placed into zeros [total, ...] (differentiable)."""
    return values.new_zeros((total, *values.shape[1:])).index_copy(0, rows, values)


@torch.no_grad()
def start_as_text_chain(
    policy: LatentPolicy, to_vocabulary: nn.Linear, main_embeddings: torch.Tensor, vocab_size: int
) -> None:
    """Make a recurrent soft-token chain start as the assistant's own text chain (latent.init=assistant),
    for an assistant and a main that share one vocabulary of `vocab_size` tokens (rows past it are padding):
    - the latent head: to_vocabulary(mu_head(h)) is the assistant's next-token logits W h, truncated to
      rank Dz by an SVD of W [V, H] (mu_head = sqrt(S_k) V_k^T, to_vocabulary = U_k sqrt(S_k), no
      bias; padding rows of the main's vocabulary get a bias of -30, never chosen), so the soft token
      is the assistant's next-token distribution;
    - the input map: the least-squares (minimum-norm) affine map taking each of the main's token
      embeddings to the assistant's own (main_embeddings: [>= V, Dmain]), so a fed-back soft token
      reads as the assistant's expected input embedding under the same distribution.
    The mean chain is then what the assistant would write as text, read by the main in soft tokens."""
    if policy.mode != "recurrent":
        raise ValueError("latent.init=assistant starts a recurrent chain: set latent.mode=recurrent")
    head = policy.assistant.get_output_embeddings().weight.float()[:vocab_size]  # [V, H]
    inputs = policy.assistant.get_input_embeddings().weight.float()[:vocab_size]  # [V, H]
    U, S, Vh = torch.linalg.svd(head, full_matrices=False)
    k = min(policy.latent_dim, S.numel())
    root = S[:k].sqrt()
    policy.mu_head.weight.zero_()
    policy.mu_head.weight[:k] = root[:, None] * Vh[:k]
    policy.mu_head.bias.zero_()
    to_vocabulary.weight.zero_()
    to_vocabulary.weight[:vocab_size, :k] = U[:, :k] * root
    to_vocabulary.bias.zero_()
    to_vocabulary.bias[vocab_size:] = -30.0
    main = main_embeddings.float()[:vocab_size]  # [V, Dmain]
    affine = torch.linalg.pinv(torch.cat([main, main.new_ones(vocab_size, 1)], dim=1)) @ inputs  # [Dmain + 1, H]
    policy.latent_to_input.weight.copy_(affine[:-1].T)
    policy.latent_to_input.bias.copy_(affine[-1])
