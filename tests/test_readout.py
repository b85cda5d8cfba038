"""The readout decides the main model's input, stage 1's targets and how its text is scored; DLR's
evaluation reads only the question; a shipped stage 1 loads only over the main it was trained against."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from conftest import settings_from_yaml
from dlr.data.schema import Record
from dlr.data.synthetic_logic import generate as generate_logic
from dlr.data.synthetic_math import generate as generate_math
from dlr.methods.dlr_module import DLRSettings
from dlr.methods.stage1 import export_stage1, load_stage1
from dlr.models.backbones import PromptFormat
from dlr.models.readout import Readout, split_gold_completion
from dlr.models.tiny import build_tokenizer
from test_dlr import build_module

FMT = PromptFormat(template="{question} answer :")
RECORD = Record("r1", "math", "ana has 7 pens . ana gets 2 more . how many pens ?", "gets 2 : 7 + 2 = 9 .", "9", 1, "t")


def test_plain_prompt_readouts_put_the_span_where_each_reading_says():
    tokenizer = build_tokenizer()
    rationale, answer = Readout("rationale", FMT, 64), Readout("answer", FMT, 4)
    prompt = f"<bos> {RECORD.question} answer :"
    assert rationale.around_latents(RECORD.question, tokenizer) == (f"{prompt}<bol>", "")
    assert answer.around_latents(RECORD.question, tokenizer) == (f"{prompt}<bol>", "<eol> ####")
    assert rationale.gold_completion(RECORD, "<eos>") == " gets 2 : 7 + 2 = 9 . <eol> #### 9<eos>"
    assert answer.gold_completion(RECORD, "<eos>") == " 9<eos>"
    assert rationale.scored_text("+ 2 = 9 . #### 9") == "+ 2 = 9 . #### 9"  # writes its own answer line
    assert answer.scored_text("9") == "#### 9"  # the free cue, put back
    assert rationale.latents_open_the_chain and not answer.latents_open_the_chain
    assert answer.free_answer_cue and not rationale.free_answer_cue


def test_chat_models_read_the_latents_inside_the_user_turn():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }} [end] {% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    fmt = dataclasses.replace(FMT, use_chat_template=True, instruction="solve .")
    before, after = Readout("rationale", fmt, 64).around_latents("q ?", tokenizer)
    assert before == "[system] solve . [end] [user] q ?\n<bol>"
    assert after == "<eol> [end] [assistant] "  # the assistant turn is the model's usual answer
    assert Readout("rationale", fmt, 64).gold_completion(RECORD, "<eos>") == "gets 2 : 7 + 2 = 9 .\n#### 9<eos>"
    assert not Readout("rationale", fmt, 64).latents_open_the_chain


def test_stage1_targets_split_the_gold_completion_after_the_tokens_the_latents_stand_for():
    tokenizer = build_tokenizer()
    completion = Readout("rationale", FMT, 64).gold_completion(RECORD, "<eos>")
    words = ["gets", "2", ":", "7", "+", "2", "=", "9", ".", "<eol>", "####", "9", "<eos>"]
    ids = tokenizer.convert_tokens_to_ids(words)
    opening, opening_mask, target, target_mask = split_gold_completion(tokenizer, [completion], 4, True)
    assert opening.tolist() == [ids[:4]] and opening_mask.tolist() == [[1, 1, 1, 1]]
    assert target.tolist() == [ids[4:]] and target_mask.tolist() == [[1] * 9]
    # chat models: the latents precede the whole answer, which is all target
    _, _, whole, _ = split_gold_completion(tokenizer, [completion], 4, False)
    assert whole.tolist() == [ids]
    # a shorter row is right-padded with mask 0
    short = Readout("rationale", FMT, 64).gold_completion(dataclasses.replace(RECORD, cot="7 ."), "<eos>")
    _, _, both, both_mask = split_gold_completion(tokenizer, [completion, short], 4, True)
    assert both_mask.tolist() == [[1] * 9, [1, 1, 0, 0, 0, 0, 0, 0, 0]]  # "7 . <eol> ####" stand in, "9 <eos>" remain
    with pytest.raises(ValueError, match="method.latent.steps=13 covers the whole gold completion"):
        split_gold_completion(tokenizer, [completion], 13, True)


def _records(n: int) -> list[Record]:
    rng = random.Random(0)
    return [(generate_math if i % 2 else generate_logic)(rng, 1 + i % 3, i, "t") for i in range(n)]


def _garbled(records: list[Record]) -> list[Record]:
    return [dataclasses.replace(r, cot="9 9 9 . every wug .", answer="123", depth=8, id="x") for r in records]


@pytest.mark.parametrize("readout", ["rationale", "answer"])
def test_dlr_evaluation_reads_only_the_question(tiny_pair, readout):
    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            "readout": readout,
            "latent": {"steps": 2, "dim": 8},
            "rl": {"beta": 0.0},
            "max_new_tokens": {"rationale": 6, "answer": 2},
        },
    )
    module = build_module(tiny_pair, settings)
    records = _records(4)
    assert module.greedy_completions(records) == module.greedy_completions(_garbled(records))
    torch.manual_seed(3)
    sampled = module.sample_attempts(records, 3)
    torch.manual_seed(3)
    assert sampled == module.sample_attempts(_garbled(records), 3)
    assert len(sampled) == 4 and all(len(a) == 3 for a in sampled)


def test_a_shipped_stage1_loads_over_its_own_main_only(tiny_pair, tmp_path):
    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {"latent": {"steps": 2, "dim": 8}, "rl": {"beta": 0.0}, "max_new_tokens": {"rationale": 6, "answer": 2}},
    )
    trained = build_module(tiny_pair, settings)
    with torch.no_grad():
        trained.projector.gain.mul_(2.0)
        trained.policy.mu_head.bias.add_(0.5)
    export_stage1(trained, tmp_path / "s1", {"alignment_steps": 7})

    fresh = build_module(tiny_pair, settings)
    info = load_stage1(fresh, tmp_path / "s1", "REGENERATE")
    assert info["alignment_steps"] == 7 and info["readout"] == "rationale"
    torch.testing.assert_close(fresh.projector.gain, trained.projector.gain)
    torch.testing.assert_close(fresh.policy.mu_head.bias, trained.policy.mu_head.bias)
    lora = [k for k in fresh.state_dict() if "lora_" in k]
    assert lora and all(torch.equal(fresh.state_dict()[k], trained.state_dict()[k]) for k in lora)
    records = _records(3)
    assert fresh.greedy_completions(records) == trained.greedy_completions(records)

    other_main = build_module(tiny_pair, settings)
    other_main.main_sha256 = "0" * 64
    with pytest.raises(ValueError, match="trained against another main model.*REGENERATE"):
        load_stage1(other_main, tmp_path / "s1", "REGENERATE")
    answer = build_module(tiny_pair, dataclasses.replace(settings, readout="answer"))
    with pytest.raises(ValueError, match="this run asks for"):
        load_stage1(answer, tmp_path / "s1", "REGENERATE")
    with pytest.raises(ValueError, match="holds no stage1.safetensors"):
        load_stage1(fresh, tmp_path / "missing", "REGENERATE")
