"""What an arm's compute is measured in (docs/design.md §5): estimated FLOPs of forward and backward passes,
the parameters that do per-token compute, peak memory; and what a module exposes for the budget meter (callbacks/budget.py) to charge it.
Lightning-free: the methods count, the meter adds up."""

from __future__ import annotations

import gc
import resource
from dataclasses import dataclass
from typing import Protocol

import torch

BUDGET_KINDS = ("seconds", "flops")


def forward_flops(parameters: int, tokens: int, backward: str = "none") -> float:
    """2 N FLOPs per token forward; x2 when gradients flow back only through activations (a frozen or
    adapter-trained model), x3 when they reach all weights."""
    factor = {"none": 1.0, "activations": 2.0, "weights": 3.0}[backward]
    return 2.0 * parameters * tokens * factor


def unpacked_numel(parameter: torch.nn.Parameter) -> int:
    """Weights a parameter holds, 4-bit packed ones counted unpacked (bitsandbytes stores two per byte)."""
    return parameter.numel() * (2 if type(parameter).__name__ == "Params4bit" else 1)


def compute_parameters(model: torch.nn.Module) -> int:
    """Parameters that do per-token compute: input embeddings excluded (a lookup), the output head
    included even when tied to them (a matmul), 4-bit packed weights counted unpacked."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    total = sum(unpacked_numel(p) for p in model.parameters() if id(p) not in embeddings)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head.weight) in embeddings:  # tied: skipped above, but it does compute
        total += head.weight.numel()
    return total


@dataclass(frozen=True)
class ModelCost:
    """A model's per-token compute, split by where it runs: the body at every position it reads, the
    output head only where logits are computed (`generate` and an assistant pass compute few: the head
    is 136M of Qwen2.5-0.5B's 494M parameters, so charging it everywhere overcounts by about a third)."""

    body: int  # parameters applied at every position (input embeddings excluded: a lookup)
    head: int  # output-head parameters, applied at positions that produce logits

    @property
    def total(self) -> int:
        return self.body + self.head


def model_cost(model: torch.nn.Module) -> ModelCost:
    """`compute_parameters(model)` split into body and output head."""
    total = compute_parameters(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_parameters = 0 if head is None else sum(unpacked_numel(p) for p in head.parameters())
    return ModelCost(total - head_parameters, head_parameters)


def pass_flops(cost: ModelCost, tokens: int, logit_tokens: int, backward: str = "none") -> float:
    """One pass over `tokens` positions that computes logits at `logit_tokens` of them."""
    return forward_flops(cost.body, tokens, backward) + forward_flops(cost.head, logit_tokens, backward)


def generation_flops(cost: ModelCost, rows: int, prompt_tokens: int, new_tokens: int) -> float:
    """`rows` sequences of `prompt_tokens` positions (tokens or input embeddings) extended by
    `new_tokens` with a KV cache: the prefill reads the prompt and the decode steps each new token but
    the last; logits are computed once per new token."""
    if new_tokens <= 0:
        return 0.0
    return pass_flops(cost, rows * (prompt_tokens + new_tokens - 1), rows * new_tokens)


def reset_peak_memory(device: torch.device) -> None:
    """Free what earlier runs left and restart CUDA's peak counter (the CPU's peak RSS cannot be reset)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA since the last reset; on the CPU the process's peak
    resident set size so far (a lifetime peak: it includes earlier arms run in the same process)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class LatentRollout(Protocol):
    """A rollout of sampled latent chains (DLR's stage-2 `Rollout`), as the meter reads it."""

    @property
    def z(self) -> torch.Tensor: ...  # [B, G, T, Dz]


class BudgetedModule(Protocol):
    """What the budget meter reads from the module it charges, before and after each batch; both RL
    modules satisfy it. The counters only grow: the meter charges what they grow by during a batch."""

    @property
    def device(self) -> torch.device: ...

    @property
    def flops_spent(self) -> torch.Tensor | float: ...  # estimated FLOPs so far, this rank's

    @property
    def generated_tokens(self) -> torch.Tensor | int: ...  # sampled tokens so far, this rank's

    @property
    def main_decoded_sequences(self) -> int: ...  # sequences the main model generated so far, this rank's

    @property
    def main_forward_positions(self) -> int: ...  # token positions the main model read forward so far, this rank's

    @property
    def last_reward(self) -> float | None: ...  # the last batch's mean reward; None: it had no reward

    @property
    def last_grad_norm(self) -> float | None: ...  # None: the last batch took no optimizer step

    @property
    def last_rollout(self) -> LatentRollout | None: ...  # its chains' diversity is traced; None: no latents

    @property
    def last_scores(self) -> torch.Tensor | None: ...  # [B, K, 3] (correct, format, reward) of the last RL batch

    @property
    def stage(self) -> str: ...  # "alignment" (DLR's stage 1: charged or set aside) or "rl"
