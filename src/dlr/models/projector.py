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


PROJECTORS = ("mlp", "soft_tokens")


class SoftTokenProjector(nn.Module):
    """P(z) = softmax(W z + b) @ E: the expected input embedding of the frozen main model under a
    distribution over its own vocabulary (a "soft token"), so a latent that puts its mass on one token
    is exactly that token's embedding. Stage 1 distils the distribution to the gold chain's tokens by
    cross-entropy (`vocabulary_logits`).

    `embeddings` is the main model's own input-embedding layer, shared, frozen and never saved with
    the DLR state (DLRModule.is_backbone_key). At compression c > 1 a latent stands for c tokens: the
    expected embedding is then rescaled to `rescale_to` (the mean embedding norm), as the targets are.
    """

    def __init__(self, latent_dim: int, embeddings: nn.Embedding, rescale_to: float | None = None) -> None:
        super().__init__()
        if rescale_to is not None and rescale_to <= 0:
            raise ValueError(f"soft-token projector rescale norm must be > 0, got {rescale_to}")
        self.to_vocabulary = nn.Linear(latent_dim, embeddings.num_embeddings)
        self.embeddings = embeddings
        self.rescale_to = rescale_to

    def vocabulary_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z: [..., Dz] -> logits over the main's vocabulary [..., V], in float32."""
        return self.to_vocabulary(z.float())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [..., T, Dz] -> [..., T, Dmain], in float32.

        The expected embedding is computed in the embedding matrix's own dtype: a float32 copy of a bf16
        matrix would be made at every call (0.93 GB for Qwen2.5-1.5B's, 2.2 GB for the 7B's, once per
        recurrent step); only the [..., Dmain] result is cast. A float32 matrix is used as it is."""
        weight = self.embeddings.weight.detach()  # [V, Dmain], the main's dtype
        x = (torch.softmax(self.vocabulary_logits(z), dim=-1).to(weight.dtype) @ weight).float()
        if self.rescale_to is not None:
            x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12) * self.rescale_to
        return x
