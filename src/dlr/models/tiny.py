"""The embedded tiny backbone: a word-level tokenizer for the procedural vocabulary and two small
standard `transformers` models (a Llama main and a Qwen2 assistant) built from configs.

Word-level tokens keep sequences short (one token per number or word), which is what makes a CPU
warm start possible (docs/design.md §11). The latent markers `<bol>`, `<eol>` and the assistant's placeholder
`<lat>` are in the vocabulary from the start, so no untrained row is ever added to the frozen main
model: the warm-start corpus wraps the gold reasoning in `<bol> … <eol>`, which trains them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast, Qwen2Config

from dlr.data import synthetic_logic, synthetic_math

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
BOL, EOL, LAT = "<bol>", "<eol>", "<lat>"  # begin/end of latent reasoning, assistant placeholder
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, BOL, EOL, LAT)
PROMPT_WORDS = ("answer", "####")  # prompt cue and answer-line marker


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Deterministic word-level tokenizer over every word the procedural generators can emit."""
    words = sorted(set(synthetic_math.vocabulary()) | set(synthetic_logic.vocabulary()) | set(PROMPT_WORDS))
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[BOL, EOL, LAT],
        padding_side="left",  # batched generation continues every row from its last real token
    )
    return tokenizer


@dataclass(frozen=True)
class TinyShape:
    """Architecture of one tiny model; defaults are overridden from `configs/backbone/tiny.yaml`."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 512


def _config(
    config_class: type[PretrainedConfig], tokenizer: PreTrainedTokenizerFast, shape: TinyShape
) -> PretrainedConfig:
    return config_class(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def main_config(tokenizer: PreTrainedTokenizerFast, shape: TinyShape) -> LlamaConfig:
    """The tiny main model is a Llama, like Llama-3 mains."""
    return _config(LlamaConfig, tokenizer, shape)


def assistant_config(tokenizer: PreTrainedTokenizerFast, shape: TinyShape) -> Qwen2Config:
    """The tiny assistant is a Qwen2, so main and assistant differ in architecture as real pairs may."""
    return _config(Qwen2Config, tokenizer, shape)
