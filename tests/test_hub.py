"""Hub adapters on local fixtures in the releases' schemas, and the offline failure (no network needed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import compose_config, run_train
from dlr.config import check_settings
from dlr.data import hub
from dlr.data.hub import HUB_DATASETS, HubUnavailable, check_hub_dataset, stream_hub_records
from dlr.data.schema import MalformedRecord, Record, SkipCounter

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "data" / "fixtures"

GSM8K = [
    Record(
        "gsm8k-test-0",
        "math",
        "A baker makes 36 muffins and sells a third of them in the morning. How many muffins are left?",
        "She sells 36/3 = 12 muffins in the morning.\nSo 36 - 12 = 24 muffins are left.",
        "24",
        2,
        "gsm8k",
    ),
    Record(
        "gsm8k-test-1",
        "math",
        "A school buys 25 boxes of pencils with 48 pencils in each box. It buys 3 times as many erasers as "
        "pencils. How many pencils and erasers does it buy in total?",
        "The school buys 25 * 48 = 1200 pencils.\nIt buys 1200 * 3 = 3600 erasers.\n"
        "In total it buys 1200 + 3600 = 4800 pencils and erasers.",
        "4800",
        3,
        "gsm8k",
    ),
    Record(
        "gsm8k-test-2",
        "math",
        "Tom has 15 marbles and finds 7 more. How many marbles does Tom have now?",
        "Tom has 15 + 7 = 22 marbles now.",
        "22",
        1,
        "gsm8k",
    ),
    Record(
        "gsm8k-test-4",
        "math",
        "A garden has 4 rows of 9 tulips. Each tulip costs $2. Mia pays with a $100 bill. How much change "
        "does she get?",
        "There are 4 * 9 = 36 tulips.\nThey cost 36 * 2 = $72.\nHer change is 100 - 72 = $28.",
        "28",
        3,
        "gsm8k",
    ),
    Record(
        "gsm8k-test-5",
        "math",
        "A train travels 60 miles per hour for 2 hours. How far does it go?",
        "Distance is speed times time.\nIt goes 60 * 2 = 120 miles.",
        "120",
        2,
        "gsm8k",
    ),
]

MATH500 = [
    Record(
        "test/prealgebra/9001.json",
        "math",
        "What is the value of $\\frac{3}{4} + \\frac{1}{8}$?",
        "Writing both fractions over $8$, we get $\\frac{6}{8} + \\frac{1}{8} = \\frac{7}{8}$.",
        "\\frac{7}{8}",
        1,
        "math500",
    ),
    Record(
        "test/algebra/9002.json",
        "math",
        "Solve for $x$: $3x - 7 = 11$.",
        "Adding $7$ to both sides gives $3x = 18$. Dividing by $3$, we find $x = 6$.",
        "6",
        2,
        "math500",
    ),
    Record(
        "test/number_theory/9003.json",
        "math",
        "How many positive divisors does $36$ have?",
        "Since $36 = 2^2 \\cdot 3^2$, it has $(2+1)(2+1) = 9$ positive divisors.",
        "9",
        3,
        "math500",
    ),
    Record(
        "test/intermediate_algebra/9005.json",
        "math",
        'Which is larger, $2^{10}$ or $10^3$? Enter "A" for $2^{10}$ or "B" for $10^3$.',
        "We have $2^{10} = 1024$ and $10^3 = 1000$. Since $1024 > 1000$, the answer is $\\text{A}$.",
        "\\text{A}",
        4,
        "math500",
    ),
    Record(
        "test/counting_and_probability/9006.json",
        "math",
        "In how many ways can $5$ different books be put on a shelf so that two particular books are not "
        "next to each other?",
        "There are $5! = 120$ orders in all. Gluing the two books into one block gives $4! \\cdot 2 = 48$ "
        "orders with them together. So $120 - 48 = 72$ orders keep them apart.",
        "72",
        5,
        "math500",
    ),
]

ASK = "Is the following statement true or false?"
PRONTOQA = [
    Record(
        "ProntoQA_1",
        "logic",
        f"Every blorpus is bright. Kelpuses are not bright. Rex is a blorpus. {ASK} Rex is bright.",
        "Rex is a blorpus. Every blorpus is bright. Rex is bright.",
        "true",
        1,
        "prontoqa",
    ),
    Record(
        "ProntoQA_2",
        "logic",
        "Each fimpus is a morpus. Morpuses are not cold. Every tarpus is cold. Fimpuses are loud. Nia is a fimpus. "
        f"{ASK} Nia is cold.",
        "Nia is a fimpus. Each fimpus is a morpus. Nia is a morpus. Morpuses are not cold. Nia is not cold.",
        "false",
        2,
        "prontoqa",
    ),
    Record(
        "ProntoQA_3",
        "logic",
        "Zelpuses are quipuses. Every quipus is an orpus. Sornpuses are shiny. Each orpus is not shiny. "
        f"Every zelpus is sour. Oli is a zelpus. {ASK} Oli is not shiny.",
        "Oli is a zelpus. Zelpuses are quipuses. Oli is a quipus. Every quipus is an orpus. Oli is an orpus. "
        "Each orpus is not shiny. Oli is not shiny.",
        "true",
        3,
        "prontoqa",
    ),
    Record(
        "ProntoQA_4",
        "logic",
        "Every gimpus is a lumpus. Lumpuses are dampuses. Dampuses are kind. Every vexpus is not a dampus. "
        f"Pam is a gimpus. {ASK} Pam is a dampus.",
        "Pam is a gimpus. Every gimpus is a lumpus. Pam is a lumpus. Lumpuses are dampuses. Pam is a dampus.",
        "true",
        2,
        "prontoqa",
    ),
    Record(
        "ProntoQA_6",
        "logic",
        "Yelpuses are small. Every yelpus is a nompus. Each nompus is loud. Nompuses are rispuses. Every tivpus "
        "is wooden. Rispuses are vampuses. Each vampus is dull. Every vampus is a culpus. Culpuses are not "
        f"wooden. Culpuses are harpuses. Sam is a yelpus. {ASK} Sam is wooden.",
        "Sam is a yelpus. Every yelpus is a nompus. Sam is a nompus. Nompuses are rispuses. Sam is a rispus. "
        "Rispuses are vampuses. Sam is a vampus. Every vampus is a culpus. Sam is a culpus. Culpuses are not "
        "wooden. Sam is not wooden.",
        "false",
        5,
        "prontoqa",
    ),
]

CASES = {
    "gsm8k": (GSM8K, {"no final answer line": 1, "unparsable gold answer": 1}),
    "math500": (MATH500, {"empty answer": 1, "bad difficulty level": 1}),
    "prontoqa": (PRONTOQA, {"unprovable query": 1, "unparsable gold answer": 1}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_local_fixture_streams_the_expected_records_and_counts_skips(name: str) -> None:
    expected, skips = CASES[name]
    skipped = SkipCounter()
    records = list(stream_hub_records(name, "test", skipped, local_path=str(FIXTURES / f"{name}.jsonl")))
    assert records == expected
    assert dict(skipped.by_reason) == skips


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapters_are_pure_functions_of_the_row(name: str) -> None:
    """The adapter alone, on the raw JSON rows, gives what the `datasets` streaming path gives."""
    rows = [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]
    adapted, reasons = [], []
    for index, row in enumerate(rows):
        try:
            adapted.append(HUB_DATASETS[name].adapt(row, f"test-{index}"))
        except MalformedRecord as err:
            reasons.append(str(err).split(":")[0])
    expected, skips = CASES[name]
    assert adapted == expected
    assert sorted(reasons) == sorted(skips)


def test_gsm8k_cot_drops_calculator_annotations_and_keeps_the_worked_text() -> None:
    row = {
        "question": "How many?",
        "answer": "Half of 48 is 48/2 = <<48/2=24>>24.\n\nThen 24 + 48 = <<24+48=72>>72.\n#### 72",
    }
    record = hub.adapt_gsm8k(row, "train-3")
    assert (record.cot, record.answer, record.depth, record.id) == (
        "Half of 48 is 48/2 = 24.\nThen 24 + 48 = 72.",
        "72",
        2,
        "gsm8k-train-3",
    )


def test_math500_unwraps_nested_boxes_and_rejects_unbalanced_ones() -> None:
    row = {
        "problem": "p",
        "solution": "So $x = \\boxed{\\frac{1}{2}}$.",
        "answer": "\\frac{1}{2}",
        "subject": "Algebra",
        "level": 2,
        "unique_id": "test/algebra/1.json",
    }
    assert hub.adapt_math500(row, "test-0").cot == "So $x = \\frac{1}{2}$."
    with pytest.raises(MalformedRecord, match="unbalanced"):
        hub.adapt_math500({**row, "solution": "So $x = \\boxed{\\frac{1}{2}$."}, "test-0")


def test_prontoqa_gold_that_contradicts_the_context_is_malformed() -> None:
    row = {
        "id": "ProntoQA_9",
        "context": "Every wumpus is red. Max is a wumpus.",
        "options": ["A) True", "B) False"],
        "question": f"{ASK} Max is red.",
        "answer": "B",
        "raw_logic_programs": [],
    }
    with pytest.raises(MalformedRecord, match="contradicts"):
        hub.adapt_prontoqa(row, "validation-0")
    assert hub.adapt_prontoqa({**row, "answer": "A"}, "validation-0").answer == "true"


def test_unknown_name_or_split_is_a_clear_value_error() -> None:
    for call in (
        lambda: stream_hub_records("gsm9k", "test", SkipCounter()),
        lambda: check_hub_dataset("gsm9k", "test"),
    ):
        with pytest.raises(ValueError, match="unknown hub dataset 'gsm9k'; valid names: gsm8k, math500, prontoqa"):
            call()
    with pytest.raises(ValueError, match=r"has splits \['test'\], got 'train'"):
        check_hub_dataset("math500", "train")


def test_check_on_a_local_file_returns_its_first_valid_record(tmp_path: Path) -> None:
    assert check_hub_dataset("math500", "test", local_path=str(FIXTURES / "math500.jsonl")) == MATH500[0]
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps({"question": "q", "answer": "no gold here"}) + "\n")
    with pytest.raises(ValueError, match="no valid records"):
        check_hub_dataset("gsm8k", "test", local_path=str(only_bad))


def _assert_readable_offline_error(message: str, hub_id: str) -> None:
    assert "\n" not in message  # one paragraph
    for part in (
        hub_id,
        "could not be reached",
        "data=synthetic_math",
        "data=synthetic_logic",
        "data=mixed",
        "data.train_path=/path/to/train.jsonl data.test_path=/path/to/test.jsonl",
    ):
        assert part in message


def test_unreachable_hub_fails_at_start_with_one_readable_paragraph() -> None:
    """Whatever this machine's state (no network, or HF_HUB_OFFLINE=1), a hub dataset fails fast."""
    start = time.monotonic()
    try:
        check_hub_dataset("gsm8k", "test")
    except HubUnavailable as err:
        elapsed = time.monotonic() - start
        assert err.__cause__ is None and err.__suppress_context__  # raised `from None`: no chained traceback
        _assert_readable_offline_error(str(err), "openai/gsm8k")
        assert elapsed < 15, f"offline failure took {elapsed:.1f} s"
    else:
        pytest.skip("the hub (or a cached copy) is reachable here: the offline path is not exercised")


