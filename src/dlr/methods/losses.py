"""Losses of both RL arms as pure functions of tensors (docs/design.md §7, §8).

Shape letters: B questions, G latents sampled per question, K decoded (or completions) per question,
T latent steps, Dz latent width, L completion tokens, V the main model's vocabulary.

Recurrent chains have lengths of their own: a step mask [..., T] (1 on a chain's steps, a prefix; 0 on
the padding after its end) says which steps are real, and every chain loss below reads only those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
ADVANTAGE_SCALES = ("group", "batch", "none")


# --- diagonal Gaussian latent policy -----------------------------------------------------------


def _gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, sigma) per dimension. All broadcastable to [..., T, Dz]."""
    return -0.5 * ((z - mu) * torch.exp(-log_sigma)) ** 2 - log_sigma - 0.5 * LOG_2PI


def _real_step_sum(per_dim: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Sum of [..., T, Dz] over the dimensions of the real steps (step_mask [..., T]) -> [...]."""
    return torch.where(step_mask.bool()[..., None], per_dim, torch.zeros_like(per_dim)).sum((-2, -1))


def _masked_step_mean(per_dim: torch.Tensor, step_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of [..., T, Dz] over the dimensions of the real steps (all of them without a mask) -> [...]."""
    if step_mask is None:
        return per_dim.flatten(-2).mean(-1)
    return _real_step_sum(per_dim, step_mask) / (step_mask.bool().sum(-1) * per_dim.shape[-1]).clamp(min=1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Exact diagonal-Gaussian log-density of z, averaged over the T*Dz dimensions.

    z: [..., T, Dz]; mu, log_sigma broadcastable to z. Returns [...].
    """
    return _gaussian_log_density(z, mu, log_sigma).flatten(-2).mean(-1)


def gaussian_entropy(log_sigma: torch.Tensor, step_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy per dimension of a diagonal Gaussian, averaged over T*Dz (over the real steps' dimensions
    with `step_mask` [..., T]). log_sigma: [..., T, Dz] -> [...]."""
    return _masked_step_mean(0.5 * (1.0 + LOG_2PI) + log_sigma, step_mask)


def _gaussian_kl_per_dim(
    mu_p: torch.Tensor, log_sigma_p: torch.Tensor, mu_q: torch.Tensor, log_sigma_q: torch.Tensor
) -> torch.Tensor:
    var_ratio = torch.exp(2 * (log_sigma_p - log_sigma_q))
    mean_term = ((mu_p - mu_q) * torch.exp(-log_sigma_q)) ** 2
    return log_sigma_q - log_sigma_p + 0.5 * (var_ratio + mean_term) - 0.5  # [..., T, Dz]


def gaussian_kl(
    mu_p: torch.Tensor, log_sigma_p: torch.Tensor, mu_q: torch.Tensor, log_sigma_q: torch.Tensor
) -> torch.Tensor:
    """Closed-form KL(p || q) of diagonal Gaussians, averaged over T*Dz. All [..., T, Dz] -> [...]."""
    return _gaussian_kl_per_dim(mu_p, log_sigma_p, mu_q, log_sigma_q).flatten(-2).mean(-1)


# --- recurrent chains: the stop head --------------------------------------------------------------


def stop_bits(step_mask: torch.Tensor, max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stop decisions a chain of these real steps took, and which of them were drawn.

    At step t the stop head draws b_t ~ Bernoulli(sigmoid(stop_logit_t)); b_t = 1 ends the chain with z_t
    as its last latent. So b_t = 0 before the last step and 1 at it, except at the max_steps-th step,
    where the cap ends the chain and no bit is drawn. step_mask: [..., T] (a prefix of ones).
    Returns float (bits [..., T], drawn [..., T]).
    """
    real = step_mask.bool()
    after = torch.cat([real[..., 1:], torch.zeros_like(real[..., :1])], dim=-1)  # step t+1 is real
    steps = torch.arange(real.shape[-1], device=real.device)
    drawn = real & (steps < max_steps - 1)
    return (real & ~after).float(), drawn.float()


def stop_cross_entropy(stop_logit: torch.Tensor, step_mask: torch.Tensor, max_steps: int) -> torch.Tensor:
    """Stage 1's stop-head loss: binary cross-entropy of each drawn stop bit to the target chain's own
    (0 before its last step, 1 at it), averaged over the drawn steps of each row.

    stop_logit, step_mask: [N, T] (step_mask: the target chain's steps). Returns [N] (0 for a row with no
    drawn bit: a one-step chain at max_steps=1)."""
    bits, drawn = stop_bits(step_mask, max_steps)
    bce = F.binary_cross_entropy_with_logits(stop_logit.float(), bits, reduction="none")  # [N, T]
    return (bce * drawn).sum(-1) / drawn.sum(-1).clamp(min=1)


def chain_log_prob(
    z: torch.Tensor,
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    stop_logit: torch.Tensor,
    step_mask: torch.Tensor,
    max_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log pi(z | q) of recurrent chains that end by their own stop bits:
    sum over the real steps t and dimensions of log N(z_t; mu_t, sigma_t) + sum over the drawn stop
    bits of log Bernoulli(b_t; sigmoid(stop_logit_t)) (`stop_bits`).

    z, mu, log_sigma: [..., T, Dz]; stop_logit, step_mask: [..., T]. Returns (log pi [...], the number of
    random variables it sums over [...]: T_i * Dz Gaussian dimensions + the drawn stop bits).
    """
    real = step_mask.bool()
    per_dim = _gaussian_log_density(z, mu, log_sigma)  # [..., T, Dz]
    gaussian = _real_step_sum(per_dim, step_mask)
    bits, drawn = stop_bits(step_mask, max_steps)
    bernoulli = -F.binary_cross_entropy_with_logits(stop_logit.float(), bits, reduction="none")  # [..., T]
    log_prob = gaussian + (bernoulli * drawn).sum(-1)
    return log_prob, real.sum(-1) * z.shape[-1] + drawn.sum(-1)


def chain_kl(
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    stop_logit: torch.Tensor,
    ref_mu: torch.Tensor,
    ref_log_sigma: torch.Tensor,
    ref_stop_logit: torch.Tensor,
    step_mask: torch.Tensor,
    max_steps: int,
) -> torch.Tensor:
    """KL(pi || pi_ref) of the per-step distributions along sampled recurrent chains (the Gaussians of
    the real steps and the Bernoullis of the drawn stop bits), averaged over the same random variables
    as `chain_log_prob` counts. Gaussians [..., T, Dz], stop logits and step_mask [..., T] -> [...]."""
    real = step_mask.bool()
    per_dim = _gaussian_kl_per_dim(mu, log_sigma, ref_mu, ref_log_sigma)
    gaussian = _real_step_sum(per_dim, step_mask)
    p, log_p, log_not_p = torch.sigmoid(stop_logit), F.logsigmoid(stop_logit), F.logsigmoid(-stop_logit)
    bernoulli = p * (log_p - F.logsigmoid(ref_stop_logit)) + (1 - p) * (log_not_p - F.logsigmoid(-ref_stop_logit))
    _, drawn = stop_bits(step_mask, max_steps)
    count = real.sum(-1) * mu.shape[-1] + drawn.sum(-1)
    return (gaussian + (bernoulli * drawn).sum(-1)) / count.clamp(min=1)


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


def check_compression(ratio: int, key: str = "method.latent.compression") -> None:
    """A compression ratio is a whole number of chain tokens per latent, at least 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"{key}: a compression ratio is a whole number of tokens per latent >= 1, got {ratio!r}")


def compress_chain_embeddings(
    embeds: torch.Tensor, mask: torch.Tensor, ratio: int, norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain-distillation targets: each run of `ratio` consecutive token embeddings of a chain becomes
    their mean rescaled to L2 norm `norm` (a row's last run may be shorter); at ratio 1 the embeddings
    come back as they are, not rescaled, so the targets are the chain's own inputs.

    embeds: [N, L, D] right-padded chains; mask: [N, L]. Returns (targets [N, ceil(L / ratio), D],
    their mask [N, ceil(L / ratio)]); a padded target is 0.
    """
    check_compression(ratio)
    if ratio == 1:
        return embeds * mask[..., None].to(embeds.dtype), mask
    N, L, D = embeds.shape
    width = -(-L // ratio)
    pad = width * ratio - L
    runs = F.pad(embeds * mask[..., None].to(embeds.dtype), (0, 0, 0, pad)).reshape(N, width, ratio, D)
    counts = F.pad(mask, (0, pad)).reshape(N, width, ratio).sum(-1)  # [N, width] real tokens per run
    means = runs.sum(2) / counts.clamp(min=1)[..., None].to(embeds.dtype)
    rescaled = means / means.norm(dim=-1, keepdim=True).clamp(min=1e-12) * norm
    kept = counts > 0
    return rescaled * kept[..., None].to(embeds.dtype), kept.to(mask.dtype)


def group_chain_tokens(ids: torch.Tensor, mask: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gold tokens each latent stands for at compression `ratio`: ids, mask [N, L] right-padded ->
    [N, ceil(L / ratio), ratio] each (run j holds tokens j*ratio .. j*ratio + ratio - 1)."""
    check_compression(ratio)
    N, L = ids.shape
    width = -(-L // ratio)
    pad = width * ratio - L
    return F.pad(ids, (0, pad)).reshape(N, width, ratio), F.pad(mask, (0, pad)).reshape(N, width, ratio)


def soft_token_cross_entropy(logits: torch.Tensor, token_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Stage 1's distillation loss of a soft-token head: at each latent step, the cross-entropy of its
    distribution over the main's vocabulary to the gold tokens it stands for (uniform over the run's
    real tokens: one token at compression 1), averaged over the steps that stand for any token.

    logits: [N, T, V]; token_ids, token_mask: [N, T, c] (`group_chain_tokens`). Returns [N].
    """
    log_p = F.log_softmax(logits.float(), dim=-1).gather(-1, token_ids)  # [N, T, c]
    weights = token_mask.to(log_p.dtype)
    per_token = weights.sum(-1)  # [N, T]
    per_step = -(log_p * weights).sum(-1) / per_token.clamp(min=1)  # [N, T]
    steps = (per_token > 0).to(log_p.dtype)
    return (per_step * steps).sum(-1) / steps.sum(-1).clamp(min=1)


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
    num_dims: int | torch.Tensor = 1,
) -> torch.Tensor:
    """-mean A * log pi(z|q); with `old_logp` (ppo_epochs > 1) the clipped-ratio form.

    logp, old_logp, advantages: [B, K]; logp is log pi(z|q) averaged over the chain's `num_dims`
    random variables (T*Dz; for recurrent chains [B, K], each chain's own count, `chain_log_prob`).
    The PPO ratio is that of whole chains, exp(num_dims * (logp - old_logp)) =
    pi(z|q) / pi_old(z|q), so the clip bounds the policy ratio (a ratio of per-dimension means would
    be its num_dims-th root: no trust region at all at T*Dz = 32*512). The clipped surrogate is
    divided by num_dims, so at ratio 1 its gradient equals the plain form's. Returns a scalar.
    """
    if old_logp is None:
        return -(advantages * logp).mean()
    ratio = torch.exp(num_dims * (logp - old_logp))  # [B, K] pi(z|q) / pi_old(z|q)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    surrogate = torch.minimum(unclipped, clipped)  # [B, K]
    if isinstance(num_dims, torch.Tensor):  # each chain its own count
        return -(surrogate / num_dims).mean()
    return -surrogate.mean() / num_dims


# --- contrastive terms ---------------------------------------------------------------------------

CONTRASTIVE_KINDS = ("dispersion", "reward_infonce", "none")


def _zero_padded(chains: torch.Tensor, step_mask: torch.Tensor | None, steps: int) -> torch.Tensor:
    """[..., T, Dz] with the steps the mask drops set to 0, zero-padded to `steps` steps."""
    if step_mask is not None:
        chains = chains * step_mask[..., None].to(chains.dtype)
    return F.pad(chains, (0, 0, 0, steps - chains.shape[-2]))


def reparameterized(z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """The sampled chains z rewritten as mu + sigma * eps, eps = (z - mu) / sigma held fixed.

    Equal to z in value (up to rounding), but differentiable in mu and log_sigma: stage 2 treats the
    sampled z as detached actions (the policy gradient scores them, it does not move them), so a loss
    of the samples themselves, like the dispersion term, would otherwise give the policy no gradient.
    This is the pathwise gradient of z ~ N(mu, sigma^2): moving mu moves every sample with it, raising
    sigma spreads them along their own noise. In recurrent mode mu_t is re-scored on the fed-back
    chain, which is held fixed, so the gradient reaches each step's Gaussian, not earlier steps through
    the recurrence. z, mu, log_sigma: [..., T, Dz] -> [..., T, Dz].
    """
    sigma = torch.exp(log_sigma)
    eps = ((z.detach() - mu) / sigma).detach()
    return mu + sigma * eps


def chain_similarities(
    chains: torch.Tensor, step_mask: torch.Tensor | None, normalize: bool, tau: float
) -> torch.Tensor:
    """Similarities of the chains of each question to one another, on the flattened chains.

    chains: [B, K, T, Dz]; step_mask: [B, K, T] the real steps of recurrent chains (the others are set
    to 0, so a step one chain has and another lacks adds nothing to their dot product) or None.
    normalize=False: raw dot products s_kj = T^k . T^j (Eq. 8 as written); True: cos(T^k, T^j) / tau
    (SoftCoT++'s scaled cosine, which no growth of the norms can move). Returns [B, K, K] (float32).
    """
    flat = _zero_padded(chains.float(), step_mask, chains.shape[-2]).flatten(2)  # [B, K, T*Dz]
    if normalize:
        flat = F.normalize(flat, dim=-1)
        return flat @ flat.transpose(1, 2) / tau
    return flat @ flat.transpose(1, 2)


def dispersion_loss(similarities: torch.Tensor) -> torch.Tensor:
    r"""The paper's contrastive term, Eq. (8), one value per sampled chain.

    L_cl = -\sum_k E[ log( exp(s_kk) / \sum_j exp(s_kj) ) ]: each chain k of a question is its own
    positive, the question's other chains are its negatives (the denominator runs over all of them,
    itself included), and reward plays no part. Lowering it pushes a question's chains apart.
    similarities: [B, K, K] (`chain_similarities`). Returns the per-chain terms [B, K], each
    >= 0 and log K when the K chains coincide; Eq. (8) is their sum over k, averaged over questions.
    """
    return torch.logsumexp(similarities, dim=-1) - similarities.diagonal(dim1=-2, dim2=-1)


def reward_info_nce(
    anchors: torch.Tensor,
    latents: torch.Tensor,
    advantages: torch.Tensor,
    tau: float = 0.1,
    anchor_mask: torch.Tensor | None = None,
    latent_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    r"""Our reward-aware InfoNCE between question anchors and decoded latents (not the paper's Eq. 8).

    anchors: [B, T, Dz] (mu(q_b), gradients flow); latents: [B, K, T, Dz] (sampled actions, detached
    here); advantages: [B, K]. With s(u, v) = cos(flat u, flat v) / tau:
      forward, question -> latents: positives P_b are question b's latents with A > 0; the
        denominator runs over all B*K latents (its own with A <= 0 and every other question's):
        L_fwd = -mean_b log( sum_{p in P_b} e^{s(a_b,p)} / sum_x e^{s(a_b,x)} );
      backward, latents -> question: each positive picks its own anchor among the B anchors:
        L_bwd = -mean_p log( e^{s(p,a_b)} / sum_b' e^{s(p,a_b')} ).
    Recurrent chains of their own lengths: anchor_mask [B, Ta] and latent_mask [B, K, Tz] say which
    steps are real; the others are set to 0 and both are zero-padded to one length, so the cosine
    reads the real steps only (and steps one chain has and the other lacks count as disagreement).
    Returns ((L_fwd + L_bwd) / 2, number of questions skipped for having no positive). With no
    positive anywhere the loss is a zero that still belongs to the graph.
    """
    if anchor_mask is not None or latent_mask is not None:
        steps = max(anchors.shape[-2], latents.shape[-2])
        anchors, latents = _zero_padded(anchors, anchor_mask, steps), _zero_padded(latents, latent_mask, steps)
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
    """What the stage-2 objective L_pg + lambda_con L_con + beta KL - lambda_ent H is made of
    (docs/design.md §7); the values come from `method.rl` (configs/method/dlr.yaml)."""

    contrastive: str  # CONTRASTIVE_KINDS: dispersion (Eq. 8) | reward_infonce (ours) | none
    lambda_con: float  # its weight (the paper's gamma)
    normalize: bool  # dispersion: cos / tau instead of raw dot products
    tau: float  # cosine temperature (reward_infonce; dispersion with normalize)
    beta: float  # KL to the policy frozen after stage 1
    lambda_ent: float  # entropy bonus
    clip_eps: float  # ratio clip when old log-probs are given (ppo_epochs > 1)

    def __post_init__(self) -> None:
        if self.contrastive not in CONTRASTIVE_KINDS:
            raise ValueError(f"method.rl.contrastive must be one of {CONTRASTIVE_KINDS}, got {self.contrastive!r}")


@dataclass(frozen=True)
class RecurrentChains:
    """What chains that end by their own stop bits add to the stage-2 loss (latent.mode=recurrent)."""

    stop_logit: torch.Tensor  # [B, K, T] the policy's stop logit at each step of the decoded chains
    step_mask: torch.Tensor  # [B, K, T] their real steps
    anchor_mask: torch.Tensor | None  # [B, Ta] the real steps of the mean chains (the anchors of reward_infonce)
    max_steps: int  # latent.max_steps: no stop bit is drawn at the cap
    ref_stop_logit: torch.Tensor | None = None  # [B, K, T] the reference policy's, needed when beta > 0


def latent_rl_loss(
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    z: torch.Tensor,
    advantages: torch.Tensor,
    anchors: torch.Tensor | None,
    weights: LatentRLWeights,
    ref: tuple[torch.Tensor, torch.Tensor] | None = None,
    old_logp: torch.Tensor | None = None,
    chains: RecurrentChains | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The latent policy's stage-2 loss on the K decoded latents of each of B questions.

    mu, log_sigma: [B, K, T, Dz] the policy's Gaussian for each decoded latent (its mode's, or its
    step-wise one in recurrent mode); z: [B, K, T, Dz] the sampled actions; advantages: [B, K];
    anchors: [B, T, Dz] the question's mean chain, read by reward_infonce alone (None otherwise);
    ref: the frozen policy's (mu, log_sigma) in the same shapes, needed when beta > 0; old_logp:
    [B, K] for the clipped-ratio form.

    Fixed-length chains (chains=None): log pi, KL and entropy are means over the n = T*Dz dimensions.
    Recurrent chains: log pi is `chain_log_prob`'s exact sum (Gaussians of the real steps + the drawn
    stop bits) divided by its own number of random variables n_i, so the PG loss weighs every chain's
    variables alike whatever its length (the fixed-length form's per-dimension mean, with n_i in place
    of T*Dz), and the PPO ratio exp(n_i * (logp - old_logp)) stays the exact ratio of whole chains;
    the KL is `chain_kl` (stop bits included, so stage 2 keeps them near stage 1's); the entropy is
    the Gaussians' over the real steps (no bonus on the stop bits: it would reward random lengths);
    the contrastive terms compare the real steps only.

    The contrastive term (`weights.contrastive`):
      dispersion: Eq. (8) on the reparameterized samples (`reparameterized`), summed over the K
        chains of a question and averaged over questions, each chain's term divided by its n (T*Dz,
        or n_i): L_pg and KL are the paper's whole-chain quantities divided by n, so with this
        scale lambda_con weighs L_con against them exactly as gamma does in Eq. (6); the logged
        `contrastive` is Eq. (8) itself (in [0, K log K]);
      reward_infonce: `reward_info_nce` (ours), unscaled;
      none: 0.
    Returns (scalar loss, detached terms for logging: also `chain_sq_norm`, the mean squared norm of
    the flattened sampled chains, the self-similarity s_kk of raw Eq. (8), and for dispersion
    `contrastive_logit_gap`, the mean of s_kk - s_kj over j != k, which decides how saturated it is).
    """
    step_mask = None
    if chains is None:
        logp = gaussian_log_prob(z.detach(), mu, log_sigma)  # [B, K]
        num_dims: int | torch.Tensor = z.shape[-2] * z.shape[-1]
        chain_dims: int | torch.Tensor = num_dims  # n of every chain
    else:
        step_mask = chains.step_mask
        total, num_dims = chain_log_prob(z.detach(), mu, log_sigma, chains.stop_logit, step_mask, chains.max_steps)
        chain_dims = num_dims.clamp(min=1)  # [B, K] n_i of each chain
        logp = total / chain_dims  # [B, K]
    pg = latent_policy_loss(logp, advantages, old_logp, weights.clip_eps, num_dims=num_dims)
    extra: dict[str, torch.Tensor] = {}
    skipped = 0
    if weights.contrastive == "dispersion":
        sim = chain_similarities(reparameterized(z, mu, log_sigma), step_mask, weights.normalize, weights.tau)
        per_chain = dispersion_loss(sim)  # [B, K]
        con = per_chain.sum(1).mean()  # Eq. (8)
        con_scaled = (per_chain / chain_dims).sum(1).mean()  # Eq. (8) on the scale of L_pg and KL
        K = sim.shape[-1]
        if K > 1:
            off_diagonal = ~torch.eye(K, dtype=torch.bool, device=sim.device)
            gap = sim.diagonal(dim1=-2, dim2=-1)[..., None] - sim  # [B, K, K]: s_kk - s_kj
            extra["contrastive_logit_gap"] = gap[:, off_diagonal].mean()
    elif weights.contrastive == "reward_infonce":
        if anchors is None:
            raise ValueError("method.rl.contrastive=reward_infonce needs the questions' anchors")
        anchor_mask = None if chains is None else chains.anchor_mask
        con, skipped = reward_info_nce(anchors, z, advantages, weights.tau, anchor_mask, step_mask)
        con_scaled = con
    else:
        con = con_scaled = mu.new_zeros(())
    entropy = gaussian_entropy(log_sigma, step_mask).mean()
    loss = pg + weights.lambda_con * con_scaled - weights.lambda_ent * entropy
    kl = torch.zeros((), device=mu.device)
    if weights.beta > 0:
        if ref is None:
            raise ValueError("beta > 0 needs the reference policy's (mu, log_sigma)")
        if chains is None:
            kl = gaussian_kl(mu, log_sigma, ref[0].detach(), ref[1].detach()).mean()
        else:
            if chains.ref_stop_logit is None:
                raise ValueError("beta > 0 on recurrent chains needs the reference policy's stop logits")
            kl = chain_kl(
                mu,
                log_sigma,
                chains.stop_logit,
                ref[0].detach(),
                ref[1].detach(),
                chains.ref_stop_logit.detach(),
                step_mask,
                chains.max_steps,
            ).mean()
        loss = loss + weights.beta * kl
    real_z = _zero_padded(z.detach().float(), step_mask, z.shape[-2])
    chain_sq_norm = real_z.flatten(2).pow(2).sum(-1).mean()
    terms = {"pg": pg, "contrastive": con, "kl": kl, "entropy": entropy, "logp": logp, "chain_sq_norm": chain_sq_norm}
    terms = {k: v.detach() for k, v in {**terms, **extra}.items()}  # logp: [B, K]
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
