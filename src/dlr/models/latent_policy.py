"""The latent policy pi(z | q): an assistant LM reads the question and T placeholder tokens; Gaussian
heads on the placeholders' last hidden states give mu_t and a clamped log sigma_t (docs/design.md §7).

`parallel` mode reads all T placeholders in one pass (SoftCoT-style). `recurrent` mode feeds each
sampled z_t back, through a learned input projection, as the next input embedding (Coconut-style),
so z_t depends on z_<t and the chain is sampled in T sequential steps. With `num_modes` M > 1, M learned
start embeddings are added to the placeholders, giving M Gaussian modes per question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LATENT_MODES = ("parallel", "recurrent")


@dataclass
class LatentDistribution:
    """A batch of diagonal Gaussians over latent chains, plus what the critic reads."""

    mu: torch.Tensor  # [B, M, T, Dz]
    log_sigma: torch.Tensor  # [B, M, T, Dz]
    pooled: torch.Tensor  # [B, H] mean of the assistant's last hidden state over the question tokens


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
    ) -> None:
        super().__init__()
        if mode not in LATENT_MODES:
            raise ValueError(f"latent.mode must be one of {LATENT_MODES}, got {mode!r}")
        if num_steps < 1 or latent_dim < 1 or num_modes < 1:
            raise ValueError(
                f"latent steps, width and modes must be >= 1, got T={num_steps}, Dz={latent_dim}, M={num_modes}"
            )
        if mode == "recurrent" and num_modes > 1:
            raise ValueError("latent.num_modes > 1 needs latent.mode=parallel (recurrent chains have one start)")
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
        self.latent_to_input = nn.Linear(latent_dim, hidden) if mode == "recurrent" else None

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
        return hidden[:, input_ids.shape[1] :], pooled, out.past_key_values, mask

    def _placeholders(self, batch: int, device: torch.device) -> torch.Tensor:
        """Placeholder embeddings [B*M, T, H], with each mode's start embedding added."""
        ids = torch.full((batch, self.num_steps), self.placeholder_id, device=device)
        embeds = self.assistant.get_input_embeddings()(ids)  # [B, T, H]
        if self.mode_embeddings is None:
            return embeds
        embeds = embeds[:, None] + self.mode_embeddings[None, :, None, :]  # [B, M, T, H]
        return embeds.flatten(0, 1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, z: torch.Tensor | None = None
    ) -> LatentDistribution:
        """The distribution of latent chains given left-padded questions [B, Lq].

        Parallel mode: one pass, M modes per question. Recurrent mode: the distribution of each step
        given the sampled chain's earlier steps, teacher-forced in one pass (z: [B, G, T, Dz]); its
        M axis is then the G samples.
        """
        if self.mode == "recurrent":
            if z is None:
                raise ValueError("recurrent mode scores given chains: pass z, or sample with sample_recurrent()")
            return self._teacher_forced(input_ids, attention_mask, z)
        B, M = input_ids.shape[0], self.num_modes
        ids, mask = input_ids.repeat_interleave(M, 0), attention_mask.repeat_interleave(M, 0)
        h, pooled, _, _ = self._question_pass(ids, mask, self._placeholders(B, input_ids.device))
        mu, log_sigma = self._heads(h)  # [B*M, T, Dz]
        return LatentDistribution(
            mu.unflatten(0, (B, M)), log_sigma.unflatten(0, (B, M)), pooled.unflatten(0, (B, M))[:, 0]
        )

    def _teacher_forced(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, z: torch.Tensor
    ) -> LatentDistribution:
        B, G, T, _ = z.shape
        ids, mask = input_ids.repeat_interleave(G, 0), attention_mask.repeat_interleave(G, 0)
        start = self._placeholders(B * G, input_ids.device)[:, :1]  # [B*G, 1, H]
        fed_back = self.latent_to_input(z[:, :, :-1].flatten(0, 1))  # [B*G, T-1, H]
        h, pooled, _, _ = self._question_pass(ids, mask, torch.cat([start, fed_back], dim=1))
        mu, log_sigma = self._heads(h)  # [B*G, T, Dz]
        return LatentDistribution(
            mu.unflatten(0, (B, G)), log_sigma.unflatten(0, (B, G)), pooled.unflatten(0, (B, G))[:, 0]
        )

    def sample(
        self, dist: LatentDistribution, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """G chains per question, spread evenly over the modes. Returns (z [B, G, T, Dz], mode index [G])."""
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
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, LatentDistribution]:
        """Recurrent mode: sample G chains per question step by step, each z_t fed back as the next
        input. Returns (z [B, G, T, Dz] detached, the per-step distributions, with M axis = G)."""
        return self._recurrent_rollout(input_ids, attention_mask, num_samples, generator, noise=True)

    def mean_chain(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The noise-free chain, with gradients: mu of every mode [B, M, T, Dz] in parallel mode; in
        recurrent mode [B, 1, T, Dz], each mu_t fed back as the next input. Stage 1 trains it and
        greedy evaluation decodes it."""
        if self.mode == "parallel":
            return self(input_ids, attention_mask).mu
        return self._recurrent_rollout(input_ids, attention_mask, 1, None, noise=False)[0]

    def _recurrent_rollout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_samples: int,
        generator: torch.Generator | None,
        noise: bool,
    ) -> tuple[torch.Tensor, LatentDistribution]:
        if self.mode != "recurrent":
            raise RuntimeError("recurrent rollouts need latent.mode=recurrent")
        B, G = input_ids.shape[0], num_samples
        ids, mask = input_ids.repeat_interleave(G, 0), attention_mask.repeat_interleave(G, 0)
        start = self._placeholders(B * G, input_ids.device)[:, :1]  # [B*G, 1, H]
        h, pooled, cache, full_mask = self._question_pass(ids, mask, start, use_cache=True)
        mus, log_sigmas, zs = [], [], []
        for t in range(self.num_steps):
            mu, log_sigma = self._heads(h[:, -1])  # [B*G, Dz]
            z = mu
            if noise:
                z = (
                    mu + log_sigma.exp() * torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
                ).detach()
            mus.append(mu), log_sigmas.append(log_sigma), zs.append(z)
            if t + 1 == self.num_steps:
                break
            full_mask = torch.cat([full_mask, full_mask.new_ones(B * G, 1)], dim=1)
            out = self.assistant(
                inputs_embeds=self._as_input(self.latent_to_input(z)[:, None]),
                attention_mask=full_mask,
                position_ids=left_padded_positions(full_mask)[:, -1:],
                past_key_values=cache,
                output_hidden_states=True,
                use_cache=True,
                logits_to_keep=1,
            )
            h, cache = out.hidden_states[-1], out.past_key_values

        def stack(steps: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(steps, dim=1).unflatten(0, (B, G))  # [B, G, T, Dz]

        dist = LatentDistribution(stack(mus), stack(log_sigmas), pooled.unflatten(0, (B, G))[:, 0])
        return stack(zs), dist
