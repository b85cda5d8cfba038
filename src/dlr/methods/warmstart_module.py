"""Supervised warm start of the tiny backbone on the procedural corpus (docs/design.md §6).

Both models learn to answer `prompt -> <bol> gold reasoning <eol> #### answer <eos>`. A fraction of
examples leave the latent span empty (`<bol> <eol> #### answer`), which trains the marker embeddings
the frozen main model will later see around projected latents, and gives a direct-answer mode whose
accuracy is the "no reasoning" reference DLR has to beat.
"""

from __future__ import annotations

import random

import torch
from lightning import LightningModule
from transformers import PreTrainedTokenizerBase

from dlr.data.schema import Record
from dlr.methods.schedule import warmup_cosine
from dlr.models.backbones import PromptFormat


def sft_completion(record: Record, fmt: PromptFormat, eos: str, with_reasoning: bool) -> str:
    reasoning = f" {record.cot}" if with_reasoning else ""
    return f"{fmt.bol}{reasoning} {fmt.eol} {fmt.answer_cue} {record.answer} {eos}"


def encode_sft_batch(
    prompts: list[str], completions: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on prompt and padding), each [B, L]."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    rows = [(p + c)[:max_length] for p, c in zip(prompt_ids, completion_ids, strict=True)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (row, p) in enumerate(zip(rows, prompt_ids, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(p) : len(row)] = ids[i, len(p) : len(row)]
    return ids, mask, labels


class WarmStartModule(LightningModule):
    """Trains the tiny main and assistant side by side with next-token loss on the completion."""

    def __init__(
        self,
        main: torch.nn.Module,
        assistant: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        fmt: PromptFormat,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        direct_fraction: float,
        max_length: int,
        seed: int,
        train_assistant: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= direct_fraction <= 1.0:
            raise ValueError(f"method.direct_fraction must be in [0, 1], got {direct_fraction}")
        self.main, self.assistant = main, assistant
        self.tokenizer, self.fmt = tokenizer, fmt
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.direct_fraction, self.max_length = direct_fraction, max_length
        self.format_rng = random.Random(f"warmstart-format:{seed}")
        self.train_assistant = train_assistant
        self.assistant.requires_grad_(train_assistant)

    def training_step(self, batch: list[Record], batch_idx: int) -> torch.Tensor:
        prompts = [self.fmt.prompt(r.question, self.tokenizer) for r in batch]
        completions = [
            sft_completion(r, self.fmt, self.tokenizer.eos_token, self.format_rng.random() >= self.direct_fraction)
            for r in batch
        ]
        ids, mask, labels = encode_sft_batch(prompts, completions, self.tokenizer, self.max_length)
        ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
        loss_main = self.main(input_ids=ids, attention_mask=mask, labels=labels).loss
        self.log("train/loss_main", loss_main, prog_bar=True)
        self.log("train/tokens", float(mask.sum()), reduce_fx="sum")
        if not self.train_assistant:  # a main-only curriculum phase
            return loss_main
        loss_assistant = self.assistant(input_ids=ids, attention_mask=mask, labels=labels).loss
        self.log("train/loss_assistant", loss_assistant, prog_bar=True)
        return loss_main + loss_assistant

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.95),
        )
        total = max(self.trainer.max_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, total, floor=0.1)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
