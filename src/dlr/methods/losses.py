"""Losses of both RL arms as pure functions of tensors (docs/design.md §7, §8).

Shape letters: B questions, G latents sampled per question, K decoded (or completions) per question,
T latent steps, Dz latent width, L completion tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
ADVANTAGE_SCALES = ("group", "batch", "none")


# --- diagonal Gaussian latent policy -----------------------------------------------------------


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Exact diagonal-Gaussian log-density of z, averaged over the T*Dz dimensions.

    z: [..., T, Dz]; mu, log_sigma broadcastable to z. Returns [...].
    """
    per_dim = -0.5 * ((z - mu) * torch.exp(-log_sigma)) ** 2 - log_sigma - 0.5 * LOG_2PI  # [..., T, Dz]
    return per_dim.flatten(-2).mean(-1)


def gaussian_entropy(log_sigma: torch.Tensor) -> torch.Tensor:
    """Entropy per dimension of a diagonal Gaussian, averaged over T*Dz. log_sigma: [..., T, Dz] -> [...]."""
    return (0.5 * (1.0 + LOG_2PI) + log_sigma).flatten(-2).mean(-1)


def gaussian_kl(
    mu_p: torch.Tensor, log_sigma_p: torch.Tensor, mu_q: torch.Tensor, log_sigma_q: torch.Tensor
) -> torch.Tensor:
    """Closed-form KL(p || q) of diagonal Gaussians, averaged over T*Dz. All [..., T, Dz] -> [...]."""
    var_ratio = torch.exp(2 * (log_sigma_p - log_sigma_q))
    mean_term = ((mu_p - mu_q) * torch.exp(-log_sigma_q)) ** 2
    per_dim = log_sigma_q - log_sigma_p + 0.5 * (var_ratio + mean_term) - 0.5  # [..., T, Dz]
    return per_dim.flatten(-2).mean(-1)


# --- stage 1 -----------------------------------------------------------------------------------


def latent_pull_loss(projected: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, norm: float) -> torch.Tensor:
    """Squared distance of projected latents to the main model's own embeddings of the tokens they
    stand for, in units of the mean embedding norm: mean_t ||P(mu_t) - e_t||^2 / norm^2 over the
    positions the mask keeps, so latents stay where the main model's inputs live.

    projected, targets: [N, T, D]; mask: [N, T] (0 where a completion is shorter than T). Returns [N]
    (0 for a row with no target).
    """
    per_step = (projected.float() - targets.float()).pow(2).sum(-1) / norm**2  # [N, T]
    weights = mask.to(per_step.dtype)
    return (per_step * weights).sum(1) / weights.sum(1).clamp(min=1)


# --- advantages ---------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of K samples per question, and which groups have zero reward spread.

    rewards: [B, K]. A = r - mean_group, divided by (std_group + eps) for `group`, by the batch std
    for `batch`, not at all for `none`. A group whose rewards are all equal gets A = 0 exactly.
    Returns (advantages [B, K], zero_spread [B] bool).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # [B, K]
    zero_spread = (rewards.max(dim=1).values - rewards.min(dim=1).values) == 0  # [B]
    if scale == "group":
        std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
        centered = centered / (std + eps)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        centered = centered / (std + eps)
    return centered.masked_fill(zero_spread[:, None], 0.0), zero_spread


# --- latent policy gradient ---------------------------------------------------------------------


def latent_policy_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    num_dims: int = 1,
) -> torch.Tensor:
    """-mean A * log pi(z|q); with `old_logp` (ppo_epochs > 1) the clipped-ratio form.

    logp, old_logp, advantages: [B, K]; logp is log pi(z|q) averaged over the chain's `num_dims`
    (T*Dz) dimensions. The PPO ratio is that of whole chains, exp(num_dims * (logp - old_logp)) =
    pi(z|q) / pi_old(z|q), so the clip bounds the policy ratio (a ratio of per-dimension means would
    be its num_dims-th root: no trust region at all at T*Dz = 32*512). The clipped surrogate is
    divided by num_dims, so at ratio 1 its gradient equals the plain form's. Returns a scalar.
    """
    if old_logp is None:
        return -(advantages * logp).mean()
    ratio = torch.exp(num_dims * (logp - old_logp))  # [B, K] pi(z|q) / pi_old(z|q)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped).mean() / num_dims


