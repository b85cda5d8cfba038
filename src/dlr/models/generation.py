"""Batched text generation shared by evaluation and the token-space arm."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


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
    out = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    new_tokens = out[:, enc["input_ids"].shape[1] :]  # [B, <=max_new_tokens]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
