"""The readout decides the main model's input, stage 1's targets and how its text is scored; DLR's
evaluation reads only the question; a shipped stage 1 loads only over the main it was trained against."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import quiet_cpu_trainer, reward_from_yaml, settings_from_yaml
from dlr.data.schema import Record
from dlr.data.synthetic_logic import generate as generate_logic
from dlr.data.synthetic_math import generate as generate_math
from dlr.methods.dlr_module import DLRSettings
from dlr.methods.stage1 import export_stage1, load_stage1
from dlr.models.backbones import PromptFormat
from dlr.models.readout import Readout, split_gold_completion
from dlr.models.tiny import build_tokenizer
from dlr.rewards import RewardBreakdown
from test_dlr import build_module

ROOT = Path(__file__).resolve().parents[1]
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


def test_the_tags_structure_closes_the_span_and_the_main_writes_think_and_answer():
    """A plain prompt asking for the paper's tags (the LLaMA-2 main): `prompt <bol> latents <eol>`, and the
    main writes the whole `<think>...</think><answer>...</answer>` (Eq. 10), which the tags reward reads."""
    tokenizer = build_tokenizer()
    fmt = dataclasses.replace(FMT, structure="tags", answer_cue="<answer>")
    rationale, answer = Readout("rationale", fmt, 64), Readout("answer", fmt, 4)
    prompt = f"<bos> {RECORD.question} answer :"
    assert rationale.around_latents(RECORD.question, tokenizer) == (f"{prompt}<bol>", "<eol>")
    assert not rationale.latents_open_the_chain  # stage 1 asks for all of the completion
    gold = rationale.gold_completion(RECORD, "<eos>")
    assert gold == "<think>gets 2 : 7 + 2 = 9 .</think>\n<answer>9</answer><eos>"
    assert reward_from_yaml(["backbone=llama2-7b+sheared-1.3b", "reward=paper"]).score(
        gold.removesuffix("<eos>"), "9", "math"
    ) == RewardBreakdown(1.0, 1.0, pytest.approx(1.2))
    assert answer.around_latents(RECORD.question, tokenizer) == (f"{prompt}<bol>", "<eol> <answer>")
    assert answer.gold_completion(RECORD, "<eos>") == " 9</answer><eos>"
    assert answer.scored_text("9</answer>") == "<answer> 9</answer>"


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


@pytest.mark.parametrize(
    ("readout", "mode"), [("rationale", "parallel"), ("answer", "recurrent"), ("answer", "parallel")]
)
def test_dlr_evaluation_reads_only_the_question(tiny_pair, readout, mode):
    """Greedy and sampled decodes, recurrent chains included (their lengths decided by the policy,
    never by the record's gold chain), are the same for a record whose every other field is garbled."""
    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            "readout": readout,
            "latent": {"steps": 2, "max_steps": 6, "dim": 8, "mode": mode},
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
    # a folder written before `projector` was a setting holds the MLP projector, the only one then
    info_file = tmp_path / "s1" / "stage1.json"
    info = json.loads(info_file.read_text())
    assert info["latent"] == {"steps": 2, "dim": 8, "mode": "parallel", "num_modes": 1, "projector": "mlp"}
    del info["latent"]["projector"]
    info_file.write_text(json.dumps(info))
    load_stage1(build_module(tiny_pair, settings), tmp_path / "s1", "REGENERATE")


def test_a_recurrent_stage1_loads_only_with_its_cap_compression_projector_and_start(tiny_pair, tmp_path):
    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            "readout": "answer",
            "latent": {"max_steps": 5, "dim": 8, "projector": "soft_tokens", "init": "random"},
            "rl": {"beta": 0.0},
            "max_new_tokens": {"rationale": 6, "answer": 2},
        },
    )
    trained = build_module(tiny_pair, settings)
    with torch.no_grad():
        trained.policy.stop_head.bias.add_(0.7)
        trained.projector.to_vocabulary.bias.add_(0.3)
    export_stage1(trained, tmp_path / "s1", {"alignment_steps": 3})
    info = json.loads((tmp_path / "s1" / "stage1.json").read_text())
    assert info["latent"] == {
        "max_steps": 5,
        "dim": 8,
        "mode": "recurrent",
        "compression": 1,
        "projector": "soft_tokens",
        "init": "random",
    }
    state = load_file(str(tmp_path / "s1" / "stage1.safetensors"))
    assert "policy.stop_head.bias" in state and not any(k.startswith("projector.embeddings") for k in state)

    fresh = build_module(tiny_pair, settings)
    load_stage1(fresh, tmp_path / "s1", "REGENERATE")
    torch.testing.assert_close(fresh.policy.stop_head.bias, trained.policy.stop_head.bias)
    records = _records(3)
    assert fresh.greedy_completions(records) == trained.greedy_completions(records)
    # each alone refuses it; init=assistant opens the chain with another token
    for change in ({"max_steps": 6}, {"compression": 2}, {"projector": "mlp"}, {"init": "assistant"}):
        other = dataclasses.replace(settings, latent=dataclasses.replace(settings.latent, **change))
        with pytest.raises(ValueError, match="this run asks for"):
            load_stage1(build_module(tiny_pair, other), tmp_path / "s1", "REGENERATE")


