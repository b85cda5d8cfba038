"""Critic V(q, z): predicts the reward of a latent chain before it is decoded, so only the most
promising K of G latents are sent to the main model (docs/design.md §7, stage 2 step 2)."""

from __future__ import annotations

import torch
from torch import nn

FILTERS = ("critic", "random", "none")


class RewardCritic(nn.Module):
    """Small MLP on [pooled question state ; mean latent over the chain's steps]. Inputs are detached: the critic
    learns to judge the policy, never to move it."""

    def __init__(self, question_dim: int, latent_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(question_dim + latent_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, pooled: torch.Tensor, z: torch.Tensor, step_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pooled: [B, H]; z: [B, G, T, Dz]; step_mask [B, G, T]: recurrent chains' real steps, which
        alone the mean latent averages. -> predicted reward [B, G]."""
        G = z.shape[1]
        question = pooled.detach().float()[:, None].expand(-1, G, -1)
        z = z.detach().float()
        if step_mask is None:
            mean_latent = z.mean(2)
        else:
            weights = step_mask.to(z.dtype)[..., None]  # [B, G, T, 1]
            mean_latent = (z * weights).sum(2) / weights.sum(2).clamp(min=1)
        features = torch.cat([question, mean_latent], dim=-1)  # [B, G, H+Dz]
        return self.net(features).squeeze(-1)


def select_latents(
    predicted: torch.Tensor, keep: int, explore: int, method: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices [B, K] of the latents to decode among G per question.

    critic: the top K - explore by predicted reward plus `explore` others drawn at random;
    random: K drawn at random; none: all G (K must equal G).
    predicted: [B, G].
    """
    B, G = predicted.shape
    if method not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {method!r}")
    if not 1 <= keep <= G or not 0 <= explore <= keep:
        raise ValueError(f"need 1 <= K <= G and 0 <= k_explore <= K, got K={keep}, G={G}, k_explore={explore}")
    if method == "none":
        if keep != G:
            raise ValueError(f"filter=none decodes all G latents: set K = G (got K={keep}, G={G})")
        return torch.arange(G, device=predicted.device).expand(B, G)
    noise = torch.rand(B, G, generator=generator).to(predicted.device)  # uniform random scores in [0, 1)
    if method == "random":
        return noise.topk(keep, dim=1).indices
    top = predicted.topk(keep - explore, dim=1).indices  # [B, K - explore]
    taken = torch.zeros(B, G, dtype=torch.bool, device=predicted.device).scatter(1, top, True)
    others = noise.masked_fill(taken, -1.0).topk(explore, dim=1).indices  # random among the rest
    return torch.cat([top, others], dim=1)
