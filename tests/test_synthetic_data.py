"""Procedural generators: deterministic, gold answers right (recomputed independently), depth honest,
streams seeded per rank, test set fixed and disjoint from training."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from dlr.data import synthetic_logic, synthetic_math
from dlr.data.datamodule import ProceduralSpec, ReasoningDataModule, fixed_test_set, procedural_record
from dlr.models.tiny import build_tokenizer

GAIN_VERBS = {"gets", "finds", "buys", "wins"}
LOSS_VERBS = {"gives", "loses", "sells", "drops"}


def solve_math(question: str) -> tuple[int, int]:
    """Independent solver: read the start count and each gain/loss clause; return (answer, steps)."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    value = int(re.fullmatch(r"\w+ has (\d+) \w+", sentences[0]).group(1))
    steps = 0
    for sentence in sentences[1:]:
        words = sentence.split()
        if len(words) >= 3 and words[1] in GAIN_VERBS | LOSS_VERBS:
            amount = int(words[2])
            value += amount if words[1] in GAIN_VERBS else -amount
            steps += 1
    return value, steps


def solve_logic(question: str) -> tuple[str, int]:
    """Independent solver: breadth-first search over the rules from the person's concept."""
    body, query = question.split("true or false :")
    person, target = re.fullmatch(r"\s*(\w+) is a (\w+) \.\s*", query).groups()
    edges: dict[str, list[tuple[str, bool]]] = {}
    start = None
    for sentence in (s.strip() for s in body.split(".") if s.strip()):
        rule = re.fullmatch(r"every (\w+) is (not )?a (\w+)", sentence)
        if rule:
            edges.setdefault(rule.group(1), []).append((rule.group(3), rule.group(2) is None))
        else:
            start = re.fullmatch(rf"{person} is a (\w+)", sentence).group(1)
    frontier, hops = [start], 0
    seen = {start}
    while frontier:
        hops += 1
        nxt = []
        for concept in frontier:
            for child, positive in edges.get(concept, []):
                if child == target:
                    return ("true" if positive else "false"), hops
                if positive and child not in seen:
                    seen.add(child)
                    nxt.append(child)
        frontier = nxt
    raise AssertionError("query not provable")


@pytest.mark.parametrize("depth", range(1, 9))
def test_math_gold_answer_and_depth_are_right(depth):
    rng = random.Random(depth)
    for i in range(200):
        record = synthetic_math.generate(rng, depth, i, "t")
        answer, steps = solve_math(record.question)
        assert (str(answer), steps, record.depth) == (record.answer, depth, depth)
        assert 0 <= answer <= synthetic_math.MAX_VALUE
        assert record.cot.count("=") == depth and record.cot.endswith(f"= {record.answer} .")


@pytest.mark.parametrize("depth", range(1, 9))
def test_logic_gold_answer_and_depth_are_right(depth):
    rng = random.Random(depth)
    answers = set()
    for i in range(200):
        record = synthetic_logic.generate(rng, depth, i, "t")
        answer, hops = solve_logic(record.question)
        assert (answer, hops, record.depth) == (record.answer, depth, depth)
        assert record.cot.count("every") == depth  # the proof cites one rule per hop
        answers.add(answer)
    assert answers == {"true", "false"}


def test_logic_answer_needs_the_chain():
    """The query concept appears in two rules with opposite polarity, so no single rule gives the answer."""
    record = synthetic_logic.generate(random.Random(0), 3, 0, "t")
    query = record.question.split("true or false :")[1].split()[-2]
    polarities = {
        ("not a " + query) in s for s in record.question.split(".") if s.strip().endswith(query) and "every" in s
    }
    assert polarities == {True, False}


def logic_rules(question: str) -> list[tuple[str, bool, str]]:
    """(subject, positive, object) of every rule in a logic question."""
    body = question.split("true or false :")[0]
    found = (re.fullmatch(r"every (\w+) is (not )?a (\w+)", s.strip()) for s in body.split("."))
    return [(m.group(1), m.group(2) is None, m.group(3)) for m in found if m]


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_extra_distractors_add_rules_off_the_proof_that_break_both_shortcuts(depth):
    """Same draw with and without extras: the same problem, proof and answer, plus 2-5 rules "every x is
    (not) a y" with x on no chain; y is the query for half of them (negated half of those; no other rule
    is, as in the test set). Forward shortcut: the first hop's object is the only object other than the
    query (plain: always at depth 1, in half of depth 2). Backward: few rules mention the query (plain: 2)."""
    added, copyable, copyable_plain, about_query = [], 0, 0, Counter()
    for i in range(200):
        plain = synthetic_logic.generate(random.Random(f"{depth}:{i}"), depth, i, "t")
        record = synthetic_logic.generate(random.Random(f"{depth}:{i}"), depth, i, "t", extra_distractors=(2, 5))
        assert (record.cot, record.answer) == (plain.cot, plain.answer)
        assert solve_logic(record.question) == (record.answer, depth)
        rules, base = logic_rules(record.question), logic_rules(plain.question)
        extra = [rule for rule in rules if rule not in base]
        assert len(rules) == len(base) + len(extra)
        added.append(len(extra))
        query = record.question.split()[-2]
        concepts = {c for s, _, o in base for c in (s, o)}
        assert all(s not in concepts and o != s and (positive or o == query) for s, positive, o in extra)
        assert sum(o == query for _, _, o in base) == 2
        about_query.update(positive for _, positive, o in extra if o == query)
        first_object = logic_rules(record.cot)[0][2]
        copyable += {o for _, _, o in rules if o != query} <= {first_object}
        copyable_plain += {o for _, _, o in base if o != query} <= {first_object}
    assert set(added) == {2, 3, 4, 5}
    assert 0.4 < sum(about_query.values()) / sum(added) < 0.6 and 0.4 < about_query[False] / about_query.total() < 0.6
    assert copyable / 200 < 0.2 * copyable_plain / 200 + 0.05
    if depth == 2:  # plain: a distractor chain of 1 or 2 rules; with 1, the forward shortcut is right
        assert 0.4 < copyable_plain / 200 < 0.6


