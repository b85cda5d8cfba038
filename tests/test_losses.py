"""Losses against hand-derived values and reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from dlr.methods.losses import (
    LatentRLWeights,
    RecurrentChains,
    aggregate_token_loss,
    chain_kl,
    chain_log_prob,
    chain_similarities,
    check_compression,
    clipped_surrogate,
    compress_chain_embeddings,
    dispersion_loss,
    gaussian_entropy,
    gaussian_kl,
    gaussian_log_prob,
    group_advantages,
    group_chain_tokens,
    k3_kl,
    latent_policy_loss,
    latent_pull_loss,
    latent_rl_loss,
    mode_separation_loss,
    reparameterized,
    reward_info_nce,
    soft_token_cross_entropy,
    stop_bits,
    stop_cross_entropy,
)

torch.manual_seed(0)


def test_gaussian_log_prob_and_entropy_match_torch_distributions():
    mu, log_sigma = torch.randn(3, 1, 4, 5), torch.randn(3, 1, 4, 5) * 0.3
    z = mu + torch.exp(log_sigma) * torch.randn(3, 6, 4, 5)  # [B=3, G=6, T=4, Dz=5]
    reference = Normal(mu, torch.exp(log_sigma))
    expected = reference.log_prob(z).mean(dim=(-2, -1))  # [3, 6]
    torch.testing.assert_close(gaussian_log_prob(z, mu, log_sigma), expected)
    torch.testing.assert_close(gaussian_entropy(log_sigma), reference.entropy().mean(dim=(-2, -1)))


def test_gaussian_kl_matches_closed_form_reference_and_monte_carlo():
    mu_p, ls_p = torch.randn(2, 3, 4), torch.randn(2, 3, 4) * 0.2
    mu_q, ls_q = torch.randn(2, 3, 4), torch.randn(2, 3, 4) * 0.2
    kl = gaussian_kl(mu_p, ls_p, mu_q, ls_q)  # [2]
    p, q = Normal(mu_p, ls_p.exp()), Normal(mu_q, ls_q.exp())
    torch.testing.assert_close(kl, kl_divergence(p, q).mean(dim=(-2, -1)))
    samples = p.sample((200_000,))  # Monte Carlo: E_p[log p - log q]
    monte_carlo = (p.log_prob(samples) - q.log_prob(samples)).mean(0).mean(dim=(-2, -1))
    torch.testing.assert_close(kl, monte_carlo, atol=0.02, rtol=0.02)
    assert gaussian_kl(mu_p, ls_p, mu_p, ls_p).abs().max() < 1e-6


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [1.2, 1.2]])
    adv, zero = group_advantages(rewards, "group")
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    torch.testing.assert_close(adv, torch.tensor([[0.5 / (s + 1e-4), -0.5 / (s + 1e-4)], [0.0, 0.0]]))
    assert zero.tolist() == [False, True]
    adv_none, _ = group_advantages(rewards, "none")
    torch.testing.assert_close(adv_none, torch.tensor([[0.5, -0.5], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, "global")


def test_latent_policy_loss_plain_and_clipped():
    logp = torch.tensor([[-1.0, -2.0]])
    adv = torch.tensor([[1.0, -1.0]])
    assert latent_policy_loss(logp, adv).item() == pytest.approx(-((-1.0) * 1 + (-2.0) * -1) / 2)
    old = logp - torch.tensor([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5
    # min(1.5*1, 1.2*1) = 1.2 ; min(0.5*-1, 0.8*-1) = -0.8  -> loss = -(1.2 - 0.8) / 2
    assert latent_policy_loss(logp, adv, old, clip_eps=0.2).item() == pytest.approx(-0.2)


def test_latent_ppo_ratio_is_the_whole_chains_not_a_per_dimension_mean():
    """T*Dz = 4 dimensions, per-dimension mean log-probs: logp - old = ln(1.1) / 4 for chain 1 and
    ln(0.5) / 4 for chain 2, so the chains' ratios are 1.1 and 0.5 (the per-dimension means' ratios
    would be 1.1^(1/4) = 1.024 and 0.5^(1/4) = 0.841, both inside the clip).
    A = (+1, -1), eps 0.2: chain 1 min(1.1, 1.1) = 1.1; chain 2 min(-0.5, -0.8) = -0.8.
    loss = -(1.1 - 0.8) / 2 / 4 = -0.0375; gradient on logp of chain 2 is 0 (clipped)."""
    old = torch.tensor([[-3.0, -3.0]])
    logp = (old + torch.tensor([[math.log(1.1), math.log(0.5)]]) / 4).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0]])
    loss = latent_policy_loss(logp, adv, old, clip_eps=0.2, num_dims=4)
    assert loss.item() == pytest.approx(-0.0375)
    loss.backward()
    # d/dlogp_1 of -(ratio_1 * 1) / 2 / 4 with ratio_1 = exp(4 (logp_1 - old_1)): -4 * 1.1 / 8 = -0.55
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.55, 0.0]]))
    # at ratio 1 the clipped form's gradient equals the plain form's: -A / (B*K)
    at_one = old.clone().requires_grad_(True)
    latent_policy_loss(at_one, adv, old, clip_eps=0.2, num_dims=4).backward()
    torch.testing.assert_close(at_one.grad, torch.tensor([[-0.5, 0.5]]))


def test_latent_pull_loss_by_hand():
    """Row 1: T=2 steps both kept, distances^2 4 and 0 -> mean 2, / norm^2 (2^2) = 0.5.
    Row 2: only step 1 kept, distance^2 1 + 1 = 2 -> 2 / 4 = 0.5; its masked step 2 (distance^2 100) is ignored."""
    projected = torch.tensor([[[2.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [10.0, 0.0]]])  # [N=2, T=2, D=2]
    targets = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    torch.testing.assert_close(latent_pull_loss(projected, targets, mask, norm=2.0), torch.tensor([0.5, 0.5]))
    assert latent_pull_loss(projected, targets, torch.zeros(2, 2), norm=2.0).tolist() == [0.0, 0.0]


def test_reward_info_nce_two_questions_by_hand():
    r"""B=2 questions, K=2 decoded latents each, T=1, Dz=2, tau=1.

    anchors a1=(1,0), a2=(0,1); latents z11=(2,0) A=+1, z12=(0,-1) A=-1, z21=(0,3) A=+1, z22=(1,1) A=-1.
    Cosines c = 1/sqrt(2):  s(a1, .) = [1, 0, 0, c],  s(a2, .) = [0, -1, 1, c].
    forward:  b1: -log(e^1 / (e^1 + e^0 + e^0 + e^c))      = log(e + 2 + e^c) - 1      = 0.90900
              b2: -log(e^1 / (e^0 + e^-1 + e^1 + e^c))     = log(1 + 1/e + e + e^c) - 1 = 0.81060
              L_fwd = (0.90900 + 0.81060) / 2 = 0.85980
    backward: z11 picks a1 among (a1, a2): -log(e^1 / (e^1 + e^0)) = log(1 + 1/e) = 0.31326;
              z21 picks a2 likewise: 0.31326;  L_bwd = 0.31326
    L_con = (0.85980 + 0.31326) / 2 = 0.58653
    """
    anchors = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], requires_grad=True)  # [2, 1, 2]
    latents = torch.tensor([[[[2.0, 0.0]], [[0.0, -1.0]]], [[[0.0, 3.0]], [[1.0, 1.0]]]])  # [2, 2, 1, 2]
    adv = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    loss, skipped = reward_info_nce(anchors, latents, adv, tau=1.0)
    e, c = math.e, 1 / math.sqrt(2)
    l_fwd = ((math.log(e + 2 + math.exp(c)) - 1) + (math.log(1 + 1 / e + e + math.exp(c)) - 1)) / 2
    l_bwd = math.log(1 + 1 / e)
    assert loss.item() == pytest.approx((l_fwd + l_bwd) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.58653, abs=1e-5) and skipped == 0

    loss.backward()  # gradients reach the anchors; a descent step keeps a1 specific to its question:
    a1 = anchors[0, 0].detach()
    a1_after = a1 - 0.1 * anchors.grad[0, 0]
    cos = torch.nn.functional.cosine_similarity
    z22 = torch.tensor([1.0, 1.0])  # the other question's latent a1 is most similar to
    assert cos(a1_after, z22, dim=0) < cos(a1, z22, dim=0)
    assert cos(a1_after, torch.tensor([2.0, 0.0]), dim=0) > 0.99  # and still on its positive z11


# G = 3 chains of T = 2 latents in Dz = 2, flattened: T1 = (1,0, 0,0), T2 = (0,1, 0,0), T3 = (1,1, 0,1).
THREE_CHAINS = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 1.0]]]])


def test_dispersion_raw_dot_products_by_hand():
    r"""Eq. (8) on THREE_CHAINS. Dot products T^k . T^j:
        [[1, 0, 1],
         [0, 1, 1],
         [1, 1, 3]]
    l_1 = log(e^1 + e^0 + e^1) - 1 = log(2e + 1) - 1 = 0.86199   (self 1 against 0 and 1)
    l_2 = log(e^0 + e^1 + e^1) - 1 = log(2e + 1) - 1 = 0.86199
    l_3 = log(e^1 + e^1 + e^3) - 3 = log(2e + e^3) - 3 = 0.23954
    Eq. (8) for this question: their sum, 1.96353.
    """
    sim = chain_similarities(THREE_CHAINS, None, normalize=False, tau=0.1)  # tau is not read raw
    torch.testing.assert_close(sim, torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 3.0]]]))
    e = math.e
    expected = [math.log(2 * e + 1) - 1, math.log(2 * e + 1) - 1, math.log(2 * e + e**3) - 3]
    per_chain = dispersion_loss(sim)  # [1, 3]
    torch.testing.assert_close(per_chain, torch.tensor([expected]))
    assert per_chain.sum().item() == pytest.approx(1.96353, abs=1e-5)


def test_dispersion_scaled_cosine_by_hand_and_what_growing_norms_do():
    r"""normalize=True, tau = 0.5 on THREE_CHAINS: |T1| = |T2| = 1, |T3| = sqrt 3, so with
    a = 1/sqrt(3): cosines [[1, 0, a], [0, 1, a], [a, a, 1]], logits = cosines / 0.5:
    l_1 = l_2 = log(e^2 + e^0 + e^{2a}) - 2,  l_3 = log(2 e^{2a} + e^2) - 2.
    Doubling every chain multiplies the raw dot products by 4, so raw Eq. (8) falls (1.96353 ->
    2 log(2 + e^-4) + log(1 + 2e^-8) = 1.40520) while the cosine form does not move.
    """
    a = 1 / math.sqrt(3)
    sim = chain_similarities(THREE_CHAINS, None, normalize=True, tau=0.5)
    torch.testing.assert_close(sim, torch.tensor([[[1.0, 0.0, a], [0.0, 1.0, a], [a, a, 1.0]]]) / 0.5)
    first = math.log(math.exp(2) + 1 + math.exp(2 * a)) - 2
    third = math.log(2 * math.exp(2 * a) + math.exp(2)) - 2
    torch.testing.assert_close(dispersion_loss(sim), torch.tensor([[first, first, third]]))

    raw_doubled = dispersion_loss(chain_similarities(2 * THREE_CHAINS, None, False, 0.5)).sum()
    # doubled: dot products [[4, 0, 4], [0, 4, 4], [4, 4, 12]]; l_1 = log(2e^4 + 1) - 4 = log(2 + e^-4),
    # l_3 = log(2e^4 + e^12) - 12 = log(1 + 2e^-8)
    assert raw_doubled.item() == pytest.approx(2 * math.log(2 + math.exp(-4)) + math.log(1 + 2 * math.exp(-8)))
    assert raw_doubled.item() == pytest.approx(1.40520, abs=1e-5)
    assert raw_doubled.item() < 1.96353
    cos_doubled = dispersion_loss(chain_similarities(2 * THREE_CHAINS, None, True, 0.5))
    torch.testing.assert_close(cos_doubled, dispersion_loss(sim))


def test_dispersion_of_coinciding_chains_is_log_k_each():
    same = torch.ones(2, 4, 3, 2)  # [B=2, K=4, T=3, Dz=2]: every chain the same
    for normalize in (False, True):
        per_chain = dispersion_loss(chain_similarities(same, None, normalize, 0.1))
        torch.testing.assert_close(per_chain, torch.full((2, 4), math.log(4)))


def test_masked_dispersion_reads_only_real_steps():
    """Recurrent THREE_CHAINS of 1, 1 and 2 real steps (of T = 3) with garbage after their ends give
    the hand values of the unmasked chains above (the steps they lack are zero)."""
    chains = torch.cat([THREE_CHAINS, torch.full((1, 3, 1, 2), 50.0)], dim=2)  # [1, 3, T=3, 2]
    chains[0, 0, 1] = chains[0, 1, 1] = torch.tensor([7.0, -7.0])  # after the one-step chains' end
    step_mask = torch.tensor([[[1, 0, 0], [1, 0, 0], [1, 1, 0]]])
    sim = chain_similarities(chains, step_mask, normalize=False, tau=1.0)
    torch.testing.assert_close(sim, torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 3.0]]]))
    assert dispersion_loss(sim).sum().item() == pytest.approx(1.96353, abs=1e-5)


def test_reparameterized_samples_equal_z_and_carry_the_pathwise_gradient():
    """z_r = mu + sigma * eps with eps = (z - mu) / sigma fixed: dz_r/dmu = 1, dz_r/dlog_sigma = sigma * eps = z - mu."""
    mu = torch.tensor([[0.5, -1.0]], requires_grad=True)
    log_sigma = torch.tensor([[math.log(2.0), math.log(0.5)]], requires_grad=True)
    z = torch.tensor([[1.5, -2.0]])  # eps = (0.5, -2)
    z_r = reparameterized(z, mu, log_sigma)
    torch.testing.assert_close(z_r, z)
    z_r.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones(1, 2))
    torch.testing.assert_close(log_sigma.grad, z - mu.detach())


def test_dispersion_in_the_stage2_loss_is_scaled_by_n_and_spreads_the_samples():
    """loss = L_pg + lambda_con * mean_b sum_k l_bk / (T*Dz) + beta KL - lambda_ent H, with l from the
    reparameterized samples; the logged `contrastive` is Eq. (8) itself. With every advantage 0 the
    dispersion term alone moves the policy, and a descent step on log sigma spreads the samples
    (near-uniform softmax: d L / d sigma^2 = sum_k (mean_j e_k.e_j - |e_k|^2) <= 0 by Cauchy-Schwarz)."""
    torch.manual_seed(3)
    B, K, T, Dz = 2, 4, 2, 3
    mu = torch.zeros(B, 1, T, Dz).expand(B, K, T, Dz).clone().requires_grad_(True)
    log_sigma = torch.full((B, K, T, Dz), math.log(0.1), requires_grad=True)
    z = 0.1 * torch.randn(B, K, T, Dz)
    zero_adv = torch.zeros(B, K)
    weights = LatentRLWeights("dispersion", 0.1, False, 0.1, 0.0, 0.0, 0.2)
    loss, terms = latent_rl_loss(mu, log_sigma, z, zero_adv, None, weights)
    per_chain = dispersion_loss(chain_similarities(z, None, False, 0.1))
    torch.testing.assert_close(terms["contrastive"], per_chain.sum(1).mean())
    torch.testing.assert_close(loss, 0.1 * per_chain.sum(1).mean() / (T * Dz))
    torch.testing.assert_close(terms["chain_sq_norm"], z.flatten(2).pow(2).sum(-1).mean())
    loss.backward()
    assert log_sigma.grad.sum() < 0  # descent raises sigma
    none = LatentRLWeights("none", 0.1, False, 0.1, 0.0, 0.0, 0.2)
    assert latent_rl_loss(mu, log_sigma, z, zero_adv, None, none)[0].item() == 0.0
    with pytest.raises(ValueError, match="anchors"):
        latent_rl_loss(mu, log_sigma, z, zero_adv, None, LatentRLWeights("reward_infonce", 0.1, False, 0.1, 0, 0, 0.2))
    with pytest.raises(ValueError, match="method.rl.contrastive"):
        LatentRLWeights("bidirectional", 0.1, False, 0.1, 0.0, 0.0, 0.2)


def test_recurrent_dispersion_divides_each_chain_by_its_own_n():
    """Chains of 1 and 2 real steps (Dz = 2, max_steps = 2): n = 2 dims + 1 stop bit, and 4 dims + 1 stop
    bit (at step 1; none at the cap); loss = lambda_con * mean_b sum_k l_k / n_k (no PG: A = 0)."""
    mu = torch.zeros(1, 2, 2, 2, requires_grad=True)
    log_sigma = torch.zeros(1, 2, 2, 2, requires_grad=True)
    z = torch.tensor([[[[1.0, 0.0], [9.0, 9.0]], [[1.0, 1.0], [0.0, 1.0]]]])  # [1, K=2, T=2, 2]
    step_mask = torch.tensor([[[1, 0], [1, 1]]])
    chains = RecurrentChains(torch.zeros(1, 2, 2), step_mask, None, 2)
    weights = LatentRLWeights("dispersion", 0.5, False, 0.1, 0.0, 0.0, 0.2)
    loss, terms = latent_rl_loss(mu, log_sigma, z, torch.zeros(1, 2), None, weights, chains=chains)
    # dot products of (1,0,0,0) and (1,1,0,1): [[1, 1], [1, 3]]; l_1 = log(e + e) - 1 = log 2,
    # l_2 = log(e + e^3) - 3 = log(1 + e^-2)
    l1, l2 = math.log(2), math.log(1 + math.exp(-2))
    assert terms["contrastive"].item() == pytest.approx(l1 + l2, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * (l1 / 3 + l2 / 5), abs=1e-6)
    assert terms["contrastive_logit_gap"].item() == pytest.approx(((1 - 1) + (3 - 1)) / 2)


def test_info_nce_skips_questions_without_positives():
    anchors = torch.randn(3, 2, 4, requires_grad=True)
    latents = torch.randn(3, 5, 2, 4)
    adv = torch.tensor([[1.0, 0, 0, 0, 0], [0.0] * 5, [-1.0] * 5])
    loss, skipped = reward_info_nce(anchors, latents, adv)
    assert skipped == 2 and torch.isfinite(loss)
    zero, all_skipped = reward_info_nce(anchors, latents, torch.zeros(3, 5))
    assert all_skipped == 3 and zero.item() == 0.0 and zero.requires_grad


def test_mode_separation_prefers_distinct_modes():
    same = torch.ones(1, 3, 2, 2)
    apart = torch.eye(4)[:3].reshape(1, 3, 2, 2)
    assert mode_separation_loss(apart) < mode_separation_loss(same)
    assert mode_separation_loss(same).item() == pytest.approx(math.log(3), abs=1e-5)


def two_by_two():
    """Ratios [[1.0, 1.5], [0.5, 1.0]], advantages [+1, -1], second sequence one token long."""
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.0, 1.5], [0.5, 1.0]]))
    return logp, old, torch.tensor([1.0, -1.0]), torch.tensor([[1, 1], [1, 0]])


def test_clipped_surrogate_by_hand():
    logp, old, adv, _ = two_by_two()
    per_token, low, high = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # seq 1 (A=+1): -min(1.0, 1.0) = -1 ; -min(1.5, 1.28) = -1.28
    # seq 2 (A=-1): -min(-0.5, -0.8) = 0.8 ; -min(-1.0, -1.0) = 1.0
    torch.testing.assert_close(per_token, torch.tensor([[-1.0, -1.28], [0.8, 1.0]]))
    assert high.tolist() == [[False, True], [False, False]] and low.tolist() == [[False, False], [True, False]]


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", ((-1.0 - 1.28) / 2 + 0.8) / 2),  # per-sequence token mean, then mean: -0.17
        ("bnpo", (-1.0 - 1.28 + 0.8) / 3),  # token mean over the batch: -0.4933
        ("dapo", (-1.0 - 1.28 + 0.8) / 3),
        ("dr_grpo", (-1.0 - 1.28 + 0.8) / (2 * 4)),  # sum / (B * max_completion_length=4): -0.185
    ],
)
def test_loss_type_aggregation_by_hand(loss_type, expected):
    logp, old, adv, mask = two_by_two()
    per_token, _, _ = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    assert aggregate_token_loss(per_token, mask, loss_type, max_completion_length=4).item() == pytest.approx(expected)


def test_k3_kl_formula():
    logp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    # delta = log(0.25 / 0.5) ; exp(delta) - delta - 1 = 0.5 + log 2 - 1
    assert k3_kl(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert k3_kl(ref, ref).item() == 0.0


# --- recurrent chains and chain distillation ------------------------------------------------------


def test_stop_bits_by_hand():
    """Chains of 3, 4 (the cap) and 1 steps at max_steps=4: the bit is 1 at the last step, and drawn
    at every real step but the 4th, where the cap ends the chain."""
    step_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    bits, drawn = stop_bits(step_mask, max_steps=4)
    assert bits.tolist() == [[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    assert drawn.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


def test_stop_cross_entropy_by_hand():
    """Row 1: 2 steps, logits (0, ln 3): bits (0, 1): (ln 2 + -ln(3/4)) / 2.
    Row 2: the cap (max_steps=2) ends it at step 2, so only step 1 (bit 0, logit ln 3) counts: ln 4.
    Its padding (logit 50) is never read."""
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 50.0]])
    loss = stop_cross_entropy(logits[:1], torch.tensor([[1, 1]]), max_steps=4)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    capped = stop_cross_entropy(logits[1:], torch.tensor([[1, 1]]), max_steps=2)
    assert capped.item() == pytest.approx(math.log(4))


def test_chain_log_prob_by_hand_and_against_torch_distributions():
    """One chain of 1 step (Dz=1): z=1, mu=0, sigma=1 -> -1/2 - ln(2 pi)/2; its stop bit 1 at logit 0
    -> -ln 2; the padded step 2 (mu 5, stop logit 9) is not read. 1 + 1 random variables."""
    z = torch.tensor([[[1.0], [0.0]]])  # [1, T=2, Dz=1]
    mu, log_sigma = torch.tensor([[[0.0], [5.0]]]), torch.zeros(1, 2, 1)
    log_prob, count = chain_log_prob(z, mu, log_sigma, torch.tensor([[0.0, 9.0]]), torch.tensor([[1, 0]]), 3)
    assert log_prob.item() == pytest.approx(-0.5 - 0.5 * math.log(2 * math.pi) - math.log(2))
    assert count.item() == 2

    mu, log_sigma = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5) * 0.3
    z = mu + log_sigma.exp() * torch.randn(2, 3, 4, 5)  # [B=2, K=3, T=4, Dz=5]
    stop_logit = torch.randn(2, 3, 4)
    lengths = torch.tensor([[1, 2, 4], [3, 4, 2]])
    step_mask = (torch.arange(4) < lengths[..., None]).long()
    log_prob, count = chain_log_prob(z, mu, log_sigma, stop_logit, step_mask, max_steps=4)
    for b in range(2):
        for k in range(3):
            n = int(lengths[b, k])
            expected = Normal(mu[b, k, :n], log_sigma[b, k, :n].exp()).log_prob(z[b, k, :n]).sum()
            drawn = min(n, 3)  # no bit at the 4th step
            bits = torch.zeros(drawn)
            if n < 4:
                bits[-1] = 1.0
            expected += Bernoulli(logits=stop_logit[b, k, :drawn]).log_prob(bits).sum()
            torch.testing.assert_close(log_prob[b, k], expected)
            assert count[b, k] == n * 5 + drawn


def test_chain_kl_by_hand_and_zero_against_itself():
    """1 step, Dz=1, mu 0 vs 1, sigma 1: Gaussian KL 1/2; at max_steps=1 no stop bit -> 1/2 over 1 variable.
    At max_steps=3 its stop bit counts too: logits 0 vs ln 3, KL(Bern(1/2) || Bern(3/4)) = ln 2 - ln(sqrt 3)
    ... over 2 variables."""
    mu, ref_mu, log_sigma = torch.zeros(1, 1, 1), torch.ones(1, 1, 1), torch.zeros(1, 1, 1)
    stop, ref_stop, step_mask = torch.zeros(1, 1), torch.full((1, 1), math.log(3)), torch.ones(1, 1)
    assert chain_kl(mu, log_sigma, stop, ref_mu, log_sigma, ref_stop, step_mask, 1).item() == pytest.approx(0.5)
    bernoulli = kl_divergence(Bernoulli(probs=torch.tensor(0.5)), Bernoulli(probs=torch.tensor(0.75))).item()
    assert bernoulli == pytest.approx(math.log(2) - 0.5 * math.log(3))
    both = chain_kl(mu, log_sigma, stop, ref_mu, log_sigma, ref_stop, step_mask, 3)
    assert both.item() == pytest.approx((0.5 + bernoulli) / 2)
    mu, log_sigma, stop = torch.randn(2, 4, 3), torch.randn(2, 4, 3) * 0.2, torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert chain_kl(mu, log_sigma, stop, mu, log_sigma, stop, mask, 4).abs().max() < 1e-6


def test_masked_entropy_reads_only_real_steps():
    """Steps 1 with log sigma 0, step 2 (padding) with log sigma 7: the entropy is that of step 1."""
    log_sigma = torch.tensor([[[0.0, 0.0], [7.0, 7.0]]])
    entropy = gaussian_entropy(log_sigma, torch.tensor([[1, 0]]))
    assert entropy.item() == pytest.approx(0.5 * (1 + math.log(2 * math.pi)))
    torch.testing.assert_close(gaussian_entropy(log_sigma, torch.ones(1, 2)), gaussian_entropy(log_sigma))


def test_compress_chain_embeddings_by_hand_with_padding():
    """Row 1: 3 tokens (2,0), (0,2), (4,4) at c=2: means (1,1) and (4,4), rescaled to norm 3.
    Row 2: 1 token (0,5): its mean (0,5) at norm 3; its second run is padding (0, mask 0).
    c=1: the embeddings as they are (padding zeroed)."""
    embeds = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [4.0, 4.0]], [[0.0, 5.0], [9.0, 9.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    targets, target_mask = compress_chain_embeddings(embeds, mask, 2, norm=3.0)
    r = 3 / math.sqrt(2)
    torch.testing.assert_close(targets, torch.tensor([[[r, r], [r, r]], [[0.0, 3.0], [0.0, 0.0]]]))
    assert target_mask.tolist() == [[1, 1], [1, 0]]
    same, same_mask = compress_chain_embeddings(embeds, mask, 1, norm=3.0)
    torch.testing.assert_close(same, embeds * mask[..., None])
    assert torch.equal(same_mask, mask)
    ids, ids_mask = group_chain_tokens(torch.tensor([[5, 6, 7], [8, 0, 0]]), mask, 2)
    assert ids.tolist() == [[[5, 6], [7, 0]], [[8, 0], [0, 0]]]
    assert ids_mask.tolist() == [[[1, 1], [1, 0]], [[1, 0], [0, 0]]]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="method.latent.compression"):
            check_compression(bad)


def test_soft_token_cross_entropy_by_hand():
    """V=2. c=1: step 1 logits (0, 0), gold token 0 -> ln 2; step 2 logits (ln 3, 0), gold 1 -> ln 4;
    step 3 is padding. Mean (ln 2 + ln 4) / 2. c=2: one step, logits (ln 3, 0), gold tokens 0 and 1:
    -(ln 3/4 + ln 1/4) / 2."""
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [50.0, 0.0]]])  # [1, T=3, V=2]
    ids, mask = torch.tensor([[[0], [1], [1]]]), torch.tensor([[[1], [1], [0]]])
    loss = soft_token_cross_entropy(logits, ids, mask)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    pair = soft_token_cross_entropy(logits[:, 1:2], torch.tensor([[[0, 1]]]), torch.tensor([[[1, 1]]]))
    assert pair.item() == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2)


def test_latent_ppo_ratio_of_chains_of_their_own_lengths():
    """Chains of n = 4 and 2 random variables, per-variable mean log-probs moved by ln(1.1)/4 and
    ln(0.5)/2: ratios 1.1 and 0.5, A = (+1, -1), eps 0.2: -(1.1 / 4 - 0.8 / 2) / 2 = 0.0625."""
    old = torch.tensor([[-3.0, -3.0]])
    num_dims = torch.tensor([[4.0, 2.0]])
    logp = old + torch.tensor([[math.log(1.1), math.log(0.5)]]) / num_dims
    loss = latent_policy_loss(logp, torch.tensor([[1.0, -1.0]]), old, clip_eps=0.2, num_dims=num_dims)
    assert loss.item() == pytest.approx(-(1.1 / 4 - 0.8 / 2) / 2)


def test_masked_info_nce_reads_only_real_steps():
    """Garbage after each chain's end changes nothing; chains of equal length give the unmasked loss."""
    anchors, latents = torch.randn(2, 3, 4), torch.randn(2, 3, 3, 4)
    adv = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]])
    latent_mask = torch.tensor([[[1, 1, 0], [1, 0, 0], [1, 1, 1]], [[1, 1, 1], [1, 1, 0], [1, 0, 0]]])
    anchor_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, _ = reward_info_nce(anchors, latents, adv, 0.1, anchor_mask, latent_mask)
    noisy_a = anchors + 100 * (1 - anchor_mask)[..., None]
    noisy_l = latents + 100 * (1 - latent_mask)[..., None]
    torch.testing.assert_close(reward_info_nce(noisy_a, noisy_l, adv, 0.1, anchor_mask, latent_mask)[0], loss)
    full_a, full_l = torch.ones(2, 3), torch.ones(2, 3, 3)
    torch.testing.assert_close(
        reward_info_nce(anchors, latents, adv, 0.1, full_a, full_l)[0],
        reward_info_nce(anchors, latents, adv, 0.1)[0],
    )
    # an anchor shorter than the chains is zero-padded to their length
    two_steps = torch.tensor([[1, 1, 0], [1, 1, 0]])
    short, _ = reward_info_nce(anchors[:, :2], latents, adv, 0.1, two_steps[:, :2], latent_mask)
    padded, _ = reward_info_nce(anchors, latents, adv, 0.1, two_steps, latent_mask)
    torch.testing.assert_close(short, padded)


