"""The forgetting check's held-out NLL: the gold completion as the main writes it, and a memory bound that
does not grow with the vocabulary times the batch (issue 34 items 2 and 6)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import compose_config
from dlr.data.synthetic_math import generate
from dlr.methods.warmstart_module import encode_sft_batch
from dlr.models.backbones import PromptFormat, load_tokenizer
from dlr.runner.compare import heldout_nll, nll_pieces


def tiny_main(tiny_pair):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pair / "main").eval()
    return model, load_tokenizer(str(tiny_pair / "main"))


def records(count: int):
    rng = random.Random(0)
    return [generate(rng, depth=1 + i % 8, index=i, id_prefix="nll") for i in range(count)]


def reference_nll(model, tokenizer, fmt: PromptFormat, recs) -> float:
    """Mean NLL per completion token from the model's own loss over full logits, one record at a time."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for r in recs:
            completion = fmt.gold_completion(r.cot, r.answer, tokenizer.eos_token)
            ids, mask, labels = encode_sft_batch([fmt.prompt(r.question, tokenizer)], [completion], tokenizer, 4096)
            count = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * count
            tokens += count
    return total / tokens


@pytest.mark.parametrize("logit_positions", [10_000, 100, 7])
def test_the_heldout_nll_is_the_models_own_loss_with_at_most_so_many_logits_per_pass(tiny_pair, logit_positions):
    model, tokenizer = tiny_main(tiny_pair)
    fmt = PromptFormat(**compose_config([]).backbone.prompt)
    recs = records(12)
    rows_per_pass = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: rows_per_pass.append(output.reshape(-1, output.shape[-1]).shape[0])
    )
    try:
        nll = heldout_nll((model, tokenizer), fmt, recs, logit_positions)
    finally:
        hook.remove()
    assert nll == pytest.approx(reference_nll(model, tokenizer, fmt, recs), rel=1e-5)
    assert max(rows_per_pass) <= logit_positions  # the bound: logits of [logit_positions, vocabulary] at most
    completion_tokens = sum(
        len(tokenizer(fmt.gold_completion(r.cot, r.answer, tokenizer.eos_token), add_special_tokens=False).input_ids)
        for r in recs
    )
    assert sum(rows_per_pass) == completion_tokens  # every completion token scored once, nothing else
    if logit_positions == 10_000:
        assert len(rows_per_pass) == 1  # all 12 rows in one pass when they fit


def test_rows_share_a_pass_while_they_fit_and_a_long_row_is_scored_in_pieces(tiny_pair):
    tokenizer = load_tokenizer(str(tiny_pair / "main"))
    words = lambda n: " ".join(["1"] * n)  # noqa: E731 - "1" is one token of the tiny vocabulary
    # scored tokens per row: 4, 4, 9 (longer than the bound of 6: passes of its own), 2
    pieces = nll_pieces(["1 1", "1", "1 1 1", "1"], [words(4), words(4), words(9), words(2)], tokenizer, 6)
    assert pieces == [([0], 0, 6), ([2], 0, 6), ([2], 6, 12), ([1, 3], 0, 6)]  # row 3 joins row 1 (4 + 2 fit)
    assert nll_pieces(["1"] * 3, [words(2)] * 3, tokenizer, 6) == [([0, 1, 2], 0, 6)]


def test_the_gold_completion_is_what_each_main_is_asked_to_write():
    tiny = PromptFormat(**compose_config([]).backbone.prompt)
    qwen = PromptFormat(**compose_config(["backbone=qwen2.5-0.5b+1.5b"]).backbone.prompt)
    llama = PromptFormat(**compose_config(["backbone=llama2-7b+sheared-1.3b"]).backbone.prompt)
    reasoning = "She has 3 + 4 = 7 apples."
    # the tiny main's warm-start chain, between the latent markers
    assert tiny.gold_completion(reasoning, "7", "</s>") == f"<bol> {reasoning} <eol> #### 7</s>"
    # an instruct model in its chat turn, as its instruction asks, ended by its end-of-turn token
    assert qwen.gold_completion(reasoning, "7", "<|im_end|>") == f"{reasoning}\n#### 7<|im_end|>"
    # the paper's tags (Eq. 2)
    assert llama.gold_completion(reasoning, "7", "</s>") == f"<think>{reasoning}</think>\n<answer>7</answer></s>"


def test_a_bound_below_one_is_refused(tiny_pair):
    with pytest.raises(ValueError, match="nll_logit_positions"):
        heldout_nll(tiny_main(tiny_pair), PromptFormat(), records(1), 0)