# --- bidirectional contrastive objective -------------------------------------------------------


def bidirectional_info_nce(
    anchors: torch.Tensor, latents: torch.Tensor, advantages: torch.Tensor, tau: float = 0.1
) -> tuple[torch.Tensor, int]:
    """Bidirectional InfoNCE between question anchors and decoded latents (docs/design.md §7, stage 2 step 6).

    anchors: [B, T, Dz] (mu(q_b), gradients flow); latents: [B, K, T, Dz] (sampled actions, detached
    here); advantages: [B, K]. With s(u, v) = cos(flat u, flat v) / tau:
      forward, question -> latents: positives P_b are question b's latents with A > 0; the
        denominator runs over all B*K latents (its own with A <= 0 and every other question's):
        L_fwd = -mean_b log( sum_{p in P_b} e^{s(a_b,p)} / sum_x e^{s(a_b,x)} );
      backward, latents -> question: each positive picks its own anchor among the B anchors:
        L_bwd = -mean_p log( e^{s(p,a_b)} / sum_b' e^{s(p,a_b')} ).
    Returns ((L_fwd + L_bwd) / 2, number of questions skipped for having no positive). With no
    positive anywhere the loss is a zero that still belongs to the graph.
    """
    B, K = advantages.shape
    a = F.normalize(anchors.flatten(1), dim=-1)  # [B, T*Dz]
    x = F.normalize(latents.detach().flatten(2), dim=-1).reshape(B * K, -1)  # [B*K, T*Dz]
    sim = a @ x.T / tau  # [B, B*K]: s(a_b, x)
    positive = (advantages > 0).reshape(1, B * K) & (
        torch.arange(B, device=sim.device)[:, None] == torch.arange(B * K, device=sim.device)[None, :] // K
    )  # [B, B*K]: x is a positive of question b
    has_positive = positive.any(dim=1)  # [B]
    skipped = int((~has_positive).sum())
    if not has_positive.any():
        return anchors.sum() * 0.0, skipped

    log_denominator = torch.logsumexp(sim, dim=1)  # [B]
    log_numerator = torch.logsumexp(sim.masked_fill(~positive, float("-inf")), dim=1)  # [B]
    loss_forward = -(log_numerator - log_denominator)[has_positive].mean()

    owner, index = positive.nonzero(as_tuple=True)  # one row per positive latent
    logits = sim[:, index].T  # [P, B]: s(p, a_b') for every anchor
    loss_backward = F.cross_entropy(logits, owner)
    return (loss_forward + loss_backward) / 2, skipped


