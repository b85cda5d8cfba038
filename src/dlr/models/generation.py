"""Batched text generation shared by evaluation and the token-space arm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from dlr.models.latent_policy import left_padded_positions


@torch.no_grad()
def greedy_complete(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
) -> list[str]:
    """Greedy completions of `prompts` (left-padded into one batch), without prompt or special tokens."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    was_training = model.training
    model.eval()
    try:  # the model's own generation config keeps all its end-of-turn ids (instruct models have several)
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            repetition_penalty=1.0,  # plain greedy for every arm, whatever the model's generation config says
        )
    finally:
        model.train(was_training)
    new_tokens = out[:, enc["input_ids"].shape[1] :]  # [B, <=max_new_tokens]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


@torch.no_grad()
def greedy_decode_embeds(
    main: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    min_new_tokens: int = 0,
) -> tuple[list[str], torch.Tensor]:
    """One greedy decode of the frozen main model from input embeddings.

    Returns the new texts and the generated ids [N, steps] (rows that ended early are padded).
    `min_new_tokens` forbids EOS before that many tokens (benchmarks time full-length attempts).
    """
    out = main.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=1.0,
    )  # [N, <= max_new_tokens]: with inputs_embeds only the new tokens come back
    return tokenizer.batch_decode(out, skip_special_tokens=True), out


def latent_target_nll(
    main: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """Mean NLL per row of the main model writing `target_ids` after left-padded `inputs_embeds`.

    inputs_embeds: [N, L, D]; attention_mask: [N, L]; target_ids, target_mask: [N, Lt], right-padded.
    Gradients flow into inputs_embeds (the frozen main model's weights get none). Positions count
    from each row's first real token, as in generation. Returns [N].
    """
    embeds = torch.cat([inputs_embeds, main.get_input_embeddings()(target_ids).to(inputs_embeds.dtype)], dim=1)
    mask = torch.cat([attention_mask, target_mask.to(attention_mask.dtype)], dim=1)  # [N, L + Lt]
    Lt = target_ids.shape[1]
    logits = main(
        inputs_embeds=embeds, attention_mask=mask, position_ids=left_padded_positions(mask), logits_to_keep=Lt + 1
    ).logits[:, :-1]  # [N, Lt, V]: the logits that predict each target token
    nll = F.cross_entropy(logits.float().transpose(1, 2), target_ids, reduction="none")  # [N, Lt]
    weights = target_mask.to(nll.dtype)
    return (nll * weights).sum(1) / weights.sum(1).clamp(min=1)


def completion_mask_after_eos(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 on generated tokens up to and including the first end-of-sequence token, 0 after it.

    completion_ids: [N, L] as `generate` returns them (rows that ended early are padded, possibly with
    an EOS id as pad). Returns [N, L] long.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [N, L]
    eos_before = is_eos.long().cumsum(1) - is_eos.long()  # EOS tokens strictly before each position
    return (eos_before == 0).long()


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the generation config's (instruct models have several) and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    cache: str = "static",
    min_new_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """K sampled completions per prompt, from the full distribution at `temperature` (no top-k/top-p).

    Returns (prompt_ids [N, Lp] left-padded, prompt_mask [N, Lp], completion_ids [N, Lc],
    completion_mask [N, Lc]) with N = len(prompts) * K, question-major; the completion mask covers the
    generated tokens up to and including the first EOS, so rewards and losses see exactly those.
    `min_new_tokens` forbids EOS before that many tokens (benchmarks time full-length attempts).
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids = enc.input_ids.repeat_interleave(num_samples, 0)
    prompt_mask = enc.attention_mask.repeat_interleave(num_samples, 0)
    eos = eos_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            repetition_penalty=1.0,  # sample exactly the distribution the loss scores
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            cache_implementation=cache if cache == "static" else None,
        )
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1] :]  # [N, <= max_new_tokens]
    return prompt_ids, prompt_mask, completion_ids, completion_mask_after_eos(completion_ids, eos)


def completion_log_probs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of the completions under `model` at the sampling temperature.

    prompt_ids, prompt_mask: [N, Lp] left-padded; completion_ids, completion_mask: [N, Lc].
    Returns (log-probs [N, Lc], entropies [N, Lc]); masked positions hold values to be ignored. The
    entropy carries gradients only with `entropy_grad` (an entropy bonus); otherwise it is a statistic.
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [N, Lp + Lc]
    Lc = completion_ids.shape[1]
    logits = (
        model(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask), logits_to_keep=Lc + 1)
        .logits[:, :-1]
        .float()
    )  # [N, Lc, V]: the logits that predict each completion token
    log_probs = (logits / temperature).log_softmax(-1)
    token_log_probs = log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # [N, Lc]
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # [N, Lc]
    return token_log_probs, entropy
