"""Projector P: R^Dz -> R^Dmain, so latents live where the main model's inputs live (docs/design.md §7)."""

from __future__ import annotations

import torch
from torch import nn


def mean_embedding_norm(main: nn.Module) -> float:
    """Mean L2 norm of the main model's token-embedding rows (the scale its inputs live at)."""
    weight = main.get_input_embeddings().weight
    return float(weight.detach().float().norm(dim=-1).mean())


class LatentProjector(nn.Module):
    """Linear(Dz, D) -> GELU -> Linear(D, D) -> RMSNorm, rescaled to the main model's mean embedding norm.

    RMSNorm makes every output row's norm sqrt(D) times its gain; the fixed factor
    `target_norm / sqrt(D)` then puts it at the norm of an average token embedding.
    """

    def __init__(self, latent_dim: int, main_dim: int, target_norm: float, eps: float = 1e-6) -> None:
        super().__init__()
        if target_norm <= 0:
            raise ValueError(f"projector target norm must be > 0, got {target_norm}")
        self.net = nn.Sequential(nn.Linear(latent_dim, main_dim), nn.GELU(), nn.Linear(main_dim, main_dim))
        self.gain = nn.Parameter(torch.ones(main_dim))
        self.register_buffer("scale", torch.tensor(target_norm / main_dim**0.5))
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [..., T, Dz] -> [..., T, Dmain]."""
        x = self.net(z)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.gain * self.scale
