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
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    new_tokens = out[:, enc["input_ids"].shape[1] :]  # [B, <=max_new_tokens]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def latent_main_inputs(
    main: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    projected: torch.Tensor,
    bol: str,
    eol: str,
    answer_cue: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The main model's input for single-pass decoding: `prompt <bol> P(z_1)..P(z_T) <eol> cue`
    (an empty cue lets the main model write a rationale before its own answer line).

    prompts: N prompt texts (already in the main model's own format, chat template included);
    projected: [N, T, Dmain] latents already in the main model's embedding space.
    Returns left-padded (inputs_embeds [N, L, Dmain], attention_mask [N, L]).
    """
    device = projected.device
    embed = main.get_input_embeddings()
    prefix = tokenizer([f"{p}{bol}" for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    suffix_ids = tokenizer(f"{eol} {answer_cue}", return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    N, T = projected.shape[:2]
    suffix = embed(suffix_ids).expand(N, -1, -1)  # [N, Ls, D]
    embeds = torch.cat([embed(prefix.input_ids), projected.to(suffix.dtype), suffix], dim=1)  # [N, Lp + T + Ls, D]
    mask = torch.cat([prefix.attention_mask, prefix.attention_mask.new_ones(N, T + suffix_ids.shape[1])], dim=1)
    return embeds, mask


@torch.no_grad()
def greedy_decode_embeds(
    main: torch.nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
) -> list[str]:
    """One greedy decode of the frozen main model from input embeddings; returns the new text."""
    out = main.generate(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, do_sample=False,
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
    )  # [N, <= max_new_tokens]: with inputs_embeds only the new tokens come back
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def latent_target_nll(
    main: torch.nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
    target_ids: torch.Tensor, target_mask: torch.Tensor,
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
