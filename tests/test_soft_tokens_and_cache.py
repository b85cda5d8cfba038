"""At real scale (issue 34 items 8 and 9): the soft-token projector reads a bf16 main's embedding matrix without
copying it, and the recurrent policy hands its KV cache to transformers under the argument's current name."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM

from dlr.models.latent_policy import LatentPolicy
from dlr.models.projector import SoftTokenProjector
from dlr.models.tiny import LAT, build_tokenizer


class NewTensors(TorchDispatchMode):
    """Records the shape of every tensor with memory of its own that an operator returns while it is active
    (views, such as `detach()`, share their input's storage and are left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.shapes += [
            tuple(t.shape)
            for t in tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
        ]
        return out


def bf16_soft_tokens(vocab: int = 4096, width: int = 32, latent_dim: int = 8) -> SoftTokenProjector:
    torch.manual_seed(0)
    return SoftTokenProjector(latent_dim, nn.Embedding(vocab, width).to(torch.bfloat16))


def test_soft_tokens_of_a_bf16_main_make_no_copy_of_its_embedding_matrix():
    """Before, every call made a float32 [V, Dmain] copy (0.93 GB for Qwen2.5-1.5B, 2.2 GB for the 7B)."""
    projector = bf16_soft_tokens()
    z = torch.randn(2, 3, 8)
    with NewTensors() as made:
        x = projector(z)
    assert (x.shape, x.dtype) == ((2, 3, 32), torch.float32)
    assert (4096, 32) not in made.shapes and (2, 3, 4096) in made.shapes  # the probabilities are made, the table is not
    # the product in bf16 (probabilities rounded to 8 bits, float32 accumulation), against the float32 one
    reference = torch.softmax(projector.vocabulary_logits(z), -1) @ projector.embeddings.weight.float()
    torch.testing.assert_close(x, reference, rtol=1e-2, atol=2e-3)


def test_soft_tokens_of_a_float32_main_are_the_exact_expected_embedding():
    torch.manual_seed(0)
    embeddings = nn.Embedding(500, 16)
    projector = SoftTokenProjector(4, embeddings)
    z = torch.randn(3, 2, 4)
    expected = torch.softmax(projector.vocabulary_logits(z), -1) @ embeddings.weight
    assert torch.equal(projector(z), expected)


@pytest.fixture()
def transformers_log():
    """What transformers logs (its logger does not propagate to the root logger)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_a_recurrent_rollout_uses_transformers_cache_argument_and_copies_no_embedding_matrix(
    tiny_pair, transformers_log
):
    """`past_key_values=` warns of its removal in transformers 5.40; `cache=` is the name since 5.24. Every
    step feeds back a soft token of a bf16 embedding matrix, none of them copied."""
    tokenizer = build_tokenizer()
    assistant = AutoModelForCausalLM.from_pretrained(tiny_pair / "assistant")
    projector = bf16_soft_tokens(vocab=4096, width=32, latent_dim=5)
    torch.manual_seed(0)
    policy = LatentPolicy(assistant, tokenizer.convert_tokens_to_ids(LAT), 5, 6, mode="recurrent", feedback_dim=32)
    with torch.no_grad():
        policy.stop_head.bias.fill_(-20.0)  # never stops: all 6 steps run on the cache
    enc = tokenizer(["<bos> ana has 7 pens ."], return_tensors="pt", add_special_tokens=False)
    with warnings.catch_warnings(), NewTensors() as made:
        warnings.simplefilter("error", FutureWarning)  # a deprecated argument would raise here
        z, dist = policy.sample_recurrent(enc.input_ids, enc.attention_mask, 2, projector)
    assert z.shape == (1, 2, 6, 5) and dist.step_mask.all()
    assert not [message for message in transformers_log if "past_key_values" in message]
    assert (4096, 32) not in made.shapes
