"""Warm start and evaluation: SFT batches mask the prompt, batched generation equals one-by-one,
tables are right, and `experiment=warmstart_tiny` runs end to end and writes its table."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from conftest import run_train
from dlr.data.schema import Record
from dlr.methods.warmstart_module import encode_sft_batch, sft_completion
from dlr.models.backbones import PromptFormat
from dlr.models.generation import greedy_complete
from dlr.models.tiny import build_tokenizer
from dlr.scoring import DepthScore, completion_prefix, depth_table

RECORD = Record(
    "r1",
    "math",
    "ana has 7 pens . ana gets 2 more . how many pens does ana have now ?",
    "gets 2 : 7 + 2 = 9 .",
    "9",
    1,
    "synthetic_math",
)


def test_sft_completion_wraps_reasoning_in_the_latent_markers():
    fmt = PromptFormat()
    assert sft_completion(RECORD, fmt, "<eos>", True) == "<bol> gets 2 : 7 + 2 = 9 . <eol> #### 9 <eos>"
    assert sft_completion(RECORD, fmt, "<eos>", False) == "<bol> <eol> #### 9 <eos>"
    assert completion_prefix(fmt, "direct") == " <bol> <eol> ####" and completion_prefix(fmt, "cot") == ""


def test_sft_batch_is_right_padded_and_labels_only_the_completion():
    tokenizer = build_tokenizer()
    ids, mask, labels = encode_sft_batch(
        ["<bos> ana has", "<bos> ana"], ["#### 9 <eos>", "#### 10 <eos>"], tokenizer, 32
    )
    t = tokenizer.convert_tokens_to_ids
    assert ids.tolist() == [
        [t("<bos>"), t("ana"), t("has"), t("####"), t("9"), t("<eos>")],
        [t("<bos>"), t("ana"), t("####"), t("10"), t("<eos>"), t("<pad>")],
    ]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert labels.tolist() == [
        [-100, -100, -100, t("####"), t("9"), t("<eos>")],
        [-100, -100, t("####"), t("10"), t("<eos>"), -100],
    ]


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny_pair):
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_pair / "main")
    prompts = [
        "<bos> ana has 7 pens . answer :",
        "<bos> kai is a dax . every dax is a wug . true or false : kai is a wug . answer :",
    ]
    batched = greedy_complete(model, tokenizer, prompts, max_new_tokens=6)
    single = [greedy_complete(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single and all(len(s.split()) == 6 for s in single)  # untrained: never stops early


def test_depth_table_lays_out_accuracy_by_depth():
    scores = [
        DepthScore("main/cot", "math", 1, 10, 1.0, 1.0),
        DepthScore("main/cot", "math", 2, 10, 0.25, 1.0),
        DepthScore("main/cot", "logic", 1, 10, 0.5, 0.9),
    ]
    assert depth_table(scores).splitlines() == [
        "| depth | main/cot logic | main/cot math |",
        "|---|---|---|",
        "| 1 | 50% | 100% |",
        "| 2 | – | 25% |",
    ]


def test_warmstart_runs_end_to_end_and_writes_its_table(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        [
            "experiment=warmstart_tiny",
            "trainer.max_steps=3",
            "data.batch_size=8",
            "data.test_per_depth=1",
            "eval.max_new_tokens=4",
            "backbone.shapes.main.hidden_size=32",
            "backbone.shapes.main.num_hidden_layers=1",
            "backbone.shapes.assistant.hidden_size=32",
            "backbone.shapes.assistant.num_hidden_layers=1",
            "callbacks.depth_eval.every_n_steps=2",
            "callbacks.depth_eval.per_depth=1",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (run_dir / "eval.md").read_text()
    assert all(f"| {d} |" in table for d in range(1, 9))
    results = json.loads((run_dir / "eval.json").read_text())
    scores = results["scores"]
    assert set(results["skipped_records"]) == {"train", "test"}
    assert {(s["model"], s["task"]) for s in scores} == {
        (m, t) for m in ("main/cot", "main/direct", "assistant/cot", "assistant/direct") for t in ("math", "logic")
    }
    assert (run_dir / "config_resolved.yaml").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "backbone" / "main")
    assert saved.config.hidden_size == 32 and not torch.isnan(next(saved.parameters())).any()
    assert "step 2:" in result.stdout  # the periodic depth evaluation ran