def test_recurrent_latent_rl_loss_is_the_weighted_sum_of_its_masked_terms():
    torch.manual_seed(1)
    B, K, T, Dz = 2, 3, 4, 2
    mu = torch.randn(B, K, T, Dz, requires_grad=True)
    log_sigma = torch.full((B, K, T, Dz), -0.5, requires_grad=True)
    stop = torch.randn(B, K, T, requires_grad=True)
    z = mu.detach() + 0.6 * torch.randn(B, K, T, Dz)
    step_mask = (torch.arange(T) < torch.tensor([[1, 3, 4], [2, 2, 4]])[..., None]).long()
    anchors, anchor_mask = torch.randn(B, T, Dz, requires_grad=True), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv = torch.tensor([[1.0, -0.5, -0.5], [0.3, 0.3, -0.6]])
    ref = (mu.detach() + 0.1, log_sigma.detach() - 0.2)
    ref_stop = stop.detach() + 0.5
    chains = RecurrentChains(stop, step_mask, anchor_mask, 4, ref_stop)
    weights = LatentRLWeights(
        "reward_infonce", lambda_con=0.3, normalize=False, tau=0.1, beta=0.05, lambda_ent=0.01, clip_eps=0.2
    )
    loss, terms = latent_rl_loss(mu, log_sigma, z, adv, anchors, weights, ref, None, chains)
    total, count = chain_log_prob(z, mu, log_sigma, stop, step_mask, 4)
    pg = -(adv * total / count).mean()
    con, _ = reward_info_nce(anchors, z, adv, 0.1, anchor_mask, step_mask)
    kl = chain_kl(mu, log_sigma, stop, *ref, ref_stop, step_mask, 4).mean()
    entropy = gaussian_entropy(log_sigma, step_mask).mean()
    torch.testing.assert_close(loss, pg + 0.3 * con + 0.05 * kl - 0.01 * entropy)
    loss.backward()
    assert stop.grad.abs().sum() > 0  # the stop bits are part of log pi
    assert (mu.grad[~step_mask.bool()] == 0).all()  # nothing after a chain's end is learnt
    with pytest.raises(ValueError, match="stop logits"):
        latent_rl_loss(
            mu, log_sigma, z, adv, anchors, weights, ref, None, RecurrentChains(stop, step_mask, anchor_mask, 4)
        )