def test_a_folder_of_stage1s_by_readout_names_the_missing_readouts_folder_and_command(tmp_path):
    """`data/backbones/tiny/dlr_stage1/` holds one sub-folder per readout: the answer readout looks in
    `answer/` even when only `rationale/` exists, and its absence names that folder and the command."""
    from dlr.methods.stage1 import shipped_stage1_folder, stage1_folder

    shipped = tmp_path / "dlr_stage1"
    (shipped / "rationale").mkdir(parents=True)
    for name in ("stage1.safetensors", "stage1.json"):
        (shipped / "rationale" / name).write_text("")
    assert shipped_stage1_folder(shipped, "rationale", "REGENERATE") == shipped / "rationale"
    assert stage1_folder(shipped, "answer") == shipped / "answer"
    with pytest.raises(ValueError, match=r"for the answer readout \(looked in .*dlr_stage1/answer\).*`REGENERATE`"):
        shipped_stage1_folder(shipped, "answer", "REGENERATE")
    assert stage1_folder(shipped / "rationale", "answer") == shipped / "rationale"  # one stage 1: itself


def test_chain_distillation_trains_on_gsm8k_rationales_without_their_calculator_notes(tiny_pair, tmp_path):
    """The GSM8K fixture's rationales (with `<<36/3=12>>` notes in the release) become gold chains
    without them, and stage 1 of the answer readout runs on them."""
    from dlr.data.datamodule import ReasoningDataModule
    from dlr.data.hub import stream_hub_records
    from dlr.data.schema import SkipCounter

    fixture = str(ROOT / "data" / "fixtures" / "gsm8k.jsonl")
    records = list(stream_hub_records("gsm8k", "test", SkipCounter(), local_path=fixture))
    assert "<<" in (ROOT / "data" / "fixtures" / "gsm8k.jsonl").read_text()
    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            "readout": "answer",
            "latent": {"max_steps": 40, "dim": 8},
            "alignment": {"steps": 2, "init_from": None},
            "rl": {"steps": 0, "beta": 0.0},
            "max_new_tokens": {"rationale": 6, "answer": 2},
        },
    )
    module = build_module(tiny_pair, settings)
    chains = [module.readout.gold_chain(r) for r in records]
    assert chains[0] == " She sells 36/3 = 12 muffins in the morning.\nSo 36 - 12 = 24 muffins are left."
    assert not any("<<" in c or ">>" in c for c in chains)
    ids, mask = module.gold_chain_tokens(records)
    assert ids.shape[1] <= 40 and (mask.sum(1) >= 1).all()
    data = ReasoningDataModule("gsm8k", 2, [1, 4], [1, 4], 0, 1, 1, local_path=fixture, test_size=2)
    trainer = quiet_cpu_trainer(tmp_path, 2)
    before = module.policy.stop_head.weight.detach().clone()
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 and not torch.equal(module.policy.stop_head.weight, before)


def test_stage1_learning_rate_warms_up_then_falls_along_a_cosine_to_its_floor():
    from dlr.methods.schedule import warmup_cosine

    # warm-up of 2 steps to 1, then a cosine over steps 2..6 from 1 to the floor 0.2
    assert [warmup_cosine(s, 2, 6, 0.2) for s in (0, 1)] == [0.5, 1.0]
    assert warmup_cosine(2, 2, 6, 0.2) == pytest.approx(1.0)
    assert warmup_cosine(4, 2, 6, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)  # halfway: cos(pi/2) = 0
    assert warmup_cosine(6, 2, 6, 0.2) == pytest.approx(0.2)
    assert warmup_cosine(9, 2, 6, 0.2) == pytest.approx(0.2)  # after the last step it stays at the floor
    assert {warmup_cosine(s, 0, 6, 1.0) for s in range(8)} == {1.0}  # floor 1, no warm-up: constant


@pytest.mark.parametrize(
    ("override", "message"),
    [({"lr_floor": 0.0}, "lr_floor"), ({"self_feed": 1.5}, "self_feed"), ({"answer_chain": "gold"}, "answer_chain")],
)
def test_bad_stage1_schedules_fail_with_the_key_named(override, message):
    with pytest.raises(ValueError, match=message):
        settings_from_yaml(DLRSettings, "dlr", {"readout": "answer", "alignment": override})


