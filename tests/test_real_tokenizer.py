"""The real-model path on the CPU with Qwen2.5's real byte-level tokenizer (issue 34): Qwen2 main and assistant
with random weights at the real vocabulary sizes (151,936 for the 0.5B and 1.5B, 152,064 for the 7B), 2 layers
of width 64, and the GSM8K fixture. Token ids are Qwen2.5-Instruct's (checked against its published vocabulary:
"system" 8948, "user" 872, "assistant" 77091, "\\n" 198, one token per digit)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose_config, run_train
from dlr.models.backbones import ModelSpec, PromptFormat, load_main, load_tokenizer, marker_token_id
from dlr.models.generation import eos_token_ids, greedy_complete
from dlr.models.readout import Readout, latent_main_inputs
from real_backbones import (
    BOX_END,
    BOX_START,
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN25_VOCAB,
    VISION_PAD,
    qwen25_tokenizer_folder,
    random_qwen2,
)

SYSTEM, USER, ASSISTANT, NEWLINE = 8948, 872, 77091, 198
WHAT_IS_2_PLUS_3 = [3838, 374, 220, 17, 10, 18, 30]  # "What is 2+3?": one token a digit
ASSISTANT_TURN = [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]  # closes the user turn, opens the assistant's
GSM8K_FIXTURE = str(ROOT / "data" / "fixtures" / "gsm8k.jsonl")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, Path]:
    """Qwen2.5's tokenizer, and random Qwen2 models saved as hub folders: the 1.5B and 7B mains, the 0.5B assistant."""
    root = tmp_path_factory.mktemp("qwen2.5")
    tokenizer = qwen25_tokenizer_folder(root / "tokenizer")
    return {
        "tokenizer": tokenizer,
        "main": random_qwen2(root / "main", tokenizer, QWEN25_VOCAB["1.5b"], seed=0),
        "assistant": random_qwen2(root / "assistant", tokenizer, QWEN25_VOCAB["0.5b"], seed=1),
        "main_7b": random_qwen2(root / "main_7b", tokenizer, QWEN25_VOCAB["7b"], seed=2),
    }


@pytest.fixture(scope="module")
def qwen_format() -> PromptFormat:
    return PromptFormat(**compose_config(["backbone=qwen2.5-0.5b+1.5b"]).backbone.prompt)