def test_offline_mode_with_an_empty_cache_fails_with_the_same_message(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 skips the probe, so this exercises the `datasets` error path on any machine."""
    script = (
        "from dlr.data.hub import check_hub_dataset, HubUnavailable\n"
        "try:\n    check_hub_dataset('prontoqa', 'validation')\n"
        "except HubUnavailable as err:\n    print(err)\n"
    )
    cache = {key: str(tmp_path / key) for key in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE")}
    env = {**os.environ, **cache, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    _assert_readable_offline_error(result.stdout.strip(), "renma/ProntoQA")
    assert "HF_HUB_OFFLINE=1 is set and the cache has no copy" in result.stdout


def test_package_imports_without_datasets() -> None:
    script = "import sys\nsys.modules['datasets'] = None\nimport dlr.data.hub\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- the training stream: a seeded order per epoch, sharded by rank, resumable ---------------------------

GSM8K_FIXTURE = str(FIXTURES / "gsm8k.jsonl")


def gsm8k_datamodule(train_seed: int, batch_size: int = 2):
    """The GSM8K fixture as data=gsm8k reads it: its first record is the test set, the other four valid
    records (gsm8k-train-1, -2, -4, -5; rows 3 and 6 are malformed) the training split."""
    from dlr.data.datamodule import ReasoningDataModule

    return ReasoningDataModule(
        source="gsm8k",
        batch_size=batch_size,
        train_depths=[1, 4],
        eval_depths=[1, 8],
        train_seed=train_seed,
        test_seed=1000,
        test_per_depth=1,
        train_split="train",
        test_split="test",
        local_path=GSM8K_FIXTURE,
        test_size=1,
    )


def test_epoch_order_is_a_permutation_drawn_from_the_seed_and_the_epoch():
    from dlr.data.datamodule import epoch_order

    assert [epoch_order(4, 0, e) for e in range(3)] == [[3, 2, 0, 1], [2, 1, 0, 3], [0, 2, 1, 3]]
    assert epoch_order(4, 1, 0) == [0, 2, 1, 3]
    assert sorted(epoch_order(7473, 5, 2)) == list(range(7473))  # GSM8K's training split, every record once


def test_gsm8k_training_order_differs_between_seeds_and_epochs():
    """Before, every seed read the hub stream in file order (1, 2, 4, 5, 1, 2, ...)."""
    orders = {}
    for seed in (0, 1):
        datamodule = gsm8k_datamodule(seed)
        datamodule.setup()
        stream = datamodule.train_stream
        orders[seed] = [stream.record_at(i).id.removeprefix("gsm8k-train-") for i in range(8)]
    assert orders[0] == ["5", "4", "1", "2", "4", "2", "1", "5"]
    assert orders[1] == ["1", "4", "2", "5", "2", "4", "1", "5"]
    for order in orders.values():  # each epoch visits every training record once
        assert sorted(order[:4]) == sorted(order[4:]) == ["1", "2", "4", "5"]
    assert datamodule.skip_counts()["train"] == {
        "question is in the test set": 1,
        "no final answer line": 1,
        "unparsable gold answer": 1,
    }


def test_ranks_read_disjoint_shards_of_each_epoch():
    from dlr.data.datamodule import HubStream

    test_questions = frozenset(r.question for r in gsm8k_datamodule(0).test_records())
    ranks = [HubStream("gsm8k", "train", GSM8K_FIXTURE, 3, rank, 2, test_questions) for rank in (0, 1)]
    for epoch in range(3):  # 2 records per rank and epoch
        shards = [{ranks[r].record_at(2 * epoch + i).id for i in range(2)} for r in (0, 1)]
        assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 4


def test_a_resumed_gsm8k_stream_goes_on_where_it_stopped():
    """As Lightning uses it: the loader fetches one batch ahead, so the state saved after training on batch
    k holds the position after batch k, and the resumed stream's first batch is batch k + 1."""
    uninterrupted = iter(gsm8k_datamodule(0).train_dataloader())
    expected = [[r.id for r in next(uninterrupted)] for _ in range(5)]

    first = gsm8k_datamodule(0)
    loader = iter(first.train_dataloader())
    for _ in range(3):  # trains on batches 0-2 while fetching 1-3
        first.on_before_batch_transfer(next(loader), 0)
    next(loader)  # batch 3: fetched ahead, never trained on
    state = first.state_dict()
    assert state == {"next_index": 6}  # 3 batches of 2

    resumed = gsm8k_datamodule(0)
    resumed.load_state_dict(state)
    loader = iter(resumed.train_dataloader())
    assert [[r.id for r in next(loader)] for _ in range(2)] == expected[3:]


# --- local files: one per split, or one for both; the checks at start (issue 37 item 1) -------------------

TRAIN_FIXTURE, TEST_FIXTURE = str(FIXTURES / "gsm8k_train.jsonl"), str(FIXTURES / "gsm8k_test.jsonl")


def local_gsm8k(**files):
    """data=gsm8k as composed, with the local files `files` (train_path, test_path or local_path)."""
    from dlr.data.datamodule import ReasoningDataModule

    return ReasoningDataModule("gsm8k", 2, [1, 4], [1, 8], 0, 1000, 1, train_split="train", test_split="test", **files)


def test_train_path_and_test_path_read_a_file_each():
    datamodule = local_gsm8k(train_path=TRAIN_FIXTURE, test_path=TEST_FIXTURE)
    test_questions = [json.loads(line)["question"] for line in Path(TEST_FIXTURE).read_text().splitlines()]
    assert [r.question for r in datamodule.test_records()] == test_questions  # test_size 200: the whole file
    datamodule.check_source()
    datamodule.check_training_data()
    datamodule.setup()
    trained = {datamodule.train_stream.record_at(i).id for i in range(12)}
    assert trained == {f"gsm8k-train-{i}" for i in range(6)}  # every training record, no test one


@pytest.mark.parametrize("key", ["train_path", "test_path", "local_path"])
def test_a_missing_local_file_fails_naming_its_key(key):
    files = {"train_path": TRAIN_FIXTURE, "test_path": TEST_FIXTURE} if key != "local_path" else {}
    with pytest.raises(ValueError, match=f"^data.{key}=missing.jsonl: no such file"):
        local_gsm8k(**{**files, key: "missing.jsonl"})


def test_local_path_beside_a_file_per_split_is_refused():
    with pytest.raises(ValueError, match="data.local_path serves both splits: set it alone"):
        local_gsm8k(local_path=GSM8K_FIXTURE, train_path=TRAIN_FIXTURE)


def test_a_test_size_that_takes_every_record_fails_before_any_model_loads(tmp_path):
    """The issue's command: one file of 5 valid records and test_size 200 left nothing to train on, and the
    run died after loading both models with "split 'train' has no valid records for rank 0"."""
    overrides = ["data=gsm8k", f"data.local_path={GSM8K_FIXTURE}", f"paths.output_dir={tmp_path}"]
    with pytest.raises(SystemExit) as err:
        check_settings(compose_config(["experiment=grpo", *overrides]))
    assert str(err.value) == (
        f"error: data.test_size=200 takes all 5 valid records of data.local_path={GSM8K_FIXTURE} for the test set, "
        "leaving none to train on: lower data.test_size, or give the training records a file of their own with "
        "data.train_path and data.test_path"
    )
    check_settings(compose_config(["experiment=grpo", *overrides, "data.test_size=2"]))  # 3 records to train on
    check_settings(compose_config(["experiment=eval_tiny", *overrides]))  # evaluation reads only the test set


def test_a_missing_file_stops_train_py_with_one_line(tmp_path):
    result = run_train(
        ["experiment=grpo", "data=gsm8k", "data.local_path=my_gsm8k.jsonl", f"hydra.run.dir={tmp_path}"], timeout=120
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.local_path=my_gsm8k.jsonl: no such file")
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stderr


def readme_offline_gsm8k_command() -> list[str]:
    """The arguments of the README's offline GSM8K command, as a user copies it."""
    readme = " ".join((ROOT / "README.md").read_text().split())  # the command may wrap across lines
    commands = [c for c in re.findall(r"`python src/train\.py ([^`]*)`", readme) if "data.train_path=" in c]
    assert len(commands) == 1, commands
    return commands[0].split()


def test_the_readme_offline_gsm8k_command_trains(tmp_path):
    """As written (but 2 steps at small sizes, for the CPU): it trains on the training file and tests on the
    test file."""
    args = readme_offline_gsm8k_command()
    assert args[:2] == ["experiment=grpo", "data=gsm8k"] and "trainer.max_steps=3" in args
    small = [
        "backbone.grpo_scale.num_generations=2",
        "backbone.grpo_scale.questions_per_batch=2",
        "backbone.grpo_scale.max_new_tokens=8",
        "eval.max_new_tokens=8",
        "trainer.enable_progress_bar=false",
    ]
    args = [arg.replace("trainer.max_steps=3", "trainer.max_steps=2") for arg in args]
    result = run_train([*args, *small, f"hydra.run.dir={tmp_path}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())["scores"]
    tested = {i for score in scores if score["model"] == "grpo/cot" for i in score["ids"]}
    assert tested == {"gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2"}  # the test file's three records
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
