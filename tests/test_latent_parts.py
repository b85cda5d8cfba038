"""DLR building blocks: latent policy shapes and modes, projector norm, critic filter, latent inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dlr.methods.losses import gaussian_log_prob
from dlr.models.backbones import PromptFormat
from dlr.models.critic import RewardCritic, select_latents
from dlr.models.generation import greedy_complete, greedy_decode_embeds
from dlr.models.latent_policy import LatentPolicy
from dlr.models.projector import LatentProjector, mean_embedding_norm
from dlr.models.readout import Readout, latent_main_inputs
from dlr.models.tiny import LAT, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def questions(tokenizer):
    enc = tokenizer(
        ["<bos> ana has 7 pens .", "<bos> kai is a dax . every dax is a wug ."],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("num_modes", [1, 3])
def test_parallel_policy_shapes_and_left_padding(tiny_pair, tokenizer, num_modes):
    assistant = AutoModelForCausalLM.from_pretrained(tiny_pair / "assistant")
    policy = LatentPolicy(
        assistant, tokenizer.convert_tokens_to_ids(LAT), latent_dim=6, num_steps=4, num_modes=num_modes
    )
    ids, mask = questions(tokenizer)
    dist = policy(ids, mask)
    assert dist.mu.shape == (2, num_modes, 4, 6) and dist.log_sigma.shape == (2, num_modes, 4, 6)
    assert dist.pooled.shape == (2, assistant.config.hidden_size)
    assert torch.allclose(dist.log_sigma, torch.full_like(dist.log_sigma, -1.0))  # sigma starts uniform
    z, modes = policy.sample(dist, 6, torch.Generator().manual_seed(0))
    assert z.shape == (2, 6, 4, 6) and not z.requires_grad and modes.tolist() == [m % num_modes for m in range(6)]
    # The padded question gives the same latents as the same question alone: padding is invisible.
    alone = policy(ids[1:, (mask[1] == 1).nonzero()[0, 0] :], mask[1:, (mask[1] == 1).nonzero()[0, 0] :])
    torch.testing.assert_close(alone.mu[0], dist.mu[1], atol=1e-5, rtol=1e-4)


def test_recurrent_teacher_forcing_reproduces_the_sampling_distribution(tiny_pair, tokenizer):
    assistant = AutoModelForCausalLM.from_pretrained(tiny_pair / "assistant")
    policy = LatentPolicy(assistant, tokenizer.convert_tokens_to_ids(LAT), latent_dim=5, num_steps=3, mode="recurrent")
    ids, mask = questions(tokenizer)
    z, sampled = policy.sample_recurrent(ids, mask, num_samples=4, generator=torch.Generator().manual_seed(1))
    assert z.shape == (2, 4, 3, 5)
    scored = policy(ids, mask, z)  # one teacher-forced pass, with gradients
    torch.testing.assert_close(scored.mu, sampled.mu, atol=1e-5, rtol=1e-4)
    assert gaussian_log_prob(z, scored.mu, scored.log_sigma).requires_grad


def test_projector_outputs_sit_at_the_mean_embedding_norm(tiny_pair):
    main = AutoModelForCausalLM.from_pretrained(tiny_pair / "main")
    target = mean_embedding_norm(main)
    projector = LatentProjector(latent_dim=6, main_dim=main.config.hidden_size, target_norm=target)
    out = projector(torch.randn(3, 4, 6) * 10)
    assert out.shape == (3, 4, main.config.hidden_size)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((3, 4), target), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("readout", ["rationale", "answer"])
def test_latent_inputs_equal_token_inputs_when_latents_are_token_embeddings(tiny_pair, tokenizer, readout):
    """If P(z) were exactly the embeddings of a text, the main model must see that text, in the
    place each readout puts the span."""
    main = AutoModelForCausalLM.from_pretrained(tiny_pair / "main").eval()
    fmt = PromptFormat(template="{question} answer :")
    questions = ["ana has 7 pens .", "kai is a dax . true or false : kai is a dax ."]
    span = tokenizer(
        ["gets 2 : 7 + 2 =", "every dax is a wug . ."], add_special_tokens=False, return_tensors="pt"
    ).input_ids
    projected = main.get_input_embeddings()(span)  # [2, T, D]
    embeds, mask = latent_main_inputs(main, tokenizer, Readout(readout, fmt, 5), questions, projected)
    from_latents, ids = greedy_decode_embeds(main, embeds, mask, tokenizer, max_new_tokens=5)
    tail = "" if readout == "rationale" else " <eol> ####"
    texts = [f"<bos> {q} answer : <bol> {tokenizer.decode(s)}{tail}" for q, s in zip(questions, span, strict=True)]
    assert from_latents == greedy_complete(main, tokenizer, texts, max_new_tokens=5) and 1 <= ids.shape[1] <= 5


def test_critic_filter_keeps_top_predictions_plus_random_exploration():
    predicted = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.0, 0.2]])
    kept = select_latents(predicted, keep=3, explore=1, method="critic", generator=torch.Generator().manual_seed(0))
    assert kept[0, :2].tolist() == [1, 3] and kept[0, 2].item() not in (1, 3)
    assert sorted(select_latents(predicted, 6, 0, "none")[0].tolist()) == list(range(6))
    random_pick = select_latents(predicted, 4, 0, "random", torch.Generator().manual_seed(0))
    assert len(set(random_pick[0].tolist())) == 4
    with pytest.raises(ValueError, match="K"):
        select_latents(predicted, 7, 0, "critic")
    with pytest.raises(ValueError, match="K = G"):
        select_latents(predicted, 3, 0, "none")


def test_critic_reads_detached_inputs():
    critic = RewardCritic(question_dim=8, latent_dim=4, hidden=16)
    pooled, z = torch.randn(2, 8, requires_grad=True), torch.randn(2, 5, 3, 4, requires_grad=True)
    critic(pooled, z).sum().backward()
    assert pooled.grad is None and z.grad is None
    assert critic(pooled, z).shape == (2, 5)