def test_self_fed_distillation_reads_the_policy_s_own_latents_back_at_the_set_learning_rate(tiny_pair, tmp_path):
    """self_feed=1: the pass that trains reads back P(mu_t) of a first, gold-fed pass at every step,
    not the gold targets; the stage-1 optimizer runs at lr * warmup_cosine(step)."""
    from dlr.data.datamodule import ReasoningDataModule

    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            "readout": "answer",
            "latent": {"max_steps": 12, "dim": 8},
            "alignment": {"steps": 3, "init_from": None, "self_feed": 1.0, "warmup_steps": 2, "lr_floor": 0.5},
            "rl": {"steps": 0, "beta": 0.0},
            "max_new_tokens": {"rationale": 6, "answer": 2},
        },
    )
    module = build_module(tiny_pair, settings)
    fed_back, own_latents, lrs = [], [], []
    forward, align = module.policy.forward, module.alignment_step

    def recording_forward(ids, mask, fed, step_mask):
        dist = forward(ids, mask, fed, step_mask)
        fed_back.append(fed.detach().clone())
        if not torch.is_grad_enabled():  # the gold-fed pass: what the policy's own latents project to
            own_latents.append(module.projector(dist.mu))
        return dist

    def recording_step(records, optimizer):
        lrs.append(optimizer.param_groups[0]["lr"])
        align(records, optimizer)

    module.policy.forward, module.alignment_step = recording_forward, recording_step
    data = ReasoningDataModule("synthetic_math", 2, [1, 2], [1, 2], 0, 1, 1, test_size=2)
    quiet_cpu_trainer(tmp_path, 3).fit(module, datamodule=data)
    assert len(fed_back) == 6 and len(own_latents) == 3  # two passes per step: gold-fed, then self-fed
    for gold, own, self_fed in zip(fed_back[0::2], own_latents, fed_back[1::2], strict=True):
        assert torch.allclose(self_fed, own) and not torch.allclose(self_fed, gold)
    lr = settings.alignment.lr
    assert lrs == pytest.approx([0.5 * lr, lr, lr])  # warm-up over 2 steps, then the cosine's start


def test_the_forced_answer_term_reads_the_teacher_forced_chain_without_a_rollout(tiny_pair, tmp_path, monkeypatch):
    """answer_chain=forced: the main's answer NLL is taken after P(mu_1..T) of the teacher-forced pass
    (T = the gold chain's length, every row's span its own chain's length); the policy never rolls out."""
    from dlr.data.datamodule import ReasoningDataModule
    from dlr.methods import dlr_module

    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            "readout": "answer",
            "latent": {"max_steps": 40, "dim": 8},
            "alignment": {"steps": 2, "init_from": None, "answer_weight": 1.0, "answer_chain": "forced"},
            "rl": {"steps": 0, "beta": 0.0},
            "max_new_tokens": {"rationale": 6, "answer": 2},
        },
    )
    module = build_module(tiny_pair, settings)
    module.policy.mean_chain = lambda *args, **kwargs: pytest.fail("the forced answer term rolled the policy out")
    spans, nll = [], dlr_module.latent_target_nll

    def recording_nll(main, embeds, mask, target, target_mask):
        spans.append(mask.sum(1))  # real input positions per row: prompt + markers + the chain's latents
        return nll(main, embeds, mask, target, target_mask)

    monkeypatch.setattr(dlr_module, "latent_target_nll", recording_nll)
    batches = []
    gold = module.gold_chain_tokens
    module.gold_chain_tokens = lambda records: batches.append(records) or gold(records)
    data = ReasoningDataModule("synthetic_math", 2, [1, 3], [1, 3], 0, 1, 1, test_size=2)
    quiet_cpu_trainer(tmp_path, 2).fit(module, datamodule=data)
    assert len(spans) == len(batches) == 2
    for span, records in zip(spans, batches, strict=True):
        _, chain_mask = gold(records)  # [B, T]: one latent per gold-chain token
        zeros = torch.zeros(*chain_mask.shape, settings.latent.dim)[:, None]  # [B, 1, T, Dz]
        expected = module.main_inputs(records, zeros, chain_mask[:, None])[1].sum(1)
        assert torch.equal(span, expected)


def test_starting_as_the_assistant_s_text_chain_needs_one_shared_vocabulary(tiny_pair):
    import copy

    from dlr.config import reward_from_yaml
    from dlr.methods.dlr_module import DLRModule
    from dlr.models.backbones import ModelSpec, load_assistant, load_main, load_tokenizer

    settings = settings_from_yaml(DLRSettings, "dlr", {"readout": "answer", "rl": {"beta": 0.0}})
    assert settings.latent.init == "assistant"
    main_tokenizer = load_tokenizer(str(tiny_pair / "main"))
    other = copy.deepcopy(main_tokenizer)
    other.add_tokens(["<zzz>"])  # one token more: the assistant's next-token head no longer reads as the main's
    with pytest.raises(ValueError, match="method.latent.init=assistant"):
        DLRModule(
            load_main(ModelSpec(str(tiny_pair / "main"), quantization="nf4")),
            main_tokenizer,
            load_assistant(ModelSpec(str(tiny_pair / "assistant"))),
            other,
            PromptFormat(template="{question} answer :"),
            settings,
            reward_from_yaml(),
            "<lat>",
        )
