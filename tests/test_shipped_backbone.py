"""The committed tiny backbone: loadable offline, small, and as good as the README says where RL
needs it to be: in math, partly right at every depth the main job trains on and worse the deeper the
problem, so RL has in-distribution errors to fix (the testbed, issue 33)."""

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
    assert size <= 40 * 2**20


@pytest.fixture(scope="module")
def nf4_main():
    return load_main(ModelSpec(str(TINY / "main"), "nf4")), load_tokenizer(str(TINY / "main"))


LOGIC_GAP = (
    "known gap (issue 36): the tiny main answers logic at chance (about 50% at every depth); it takes shortcuts "
    "instead of looking each rule up by its subject"
)


def nf4_scores(nf4_main, task: str, depths: tuple[int, ...]) -> dict[int, float]:
    """Greedy accuracy by depth of the main's own text chain on a test set of our own seed (not the one in
    the README), 25 problems per depth: a fresh sample of what the README reports."""
    model, tokenizer = nf4_main
    records = [
        r for r in fixed_test_set(ProceduralSpec({task: 1.0}, 1, 8), seed=4242, per_depth=25) if r.depth in depths
    ]
    scores = evaluate_by_depth(model, tokenizer, PromptFormat(), records, label="main/cot", reward=reward_from_yaml())
    return {s.depth: s.accuracy for s in scores}


def test_shipped_main_in_nf4_leaves_math_room_at_every_trained_depth(nf4_main):
    """The testbed's bar (issue 33) on a fresh sample: between 20% and 85% at depths 1-6 (with 25 problems a
    depth, 2 problems of slack each way), and falling with depth."""
    scores = nf4_scores(nf4_main, "math", (1, 2, 5, 6))
    assert all(0.12 <= scores[d] <= 0.93 for d in scores), scores
    assert (scores[1] + scores[2]) / 2 >= (scores[5] + scores[6]) / 2 + 0.1, scores


@pytest.mark.xfail(strict=True, reason=LOGIC_GAP)
def test_shipped_main_in_nf4_reasons_in_logic(nf4_main):
    scores = nf4_scores(nf4_main, "logic", (1, 2))
    assert min(scores.values()) >= 0.65, scores


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
