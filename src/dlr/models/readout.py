"""How the frozen main model reads a latent chain and what it writes after it (docs/design.md, DLR).

One `Readout` decides, for training, evaluation, pass@k and the benchmarks alike, the text around
the latent span in the main model's input, what stage 1 teaches it to write, how long it may write
and how its text is scored:

- `rationale` (the default; SoftCoT's reading): the latents open the main model's reasoning and the
  frozen main writes its own chain and answer line in text, one greedy decode per kept chain. With a
  plain prompt and the `####` structure (the tiny backbone) the input is `prompt <bol> P(z_1)..P(z_T)`
  and the latents stand for the first T tokens of the chain the main continues (`... <eol> #### n`);
  with a chat template they sit between the markers inside the user turn and the assistant turn is
  the model's usual step-by-step answer; with a plain prompt and the tags structure (the paper's
  LLaMA-2 main, Eq. 10: the main reads latents, context and query and writes the reasoning and the
  answer) the input is `prompt <bol> P(z_1)..P(z_T) <eol>` and the main writes all of
  `<think>...</think><answer>...</answer>`.
- `answer` (Coconut / CoLaR's reading): `prompt <bol> P(z_1)..P(z_T) <eol> ####` and the main writes
  only the answer; the cue is put back in front of its text, so its format asks only for an answer token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from dlr.data.schema import Record
from dlr.models.backbones import PromptFormat
from dlr.rewards.verify import ANSWER_CLOSE

READOUTS = ("rationale", "answer")
_SPAN = "<<latent-span>>"  # stands in for the latents while a chat template renders the user turn


@dataclass(frozen=True)
class Readout:
    kind: str  # rationale | answer
    fmt: PromptFormat
    max_new_tokens: int  # the main model's decode budget per latent chain

    def __post_init__(self) -> None:
        if self.kind not in READOUTS:
            raise ValueError(f"method.readout must be one of {READOUTS}, got {self.kind!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"the {self.kind} readout's decode budget must be >= 1, got {self.max_new_tokens}")

    @property
    def latents_open_the_chain(self) -> bool:
        """Whether the latents stand for the opening tokens of the gold completion (plain prompts with
        the `####` structure, rationale readout): stage 1 then predicts only the rest of it."""
        return self.kind == "rationale" and not self.fmt.use_chat_template and self.fmt.structure == "hash"

    @property
    def free_answer_cue(self) -> bool:
        """The answer readout gets `####` for free: its format reward asks only for an answer token after it."""
        return self.kind == "answer"

    def around_latents(self, question: str, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
        """The main model's input text before and after the latent span of one question."""
        fmt = self.fmt
        if self.kind == "rationale" and fmt.use_chat_template:
            before, after = fmt.prompt(f"{question}\n{fmt.bol}{_SPAN}{fmt.eol}", tokenizer).split(_SPAN)
            return before, after
        before = f"{fmt.prompt(question, tokenizer)}{fmt.bol}"
        if self.kind == "rationale":
            return before, "" if self.latents_open_the_chain else fmt.eol
        return before, f"{fmt.eol} {fmt.answer_cue}"

    def gold_completion(self, record: Record, eos: str) -> str:
        """What the main model should write after the latent span, from the record's gold solution.
        Plain prompts continue the warm-start format (`... <eol> #### n`); chat models write their
        reasoning, then the answer line; the tags structure is `<think>cot</think>\n<answer>n</answer>`
        (after the cue `<answer>`, the answer readout writes `n</answer>`)."""
        if self.kind == "answer":
            return f" {record.answer}{ANSWER_CLOSE if self.fmt.structure == 'tags' else ''}{eos}"
        text = self.fmt.gold_completion(record.cot, record.answer, eos)  # the main's whole text chain
        return text if self.fmt.use_chat_template or self.fmt.structure == "tags" else text.removeprefix(self.fmt.bol)

    def gold_chain(self, record: Record) -> str:
        """The gold reasoning a recurrent chain stands for in stage 1 (answer readout): the record's
        `cot` as the main model reads it after `<bol>` (GSM8K's comes without its `<<...>>` notes)."""
        return f" {record.cot}"

    def scored_text(self, decoded: str) -> str:
        """The decoded text as the reward reads it: the answer readout gets its cue back."""
        return f"{self.fmt.answer_cue} {decoded}".strip() if self.kind == "answer" else decoded