def test_no_extra_distractors_draws_what_the_generator_always_drew():
    """The default keeps the stream and the fixed test set every shipped number was measured on."""
    for depth in range(1, 9):
        for i in range(50):
            assert synthetic_logic.generate(random.Random(i), depth, i, "t") == synthetic_logic.generate(
                random.Random(i), depth, i, "t", extra_distractors=(0, 0)
            )
    spec = ProceduralSpec({"math": 0.5, "logic": 0.5}, 1, 8)
    assert [r.question for r in fixed_test_set(spec, 1000, 1) if r.task == "logic"][:2] == [
        "ola is a trax . every wug is a glim . every trax is not a glim . true or false : ola is a glim .",
        "vic is a plim . every quib is not a sorm . every plim is a quib . every wug is a sorm . "
        "true or false : vic is a sorm .",
    ]


def test_extra_distractors_reach_the_train_stream_only():
    """Depth 2: 2 proof rules and 1-2 distractor rules, plus 3 extras in training only."""
    dm = ReasoningDataModule("synthetic_logic", 8, (2, 2), (2, 2), 1, 2, 20, logic_extra_distractors=(3, 3))
    dm.setup()
    stream = iter(dm.train_stream)
    assert {len(logic_rules(next(stream).question)) for _ in range(40)} == {6, 7}
    assert {len(logic_rules(r.question)) for r in dm.test_records()} == {3, 4}


def test_generators_are_deterministic():
    spec = ProceduralSpec({"math": 0.5, "logic": 0.5}, 1, 4)
    first = [procedural_record(spec, 7, 0, i) for i in range(50)]
    assert first == [procedural_record(spec, 7, 0, i) for i in range(50)]
    assert first != [procedural_record(spec, 7, 1, i) for i in range(50)]  # ranks differ
    assert {r.task for r in first} == {"math", "logic"}
    assert {r.depth for r in first} == {1, 2, 3, 4}


def test_every_generated_word_is_in_the_tiny_vocabulary():
    tokenizer = build_tokenizer()
    spec = ProceduralSpec({"math": 0.5, "logic": 0.5}, 1, 8)
    for i in range(300):
        record = procedural_record(spec, 3, 0, i)
        ids = tokenizer(f"{record.question} {record.cot} #### {record.answer}").input_ids
        assert tokenizer.unk_token_id not in ids


def test_test_set_is_fixed_and_never_in_the_train_stream():
    dm = ReasoningDataModule(
        "mixed",
        16,
        (1, 2),
        (1, 3),
        train_seed=1,
        test_seed=2,
        test_per_depth=200,  # enough depth-1 problems that some of the 3000 drawn below collide
        mix_weights={"math": 0.5, "logic": 0.5},
    )
    test = dm.test_records()
    assert len(test) == 2 * 3 * 200 and test == fixed_test_set(dm.eval_spec, 2, 200)
    dm.setup()
    questions = {r.question for r in test}
    stream = iter(dm.train_stream)
    train = [next(stream) for _ in range(3000)]
    assert not questions & {r.question for r in train}
    assert dm.train_stream.skipped.total > 0  # depth-1 problems do collide and are dropped


def test_stream_resumes_after_the_last_batch_trained_on():
    """Lightning prefetches a batch; the saved position is that of the batches actually used."""
    dm = ReasoningDataModule("synthetic_math", 4, (1, 4), (1, 4), 1, 2, 2)
    batches = iter(dm.train_dataloader())
    for _ in range(3):
        dm.on_before_batch_transfer(next(batches), 0)
    expected = next(batches)  # fetched ahead, not yet trained on
    state = dm.state_dict()
    fresh = ReasoningDataModule("synthetic_math", 4, (1, 4), (1, 4), 1, 2, 2)
    fresh.load_state_dict(state)
    assert next(iter(fresh.train_dataloader())) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "nope"}, "data.source"),
        ({"batch_size": 0}, "batch_size"),
        ({"train_depths": (3, 1)}, "min_depth"),
        ({"logic_extra_distractors": (3, 1)}, "logic_extra_distractors"),
        ({"logic_extra_distractors": (0, 16)}, "logic_extra_distractors"),  # depth 4 leaves 15 concepts
        ({"logic_extra_distractors": (2,)}, "logic_extra_distractors"),
        ({"source": "gsm8k", "logic_extra_distractors": (1, 2)}, "logic_extra_distractors"),
    ],
)
def test_bad_data_config_names_the_key(kwargs, message):
    args = dict(
        source="mixed",
        batch_size=4,
        train_depths=(1, 4),
        eval_depths=(1, 8),
        train_seed=1,
        test_seed=2,
        test_per_depth=2,
        mix_weights={"math": 1.0},
    )
    with pytest.raises(ValueError, match=message):
        ReasoningDataModule(**{**args, **kwargs})
