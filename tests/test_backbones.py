"""Backbones: 4-bit NF4 frozen main on the CPU, LoRA assistant, the weight hash, offline errors."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from dlr.models.backbones import (
    BackboneUnavailable,
    ModelSpec,
    PromptFormat,
    freeze,
    keep_4bit_layout,
    load_assistant,
    load_causal_lm,
    load_main,
    load_tokenizer,
    marker_token_id,
    weights_sha256,
)
from dlr.models.tiny import BOL, EOL, LAT, build_tokenizer

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def test_tiny_tokenizer_has_the_latent_markers_as_single_tokens():
    tokenizer = build_tokenizer()
    for marker in (BOL, EOL, LAT):
        assert len(tokenizer(marker, add_special_tokens=False).input_ids) == 1
    assert (
        tokenizer.decode(tokenizer("ana has 7 pens . <bol> <eol> #### 9").input_ids, skip_special_tokens=True)
        == "ana has 7 pens . #### 9"
    )


def test_nf4_main_loads_frozen_4bit_and_tracks_full_precision(tiny_pair):
    path = str(tiny_pair / "main")
    full = load_main(ModelSpec(path, "none"))
    nf4 = load_main(ModelSpec(path, "nf4"))
    linear4 = [m for m in nf4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # q,k,v,o,gate,up,down in each of 2 layers
    assert linear4[0].weight.quant_state.quant_type == "nf4" and linear4[0].weight.quant_state.nested  # double quant
    assert not any(p.requires_grad for p in nf4.parameters()) and not nf4.training
    ids = build_tokenizer()("<bos> ana has 7 pens . answer :", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        p_full = full(ids).logits.softmax(-1)
        p_nf4 = nf4(ids).logits.softmax(-1)
    assert (p_full - p_nf4).abs().sum(-1).max() < 0.5  # 4-bit rounding moves the distribution a little


def test_the_cpu_main_computes_with_weights_dequantized_once_exactly_as_bitsandbytes_does(tiny_pair):
    spec = ModelSpec(str(tiny_pair / "main"), "nf4")
    kernel = keep_4bit_layout(freeze(load_causal_lm(spec)))  # bitsandbytes dequantizing at every call
    cached = load_main(spec)
    layers = [m for m in cached.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.dequantized_weight.dtype == torch.float32 for m in layers)
    assert cached.state_dict().keys() == kernel.state_dict().keys()  # the copy is not saved
    assert weights_sha256(cached) == weights_sha256(kernel)
    ids = torch.randint(8, 100, (3, 12))
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, kernel(ids).logits)  # bit for bit, not just close
    embeds = cached.get_input_embeddings()(ids).detach().requires_grad_(True)
    cached(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0  # latents upstream still get gradients
    assert not any(p.grad is not None for p in cached.parameters())


def test_lora_assistant_trains_only_adapters_and_leaves_the_main_hash_unchanged(tiny_pair):
    main = load_main(ModelSpec(str(tiny_pair / "main"), "nf4"))
    before = weights_sha256(main)
    assistant = load_assistant(ModelSpec(str(tiny_pair / "assistant"), "none", lora=LORA))
    trainable = {n for n, p in assistant.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in assistant.named_parameters() if not p.requires_grad}

    optimizer = torch.optim.AdamW([p for p in assistant.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(8, 100, (2, 12))
    for _ in range(3):
        assistant(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            main(input_ids=ids)  # the main model is used, never trained
    assert weights_sha256(main) == before
    assert all(torch.equal(p, frozen_before[n]) for n, p in assistant.named_parameters() if n in frozen_before)
    changed = [n for n, p in assistant.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed  # lora_B starts at zero; training moved it


def test_hash_sees_any_change_to_the_main_weights(tiny_pair):
    main = load_main(ModelSpec(str(tiny_pair / "main"), "none"))
    before = weights_sha256(main)
    assert weights_sha256(main) == before
    with torch.no_grad():
        main.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert weights_sha256(main) != before


def test_missing_local_folder_and_offline_hub_fail_in_one_paragraph(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneUnavailable) as err:
        load_main(ModelSpec("some-org/not-a-cached-model", "nf4"))
    message = str(err.value)
    assert "some-org/not-a-cached-model" in message and "backbone=tiny" in message and "\n" not in message
    with pytest.raises(BackboneUnavailable, match="folder"):
        load_tokenizer(str(tmp_path))  # an existing folder without a tokenizer


def test_bad_quantization_is_refused_before_loading():
    with pytest.raises(ValueError, match="quantization"):
        ModelSpec("x", "nf8")


def test_prompt_format_plain_and_chat():
    tokenizer = build_tokenizer()
    assert PromptFormat().prompt("ana has 7 pens .", tokenizer) == "<bos> ana has 7 pens . answer :"


def test_missing_local_backbone_folder_says_how_to_build_it(tmp_path):
    with pytest.raises(BackboneUnavailable, match="does not exist.*warmstart_tiny"):
        load_main(ModelSpec(str(tmp_path / "nope"), "nf4"))


def test_int8_main_loads_frozen_and_runs(tiny_pair):
    main = load_main(ModelSpec(str(tiny_pair / "main"), "int8"))
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in main.modules())
    assert not any(p.requires_grad for p in main.parameters())
    with torch.no_grad():
        assert main(input_ids=torch.randint(8, 100, (2, 5))).logits.shape == (2, 5, main.config.vocab_size)


def llama_style_tokenizer():
    """A tokenizer built as LLaMA-2's tokenizer.json is (BPE with byte fallback, the "▁" word-start
    normalizer, <unk> <s> </s> at ids 0-2 and the byte tokens <0x00>..<0xFF> at 3-258), on a few words."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁", "a", "b", "▁a", "▁b", ":"):
        vocab[piece] = len(vocab)
    model = models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁", "b")], byte_fallback=True, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_latent_markers_are_existing_tokens_by_name_or_as_byte_fallback_characters():
    """The paper's backbone marks the latent span with the characters STX and ETX, which LLaMA-2's
    tokenizer writes as its byte tokens <0x02> (id 5) and <0x03> (id 6) wherever they stand."""
    from conftest import compose_config

    llama = llama_style_tokenizer()
    prompt = compose_config(["backbone=llama2-7b+sheared-1.3b"]).backbone
    ids = [marker_token_id(llama, m) for m in (prompt.prompt.bol, prompt.prompt.eol, prompt.placeholder)]
    assert ids == [3 + 0x02, 3 + 0x03, 3 + 0x1A]
    assert llama("a b:\x02", add_special_tokens=False).input_ids[-1] == 5  # one token inside a prompt
    assert marker_token_id(llama, "<0x02>") == 5  # by its name too
    assert marker_token_id(llama, "ab") is None  # two tokens
    assert marker_token_id(llama, "<bol>") is None  # not a token of this vocabulary
    tiny = build_tokenizer()
    assert marker_token_id(tiny, BOL) == tiny.convert_tokens_to_ids(BOL)


def test_a_prompt_structure_must_be_one_the_rewards_check():
    assert PromptFormat(structure="tags").structure == "tags"
    with pytest.raises(ValueError, match="backbone.prompt.structure"):
        PromptFormat(structure="xml")