def latent_main_inputs(
    main: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    readout: Readout,
    questions: list[str],
    projected: torch.Tensor,
    step_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The main model's input for one decode per chain: `before P(z_1)..P(z_T) after`.

    questions: N questions (each row's own); projected: [N, T, Dmain] latents already in the main
    model's embedding space; step_mask [N, T]: each chain's real steps (recurrent chains; None: all T).
    With a step mask each row is `before P(z_1)..P(z_Ti) after`, its padding moved to the left (the
    pad token's embedding, mask 0), so every row ends at the last column as in a left-padded text batch.
    Returns left-padded (inputs_embeds [N, L, Dmain], attention_mask [N, L]).
    """
    device = projected.device
    embed = main.get_input_embeddings()
    parts = [readout.around_latents(q, tokenizer) for q in questions]
    afters = {after for _, after in parts}
    if len(afters) != 1:  # one suffix for the whole batch keeps the latents at one column
        raise ValueError("the text after the latent span must be the same for every question")
    before = tokenizer([b for b, _ in parts], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    N, T = projected.shape[:2]
    pieces = [embed(before.input_ids), projected.to(embed.weight.dtype)]
    after_text = afters.pop()
    after_len = 0
    if after_text:
        after_ids = tokenizer(after_text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        after_len = after_ids.shape[1]
        pieces.append(embed(after_ids).expand(N, -1, -1))
    embeds = torch.cat(pieces, dim=1)  # [N, Lb + T + La, D]
    if step_mask is None:
        mask = torch.cat([before.attention_mask, before.attention_mask.new_ones(N, T + after_len)], dim=1)
        return embeds, mask
    ones = before.attention_mask.new_ones(N, after_len)
    mask = torch.cat([before.attention_mask, step_mask.to(ones.dtype), ones], dim=1)  # [N, Lb + T + La]
    order = torch.sort(mask, dim=1, stable=True).indices  # padding first, real positions in their order
    mask = mask.gather(1, order)
    embeds = embeds.gather(1, order[..., None].expand_as(embeds))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pad = embed(torch.tensor([pad_id], device=device))  # [1, D]
    return torch.where(mask.bool()[..., None], embeds, pad.to(embeds.dtype)), mask


def split_gold_completion(
    tokenizer: PreTrainedTokenizerBase, completions: list[str], num_latents: int, opens_chain: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage-1 targets from the gold completions, tokenised by the main model's tokenizer.

    The first `num_latents` tokens of each completion are what the latents stand in for (the pull
    targets); the main model must write the rest (`opens_chain`), or all of it (chat models, whose
    latents sit in the user turn). Returns right-padded (opening ids [N, T], opening mask [N, T],
    target ids [N, Lt], target mask [N, Lt]); pad positions hold the pad id and mask 0.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = tokenizer(completions, add_special_tokens=False)["input_ids"]
    openings, targets = [], []
    for text, ids in zip(completions, rows, strict=True):
        if opens_chain and len(ids) <= num_latents:
            raise ValueError(
                f"method.latent.steps={num_latents} covers the whole gold completion {text!r} "
                f"({len(ids)} tokens): nothing is left for the main model to write; lower method.latent.steps"
            )
        openings.append(ids[:num_latents])
        targets.append(ids[num_latents:] if opens_chain else ids)

    return (*right_padded(openings, num_latents, pad), *right_padded(targets, max(len(t) for t in targets), pad))


def right_padded(seqs: list[list[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as (ids [N, width], mask [N, width]), right-padded with `pad` (mask 0)."""
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return out, mask