def mode_separation_loss(mode_means: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Within-question contrastive term keeping M latent modes apart (`latent.num_modes` > 1).

    mode_means: [B, M, T, Dz]. Each mode is its own positive among the question's M modes (InfoNCE
    over self-similarity with the diagonal as target), so pushing modes apart lowers the loss.
    """
    B, M = mode_means.shape[:2]
    m = F.normalize(mode_means.flatten(2), dim=-1)  # [B, M, T*Dz]
    logits = m @ m.transpose(1, 2) / tau  # [B, M, M]
    target = torch.arange(M, device=logits.device).expand(B, M)
    return F.cross_entropy(logits.reshape(B * M, M), target.reshape(-1))


@dataclass(frozen=True)
class LatentRLWeights:
    """Weights of the stage-2 objective L_pg + lambda_con L_con + beta KL - lambda_ent H (docs/design.md §7)."""

    lambda_con: float = 0.1  # bidirectional contrastive term
    tau: float = 0.1  # its cosine temperature
    beta: float = 0.0  # KL to the policy frozen after stage 1
    lambda_ent: float = 0.0  # entropy bonus
    clip_eps: float = 0.2  # ratio clip when old log-probs are given (ppo_epochs > 1)


def latent_rl_loss(
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    z: torch.Tensor,
    advantages: torch.Tensor,
    anchors: torch.Tensor,
    weights: LatentRLWeights,
    ref: tuple[torch.Tensor, torch.Tensor] | None = None,
    old_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The latent policy's stage-2 loss on the K decoded latents of each of B questions.

    mu, log_sigma: [B, K, T, Dz] the policy's Gaussian for each decoded latent (its mode's, or its
    step-wise one in recurrent mode); z: [B, K, T, Dz] the sampled actions; advantages: [B, K];
    anchors: [B, T, Dz] the question's mean chain; ref: the frozen policy's (mu, log_sigma) in the
    same shapes, needed when beta > 0; old_logp: [B, K] for the clipped-ratio form.
    Returns (scalar loss, detached terms for logging).
    """
    logp = gaussian_log_prob(z.detach(), mu, log_sigma)  # [B, K]
    pg = latent_policy_loss(logp, advantages, old_logp, weights.clip_eps, num_dims=z.shape[-2] * z.shape[-1])
    con, skipped = bidirectional_info_nce(anchors, z, advantages, weights.tau)
    entropy = gaussian_entropy(log_sigma).mean()
    loss = pg + weights.lambda_con * con - weights.lambda_ent * entropy
    kl = torch.zeros((), device=mu.device)
    if weights.beta > 0:
        if ref is None:
            raise ValueError("beta > 0 needs the reference policy's (mu, log_sigma)")
        kl = gaussian_kl(mu, log_sigma, ref[0].detach(), ref[1].detach()).mean()
        loss = loss + weights.beta * kl
    terms = {"pg": pg, "contrastive": con, "kl": kl, "entropy": entropy, "logp": logp}  # logp: [B, K]
    terms = {k: v.detach() for k, v in terms.items()}
    terms["contrastive_skipped"] = torch.tensor(float(skipped))
    return loss, terms


# --- token-space GRPO -----------------------------------------------------------------------------

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss -min(r A, clip(r, 1-eps_low, 1+eps_high) A).

    logp, old_logp: [B, L] per-token log-probs; advantages: [B] per sequence.
    Returns (loss per token [B, L], clipped-low mask [B, L], clipped-high mask [B, L]).
    """
    ratio = torch.exp(logp - old_logp)  # [B, L]
    adv = advantages[:, None]  # [B, 1]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    low = (ratio < 1 - eps_low) & (adv < 0)  # the clip binds below
    high = (ratio > 1 + eps_high) & (adv > 0)  # the clip binds above
    return -torch.minimum(unclipped, clipped), low, high


def aggregate_token_loss(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int
) -> torch.Tensor:
    """Reduce a per-token loss [B, L] over completion tokens (mask [B, L]) to a scalar.

    grpo: mean over each sequence's tokens, then over sequences;
    bnpo, dapo: mean over all tokens of the batch (micro-batched, dapo divides by the whole batch's
    tokens and bnpo by each micro-batch's, see `micro_batch_weight`);
    dr_grpo: sum over tokens divided by B * max_completion_length (no length bias).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type in ("bnpo", "dapo"):
        return masked.sum() / mask.sum().clamp(min=1)
    return masked.sum() / (per_token.shape[0] * max_completion_length)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 (>= 0). [B, L] -> [B, L]."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def micro_batch_weight(
    loss_type: str, sequences: int, total_sequences: int, tokens: float, total_tokens: float, num_micro_batches: int
) -> float:
    """Factor on one micro-batch's `aggregate_token_loss` so that the weighted sum over micro-batches
    equals the aggregate over the whole batch (grpo, dr_grpo, dapo exactly; bnpo, as in TRL,
    normalises each micro-batch by its own tokens and averages the micro-batches). Under DDP, which
    averages the ranks' gradients, pass the ranks' mean `total_tokens`: dapo is then exact over all
    ranks' tokens (grpo and dr_grpo are, with equal sequences per rank)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type in ("grpo", "dr_grpo"):
        return sequences / total_sequences
    if loss_type == "dapo":
        return tokens / max(total_tokens, 1.0)
    return 1.0 / num_micro_batches