def test_the_tokenizer_reads_as_qwen25_instruct(qwen, qwen_format):
    tokenizer = load_tokenizer(str(qwen["tokenizer"]))
    assert len(tokenizer) == 151665  # ids 0..151664: Qwen2.5's, none of the later four
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", IM_END)
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side) == ("<|endoftext|>", ENDOFTEXT, "left")
    prompt = qwen_format.prompt("What is 2+3?", tokenizer)
    assert prompt == (
        f"<|im_start|>system\n{qwen_format.instruction}<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids[:3] == [IM_START, SYSTEM, NEWLINE]
    assert ids[-15:] == [IM_START, USER, NEWLINE, *WHAT_IS_2_PLUS_3, *ASSISTANT_TURN]


def test_latent_markers_and_placeholder_are_existing_qwen_tokens(qwen):
    tokenizer = load_tokenizer(str(qwen["tokenizer"]))
    backbone = compose_config(["backbone=qwen2.5-0.5b+1.5b"]).backbone
    markers = (backbone.prompt.bol, backbone.prompt.eol, backbone.placeholder)
    assert [marker_token_id(tokenizer, m) for m in markers] == [BOX_START, BOX_END, VISION_PAD]
    assert tokenizer("a<|box_start|>b", add_special_tokens=False).input_ids == [64, BOX_START, 65]  # one token in text


def test_both_end_of_turn_ids_end_a_completion(qwen):
    """Qwen2.5-Instruct's generation config ends a turn at <|im_end|> or <|endoftext|>."""
    tokenizer = load_tokenizer(str(qwen["main"]))
    for vocabulary in ("main", "main_7b"):
        main = load_main(ModelSpec(str(qwen[vocabulary]), "none"))
        assert eos_token_ids(main, tokenizer) == [ENDOFTEXT, IM_END]


def test_batches_are_left_padded_and_completions_carry_no_special_tokens(qwen, qwen_format):
    tokenizer = load_tokenizer(str(qwen["main"]))
    prompts = [qwen_format.prompt(q, tokenizer) for q in ("Tom has 15 marbles.", "Ravi has 9 stickers and gives 2.")]
    batch = tokenizer(prompts, padding=True, add_special_tokens=False)
    short, long = (len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts)
    pad = long - short
    assert pad > 0 and batch.input_ids[0][:pad] == [ENDOFTEXT] * pad and batch.attention_mask[0][:pad] == [0] * pad
    assert batch.input_ids[0][-1] == batch.input_ids[1][-1] == NEWLINE  # every row ends at "assistant\n"
    main = load_main(ModelSpec(str(qwen["main"]), "none"))
    texts = greedy_complete(main, tokenizer, prompts, max_new_tokens=6)
    assert len(texts) == 2 and not any("<|im_end|>" in t or "<|endoftext|>" in t for t in texts)


def test_the_latent_span_sits_in_the_user_turn_before_the_assistant_turn(qwen, qwen_format):
    """Rationale readout: `... question\\n<|box_start|> latents <|box_end|><|im_end|>\\n<|im_start|>assistant\\n`,
    so the main then writes its usual answer; every row's latents sit at the same columns of the left-padded batch."""
    tokenizer = load_tokenizer(str(qwen["main"]))
    main = load_main(ModelSpec(str(qwen["main"]), "none"))
    readout = Readout("rationale", qwen_format, max_new_tokens=16)
    questions = ["Tom has 15 marbles and finds 7 more. How many now?", "Ravi has 9 stickers."]
    before, after = readout.around_latents(questions[0], tokenizer)
    assert before.endswith(f"<|im_start|>user\n{questions[0]}\n<|box_start|>")
    assert tokenizer(after, add_special_tokens=False).input_ids == [BOX_END, *ASSISTANT_TURN]
    answer = Readout("answer", qwen_format, max_new_tokens=4)
    answer_before, answer_after = answer.around_latents(questions[0], tokenizer)
    assert answer_before.endswith("<|im_start|>assistant\n<|box_start|>") and answer_after == "<|box_end|> ####"

    T, width = 3, main.config.hidden_size
    projected = torch.randn(2, T, width)
    embeds, mask = latent_main_inputs(main, tokenizer, readout, questions, projected)
    latent_columns = slice(embeds.shape[1] - 6 - T, embeds.shape[1] - 6)  # the 6 tokens after the span close it
    assert torch.equal(embeds[:, latent_columns], projected)
    assert mask[:, latent_columns].all() and mask[1, 0] == 0 and mask[0].all()  # the shorter question is left-padded
    table = main.get_input_embeddings().weight
    assert torch.equal(embeds[:, latent_columns.start - 1], table[[BOX_START, BOX_START]])


def _tiny_sizes(arm: str) -> list[str]:
    """A couple of RL steps at tiny sizes (the real backbones' scales are GPU-hours)."""
    dlr = [
        "backbone.dlr_scale.latent_steps=2",
        "backbone.dlr_scale.latent_dim=8",
        "backbone.dlr_scale.num_samples=4",
        "backbone.dlr_scale.num_decoded=2",
        "backbone.dlr_scale.questions_per_batch=2",
        "backbone.dlr_scale.alignment_steps=1",
        "backbone.dlr_scale.answer_tokens=4",
    ]
    grpo = [
        "backbone.grpo_scale.num_generations=2",
        "backbone.grpo_scale.questions_per_batch=2",
        "backbone.grpo_scale.max_new_tokens=8",
        "backbone.grpo_scale.micro_batch_size=4",
    ]
    return {"dlr": dlr, "grpo": grpo, "both": dlr + grpo}[arm]


def _local_models(qwen, main: str = "main") -> list[str]:
    """The README's real-backbone commands, pointed at the local folders and the GSM8K fixture on the CPU."""
    return [
        f"backbone.main.name_or_path={qwen[main]}",
        f"backbone.assistant.name_or_path={qwen['assistant']}",
        f"data.local_path={GSM8K_FIXTURE}",
        "data.test_size=2",  # one local file is both splits: 2 test records, the other 3 train
        "trainer.accelerator=cpu",
        "eval.max_new_tokens=8",
        "eval.batch_size=4",
        "trainer.enable_progress_bar=false",
    ]


def test_the_gsm8k_comparison_runs_to_its_report(qwen, tmp_path):
    """`experiment=dlr_vs_grpo_gsm8k` as configured (NF4 main computing in bf16, chat template, the box markers) but
    on the CPU with float32 trainable parts and at tiny sizes: both arms train until a FLOPs budget of a couple of
    steps is spent, then the report."""
    run_dir = tmp_path / "run"
    result = run_train(
        [
            "experiment=dlr_vs_grpo_gsm8k",
            *_local_models(qwen),
            *_tiny_sizes("both"),
            "trainer.precision=32-true",
            "budget.kind=flops",
            "budget.amount=1e9",
            "method.seeds=[0]",
            "method.other_task=null",  # its ProntoQA needs the hub
            "method.samples_per_problem=0",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["experiment"] == "dlr_vs_grpo_gsm8k" and set(summary["arms"]) == {"dlr", "grpo"}
    for arm in summary["arms"].values():
        assert arm["spent"]["flops"][0] >= 1e9 and arm["spent"]["generated_tokens"][0] > 0
        assert arm["final_accuracy"]["interval_over"] == "1 seed x 2 problems"
    for name in ("dlr/seed_0/main_sha256.json", "grpo/seed_0/base_sha256.json"):
        assert json.loads((run_dir / name).read_text())["unchanged"]
    assert (run_dir / "report.md").read_text().startswith("#")
    assert not any("depth" in row["claim"] for row in summary["claims"])  # GSM8K trains on every step count


@pytest.mark.parametrize(
    ("arm", "backbone", "main"),
    [("dlr", "qwen2.5-0.5b+1.5b", "main"), ("dlr", "qwen2.5-0.5b+7b", "main_7b")],
)
def test_the_readmes_single_arm_commands_run(qwen, tmp_path, arm, backbone, main):
    """`python src/train.py experiment=ARM backbone=BACKBONE data=gsm8k trainer.precision=bf16-mixed`; the 7B main's
    vocabulary (152,064 rows) is larger than the assistant's (151,936), one tokenizer for both. GRPO's command is
    the resume test's."""
    result = run_train(
        [
            f"experiment={arm}",
            f"backbone={backbone}",
            "data=gsm8k",
            "trainer.precision=bf16-mixed",
            *_local_models(qwen, main),
            *_tiny_sizes(arm),
            "trainer.max_steps=2",
            f"hydra.run.dir={tmp_path}",
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())["scores"]
    assert {s["depth"] for s in scores} and all(s["n"] >= 1 for s in scores)


def test_a_resumed_gsm8k_run_goes_on_from_its_stream_position(qwen, tmp_path):
    """The README's GRPO command on the GSM8K fixture, checkpointed every step: the checkpoint holds the stream's
    position, and the run resumed from it ends one batch further on instead of restarting the stream at its first
    record."""
    common = [
        "experiment=grpo",
        "backbone=qwen2.5-0.5b+1.5b",
        "data=gsm8k",
        "trainer.precision=bf16-mixed",
        *_local_models(qwen),
        *_tiny_sizes("grpo"),
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    first = run_train([*common, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'first'}"], timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    position = lambda path: torch.load(path, weights_only=False, map_location="cpu")["ReasoningDataModule"]  # noqa: E731
    assert position(last) == {"next_index": 4}  # 2 steps of 2 questions
    resumed_dir = tmp_path / "resumed"
    resumed = run_train([*common, "trainer.max_steps=3", f"ckpt_path={last}", f"hydra.run.dir={resumed_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert position(resumed_dir / "checkpoints" / "last.ckpt") == {"next_index": 6}


@pytest.mark.parametrize(("backbone", "logits_before"), [("qwen2.5-0.5b+1.5b", 8 * 256), ("qwen2.5-0.5b+7b", 4 * 256)])
def test_gsm8k_budgets_leave_room_for_an_instruct_chain_in_the_same_logits_memory(backbone, logits_before):
    """512 tokens, over three times the longest gold GSM8K rationale measured with this tokenizer (164 tokens in
    53 test problems), for GRPO's completions, DLR's rationale decodes and the evaluation alike; the micro-batch
    halves so a micro-batch's fp32 logits (sequences x tokens x 152k) take the memory they took at 256."""
    cfg = compose_config(["experiment=dlr_vs_grpo_gsm8k", f"backbone={backbone}"])
    budget = cfg.backbone.grpo_scale.max_new_tokens
    assert budget == 512
    assert (
        cfg.eval.max_new_tokens == cfg.method.grpo.max_new_tokens == cfg.method.dlr.max_new_tokens.rationale == budget
    )
    assert cfg.method.grpo.micro_batch_size * budget == logits_before


def test_the_heldout_nll_scores_the_chat_completion_with_a_bounded_logits_memory(qwen, qwen_format):
    """Issue 34 items 2 and 6: the forgetting check scores GSM8K's gold solution as the instruct main writes it
    (its reasoning and `#### n` in the assistant turn, ended by `<|im_end|>`, no latent markers), and no pass
    computes logits for more than `eval.nll_logit_positions` positions of the 151936-token vocabulary."""
    from dlr.data.hub import adapt_gsm8k
    from dlr.data.schema import MalformedRecord
    from dlr.runner.compare import heldout_nll

    records = []
    for i, line in enumerate(Path(GSM8K_FIXTURE).read_text().splitlines()[:6]):  # its malformed rows are skipped
        with contextlib.suppress(MalformedRecord):
            records.append(adapt_gsm8k(json.loads(line), f"test:{i}"))
    assert len(records) >= 3
    tokenizer = load_tokenizer(str(qwen["tokenizer"]))
    completion = qwen_format.gold_completion(records[0].cot, records[0].answer, tokenizer.eos_token)
    assert completion.endswith(f"\n#### {records[0].answer}<|im_end|>") and "<|box_start|>" not in completion
    model = load_main(ModelSpec(name_or_path=str(qwen["main"])))
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, output: shapes.append(tuple(output.shape)))
    try:
        nll = heldout_nll((model, tokenizer), qwen_format, records, logit_positions=16)
    finally:
        hook.remove()
    assert all(len(shape) == 2 and shape[0] <= 16 and shape[1] == QWEN25_VOCAB["1.5b"] for shape in shapes)
    completions = [qwen_format.gold_completion(r.cot, r.answer, tokenizer.eos_token) for r in records]
    assert sum(shape[0] for shape in shapes) == sum(len(tokenizer(c).input_ids) for c in completions)
    assert 11.0 < nll < 13.0  # a random model: about log(151936) = 11.9 nats per token
