"""DLR building blocks: latent policy shapes and modes, projector norm, critic filter, latent inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dlr.methods.losses import chain_log_prob
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


def recurrent_policy(tiny_pair, tokenizer, max_steps: int, stop_bias: float) -> tuple[LatentPolicy, torch.nn.Module]:
    """A recurrent policy over the untrained tiny assistant (Dz=5, P(z) in an 8-wide space) whose stop
    head says sigmoid(stop_bias) at every step; and the projection it feeds back."""
    torch.manual_seed(0)
    assistant = AutoModelForCausalLM.from_pretrained(tiny_pair / "assistant")
    policy = LatentPolicy(
        assistant, tokenizer.convert_tokens_to_ids(LAT), 5, max_steps, mode="recurrent", feedback_dim=8
    )
    with torch.no_grad():
        policy.stop_head.weight.zero_()
        policy.stop_head.bias.fill_(stop_bias)
    return policy, torch.nn.Linear(5, 8)


def test_recurrent_teacher_forcing_reproduces_the_sampling_distribution(tiny_pair, tokenizer):
    """Chains of their own lengths, sampled step by step with finished chains leaving the batch, score
    the same in one teacher-forced pass over their fed-back P(z), steps and stop logits alike."""
    policy, project = recurrent_policy(tiny_pair, tokenizer, max_steps=6, stop_bias=-1.0)  # P(stop) = 0.27
    ids, mask = questions(tokenizer)
    with torch.no_grad():
        z, sampled = policy.sample_recurrent(ids, mask, 4, project, torch.Generator().manual_seed(1))
    lengths = sampled.step_mask.sum(-1)  # [2, 4]
    assert z.shape == (2, 4, lengths.max(), 5) and len(set(lengths.flatten().tolist())) > 1
    assert (sampled.step_mask == (torch.arange(z.shape[2]) < lengths[..., None])).all()  # a prefix of ones
    assert (z[~sampled.step_mask.bool()] == 0).all()  # nothing after a chain's end
    scored = policy(ids, mask, project(z).detach(), sampled.step_mask)  # one pass, with gradients
    real = sampled.step_mask.bool()
    torch.testing.assert_close(scored.mu[real], sampled.mu[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scored.log_sigma[real], sampled.log_sigma[real])
    torch.testing.assert_close(scored.stop_logit[real], sampled.stop_logit[real], atol=1e-5, rtol=1e-4)
    log_prob, count = chain_log_prob(z, scored.mu, scored.log_sigma, scored.stop_logit, scored.step_mask, 6)
    assert log_prob.requires_grad and (count == lengths * 5 + lengths.clamp(max=5)).all()


@pytest.mark.parametrize(("stop_bias", "length"), [(20.0, 1), (-20.0, 6)])
def test_the_stop_head_ends_a_chain_and_max_steps_caps_it(tiny_pair, tokenizer, stop_bias, length):
    policy, project = recurrent_policy(tiny_pair, tokenizer, max_steps=6, stop_bias=stop_bias)
    ids, mask = questions(tokenizer)
    chain = policy.mean_chain(ids, mask, project)  # greedy: stop where P(stop) > 1/2
    assert chain.mu.shape == (2, 1, length, 5) and chain.step_mask.sum().item() == 2 * length
    z, dist = policy.sample_recurrent(ids, mask, 3, project)
    assert (dist.step_mask.sum(-1) == length).all() and z.shape[2] == length


def test_a_recurrent_chain_is_the_same_alone_as_in_a_batch(tiny_pair, tokenizer):
    """The mean chain of a padded question in a batch whose other chain stops sooner (its cache rows
    dropped mid-rollout) equals the chain of the question alone."""
    policy, project = recurrent_policy(tiny_pair, tokenizer, max_steps=5, stop_bias=0.0)
    ids, mask = questions(tokenizer)
    with torch.no_grad():  # a stop head that says "stop" at question 1's first step, not at question 2's
        h = policy._question_pass(ids, mask, policy._placeholders(2, ids.device)[:, :1])[0][:, -1]  # [2, H]
        direction = (h[0] - h[1]) / (h[0] - h[1]).norm()
        policy.stop_head.weight.copy_(100 * direction[None])
        policy.stop_head.bias.fill_(-100 * float(direction @ (h[0] + h[1])) / 2)
    batch = policy.mean_chain(ids, mask, project)
    assert batch.step_mask.sum(-1).flatten().unique().numel() == 2, batch.step_mask  # one stopped first
    for row in range(2):
        first = (mask[row] == 1).nonzero()[0, 0]
        alone = policy.mean_chain(ids[row : row + 1, first:], mask[row : row + 1, first:], project)
        length = int(batch.step_mask[row].sum())
        assert alone.mu.shape[2] == length
        torch.testing.assert_close(alone.mu[0], batch.mu[row, :, :length], atol=1e-5, rtol=1e-4)


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


def test_chains_of_their_own_lengths_read_like_their_text_with_the_answer_cue_aligned(tiny_pair, tokenizer):
    """With a step mask, each row is `before P(z_1..z_Ti) after`, left-padded: what the main model
    writes equals what it writes after each chain as text (the answer readout, rows of 5 and 2 latents)."""
    main = AutoModelForCausalLM.from_pretrained(tiny_pair / "main").eval()
    fmt = PromptFormat(template="{question} answer :")
    readout = Readout("answer", fmt, 4)
    questions = ["ana has 7 pens .", "kai is a dax . true or false : kai is a dax ."]
    chains = ["gets 2 : 7 +", "true ."]
    ids = [tokenizer(c, add_special_tokens=False).input_ids for c in chains]
    projected = torch.zeros(2, 5, main.config.hidden_size)
    step_mask = torch.zeros(2, 5, dtype=torch.long)
    for row, chain in enumerate(ids):
        projected[row, : len(chain)] = main.get_input_embeddings()(torch.tensor(chain))
        projected[row, len(chain) :] = 99.0  # padding: must not be read
        step_mask[row, : len(chain)] = 1
    embeds, mask = latent_main_inputs(main, tokenizer, readout, questions, projected, step_mask)
    after = tokenizer("<eol> ####", add_special_tokens=False).input_ids
    torch.testing.assert_close(
        embeds[:, -len(after) :], main.get_input_embeddings()(torch.tensor(after)).expand(2, -1, -1)
    )
    assert (mask[:, -len(after) - 1 :] == 1).all() and mask.sum(1).tolist() != [mask.shape[1]] * 2
    from_latents, _ = greedy_decode_embeds(main, embeds, mask, tokenizer, max_new_tokens=4)
    texts = [f"<bos> {q} answer : <bol> {c} <eol> ####" for q, c in zip(questions, chains, strict=True)]
    assert from_latents == greedy_complete(main, tokenizer, texts, max_new_tokens=4)


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
    # recurrent chains: the mean latent reads their real steps only
    step_mask = torch.tensor([1, 1, 0]).expand(2, 5, 3)
    garbled = z.detach().clone()
    garbled[:, :, 2] = 1e3
    torch.testing.assert_close(critic(pooled, garbled, step_mask), critic(pooled, z[:, :, :2]))


@pytest.mark.parametrize("latent_dim", [64, 16])  # tiny_pair's assistant is H = 64 wide: full rank, then rank 16
def test_a_chain_started_as_text_reads_the_assistant_s_own_next_token_head(tiny_pair, tokenizer, latent_dim):
    """latent.init=assistant: the soft token's logits are the assistant's next-token logits W h (exactly
    at Dz >= H, their best rank-Dz approximation below), padding rows of the main's vocabulary are never
    chosen, and the input map takes each main token embedding to the assistant's own."""
    from dlr.models.latent_policy import start_as_text_chain

    assistant = AutoModelForCausalLM.from_pretrained(tiny_pair / "assistant")
    main_embeddings = torch.randn(len(tokenizer) + 3, 256)  # Dmain = 256, three padding rows past the vocabulary
    policy = LatentPolicy(assistant, 0, latent_dim, 6, mode="recurrent", feedback_dim=256)
    to_vocabulary = torch.nn.Linear(latent_dim, len(tokenizer) + 3)
    start_as_text_chain(policy, to_vocabulary, main_embeddings, len(tokenizer))
    W = assistant.get_output_embeddings().weight.detach()  # [V, H]
    h = torch.randn(5, W.shape[1])
    logits = to_vocabulary(policy.mu_head(h))  # [5, V + 3]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = min(latent_dim, W.shape[1])
    best = h @ (U[:, :k] * S[:k] @ Vh[:k]).T  # the rank-k truncation of W h
    torch.testing.assert_close(logits[:, : len(tokenizer)], best, atol=1e-4, rtol=1e-4)
    if k == W.shape[1]:
        torch.testing.assert_close(logits[:, : len(tokenizer)], h @ W.T, atol=1e-4, rtol=1e-4)
    assert (logits[:, len(tokenizer) :] == -30.0).all()
    fed = policy.latent_to_input(main_embeddings[: len(tokenizer)])  # V rows <= Dmain + 1 = 257 unknowns: exact
    torch.testing.assert_close(fed, assistant.get_input_embeddings().weight.detach(), atol=1e-4, rtol=1e-4)
