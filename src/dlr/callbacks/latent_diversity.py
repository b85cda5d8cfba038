"""Diversity of the sampled latent chains (docs/design.md §10): mean pairwise cosine distance of the G chains of
a question, their effective rank, the mean sigma; TensorBoard histograms and an embedding-projector
snapshot of the decoded chains labelled by reward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from dlr.callbacks.rollout_diagnostic import RolloutDiagnostic
from dlr.ranks import log_now


def mean_pairwise_cosine_distance(z: torch.Tensor) -> torch.Tensor:
    """z: [B, G, T, Dz] -> mean over questions of 1 - cos between distinct chains (0: all equal)."""
    G = z.shape[1]
    unit = F.normalize(z.flatten(2).float(), dim=-1)  # [B, G, T*Dz]
    cos = unit @ unit.transpose(1, 2)  # [B, G, G]
    off_diagonal = cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)  # [B]
    return (1 - off_diagonal / (G * (G - 1))).mean()


def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """z: [B, G, T, Dz] -> mean over questions of exp(entropy of the normalised singular values) of
    the centred G x (T*Dz) sample matrix: 1 when chains vary along one direction, up to min(G-1, T*Dz)."""
    centred = z.flatten(2).float() - z.flatten(2).float().mean(1, keepdim=True)  # [B, G, T*Dz]
    s = torch.linalg.svdvals(centred)  # [B, min(G, T*Dz)]
    p = s / s.sum(-1, keepdim=True).clamp(min=1e-12)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)
    return entropy.exp().mean()


class LatentDiversity(RolloutDiagnostic):
    """Every N stage-2 steps logs `latent/cosine_distance`, `latent/effective_rank`, `latent/sigma_mean`;
    with TensorBoard also histograms of mu, sigma and z and, every `projector_every_n_steps`, an
    embedding-projector snapshot of the decoded chains with their rewards as labels."""

    def __init__(self, every_n_steps: int = 10, histograms: bool = True, projector_every_n_steps: int = 100) -> None:
        super().__init__(every_n_steps)
        if projector_every_n_steps < 0:
            raise ValueError("LatentDiversity needs projector_every_n_steps >= 0 (0: off)")
        self.histograms, self.projector_every_n_steps = histograms, projector_every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollout = self.due_rollout(trainer, pl_module)
        if rollout is None:
            return
        step = trainer.global_step
        log_now(
            trainer,
            {
                "latent/cosine_distance": mean_pairwise_cosine_distance(rollout.z),
                "latent/effective_rank": effective_rank(rollout.z),
                "latent/sigma_mean": rollout.sigma_mean(),  # over the real steps of recurrent chains
            },
        )
        board = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if board is None or not trainer.is_global_zero:
            return
        if self.histograms:
            board.add_histogram("latent/mu", rollout.mu.float().cpu(), step)
            board.add_histogram("latent/sigma", rollout.log_sigma.exp().float().cpu(), step)
            board.add_histogram("latent/z", rollout.z.float().cpu(), step)
        if self.projector_every_n_steps and step % self.projector_every_n_steps == 0:
            decoded = rollout.z[torch.arange(rollout.z.shape[0])[:, None], rollout.kept]  # [B, K, T, Dz]
            labels = [f"{r:.1f}" for r in rollout.rewards.flatten().tolist()]
            board.add_embedding(
                decoded.flatten(2).flatten(0, 1).float().cpu(), metadata=labels, global_step=step, tag="decoded_latents"
            )
