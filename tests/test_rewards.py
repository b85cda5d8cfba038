"""Reward package: extraction, normalisation, equivalence, format check, dual reward, time bounds."""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
import time
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import reward_from_yaml
from dlr.methods.losses import group_advantages
from dlr.rewards import (
    DEFAULT_FORMAT_PATTERN,
    TAGS_FORMAT_PATTERN,
    RewardBreakdown,
    extract_answer,
    extract_tagged_answer,
    format_ok,
    is_correct,
    latex_equivalent,
    normalize_answer,
    parse_bool,
    parse_number,
    score,
    score_batch,
    warm_up_verifier,
)

SLOW_LATEX = "9^{9^{9}}"  # sympy spends minutes comparing this with 1/2 (measured: >10 s)


@pytest.fixture(scope="module", autouse=True)
def verifier_ready():
    """Pay the math-verify worker start-up once, so per-call timings measure the calls."""
    assert warm_up_verifier()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# --- extraction ---------------------------------------------------------------------------------

EXTRACTION_CASES = [
    # (text, strict result, lenient result)
    ("7 + 5 = 12 . 12 - 3 = 9 . #### 9", "9", "9"),
    ("#### 72", "72", "72"),
    ("####72", "72", "72"),
    ("#### 1 then #### 2", "2", "2"),  # last marker wins
    ("#### 1\n#### 2\n", "2", "2"),
    ("#### 5 apples\nbye", "5", "5"),  # the answer leading the marker's line
    ("#### true", "true", "true"),
    ("#### 72.", "72", "72"),
    ("#### $\\frac{1}{2}$", "\\frac{1}{2}", "\\frac{1}{2}"),
    ("#### \\boxed{7}", "7", "7"),
    ("The answer is 42.", "42", "42"),
    ("so THE ANSWER IS: false", "false", "false"),
    ("The answer is 1. Wait, the answer is 3.", "3", "3"),  # last occurrence, same line
    ("The answer is $\\boxed{5}$.", "5", "5"),
    ("#### 8\nThe answer is 9", "8", "8"),  # `####` outranks "the answer is"
    ("The answer is 9 \\boxed{8}", "8", "8"),  # a box inside the answer line is unwrapped
    ("\\boxed{3} then \\boxed{4}", "4", "4"),  # last boxed
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\sqrt{\\frac{a}{b}}} end", "\\sqrt{\\frac{a}{b}}", "\\sqrt{\\frac{a}{b}}"),
    ("\\boxed{\\boxed{6}}", "6", "6"),
    ("\\boxed{1} and \\boxed{2", None, "2"),  # unbalanced last box: nothing strict
    ("\\boxed{", None, None),
    ("####", None, None),  # empty marker falls through ...
    ("The answer is 4\n####   ", "4", "4"),  # ... to the next rule
    # instruct models' closing phrasings (issue 34)
    ("The final answer is 18.", "18", "18"),
    ("the answer is: 18 dollars", "18", "18"),  # the leading number of a line with a unit
    ("#### **18**", "18", "18"),  # markdown bold around the answer
    ("Answer: 18", "18", "18"),
    ("So 6 + 12 = 18.\n**Final Answer:** 18", "18", "18"),
    ("**Final Answer**: 18", "18", "18"),
    ("Answer: **true**", "true", "true"),
    ("my answer: 18", None, "18"),  # "answer:" only counts where it opens a line
    ("", None, None),
    ("no answer here", None, None),
    ("we get 3 and then 1,250.5 total", None, "1,250.5"),  # lenient: last number
    ("profit is -3 dollars", None, "-3"),
    ("٧٢", None, None),  # unicode digits are not numbers, not even leniently
]


@pytest.mark.parametrize("text, strict, lenient", EXTRACTION_CASES)
def test_extract_answer(text, strict, lenient):
    assert extract_answer(text) == strict
    assert extract_answer(text, lenient=True) == lenient


# --- normalisation ------------------------------------------------------------------------------

NORMALIZATION_CASES = [
    ("1,000", "1000", Fraction(1000)),
    ("1,234,567.5", "1234567.5", Fraction(2469135, 2)),
    ("$72", "72", Fraction(72)),
    ("72.0", "72", Fraction(72)),
    ("72.00", "72", Fraction(72)),
    ("  72 ", "72", Fraction(72)),
    ("72.", "72", Fraction(72)),
    ("-3", "-3", Fraction(-3)),
    ("+3", "+3", Fraction(3)),
    ("0.5", "0.5", Fraction(1, 2)),
    (".5", ".5", Fraction(1, 2)),
    ("3/4", "3/4", Fraction(3, 4)),
    ("-6/8", "-6/8", Fraction(-3, 4)),
    ("50%", "50", Fraction(50)),
    ("50\\%", "50", Fraction(50)),
    ("$\\frac{1}{2}$", "\\frac{1}{2}", None),
    ("1,00", "1,00", None),  # malformed thousands group stays as written
    ("1/0", "1/0", None),
    ("1_000", "1_000", None),  # Python's int() would accept this; we do not
    ("٧٢", "٧٢", None),  # Arabic-Indic digits: int("٧٢") == 72, but not a number here
    ("７２", "７２", None),  # fullwidth digits
    ("1e3", "1e3", None),
    ("", "", None),
]


@pytest.mark.parametrize("raw, normal, number", NORMALIZATION_CASES)
def test_normalize_and_parse_number(raw, normal, number):
    assert normalize_answer(raw) == normal
    assert parse_number(raw) == number


def test_parse_bool():
    assert [parse_bool(s) for s in ("true", "False", " TRUE. ", "yes", "no", "1", "")] == [
        True,
        False,
        True,
        None,
        None,
        None,
        None,
    ]


# --- equivalence --------------------------------------------------------------------------------

EQUIVALENCE_CASES = [
    # (pred, gold, task, expected)
    ("72", "72", "math", True),
    ("72.0", "72", "math", True),
    ("$72", "72", "math", True),
    ("1,000", "1000", "math", True),
    ("-3", "-3", "math", True),
    ("-3", "3", "math", False),
    ("71", "72", "math", False),
    ("0.5", "1/2", "math", True),
    ("3/4", "0.75", "math", True),
    ("٧٢", "72", "math", False),  # unicode digits never match
    ("seventy-two", "72", "math", False),
    ("72 apples", "72", "math", True),  # math-verify reads the number out of the words
    ("\\frac{1}{2}", "0.5", "math", True),
    ("0.5", "\\frac{1}{2}", "math", True),
    ("\\frac12", "\\frac{1}{2}", "math", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", "math", True),
    ("2^{1/2}", "\\sqrt{2}", "math", True),
    ("1+x", "x+1", "math", True),
    ("\\frac{1}{3}", "\\frac{1}{2}", "math", False),
    ("\\pi", "3", "math", False),
    ("", "72", "math", False),
    (None, "72", "math", False),
    ("true", "true", "logic", True),
    ("True.", "true", "logic", True),
    ("FALSE", "false", "logic", True),
    ("false", "true", "logic", False),
    ("yes", "true", "logic", False),  # synonyms are not accepted
    ("1", "true", "logic", False),
    (None, "false", "logic", False),
]


@pytest.mark.parametrize("pred, gold, task, expected", EQUIVALENCE_CASES)
def test_is_correct(pred, gold, task, expected):
    assert is_correct(pred, gold, task) is expected


def test_unknown_task_is_a_programming_error():
    with pytest.raises(ValueError, match="task"):
        is_correct("1", "1", "chemistry")


def test_huge_numbers_compare_without_int_conversion():
    digits = "9" * 100_000  # int() refuses > 4300 digits; equal strings still match
    assert is_correct(digits, digits, "math")
    assert not is_correct(digits, digits[:-1] + "8", "math")


# --- math-verify time limit ---------------------------------------------------------------------


def run_in_thread(fn, *args, **kwargs):
    out = {}

    def target():
        out["result"], out["seconds"] = timed(fn, *args, **kwargs)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    return out["result"], out["seconds"]


def test_time_limit_holds_off_the_main_thread_and_recovers():
    result, seconds = run_in_thread(latex_equivalent, SLOW_LATEX, "\\frac{1}{2}", timeout_s=0.5)
    assert result is False
    assert 0.5 <= seconds < 1.0
    # the hung worker was killed; the next comparison gets a fresh one and a real verdict
    result, seconds = run_in_thread(latex_equivalent, "0.5", "\\frac{1}{2}", timeout_s=0.5)
    assert result is True
    assert seconds < 10  # includes starting a new worker


def test_time_limit_through_score_in_a_thread():
    completion = f"#### {SLOW_LATEX}"
    breakdown, seconds = run_in_thread(score, completion, "\\frac{1}{2}", "math", math_verify_timeout_s=0.3)
    assert breakdown == RewardBreakdown(correct=0.0, format=1.0, total=pytest.approx(0.2))
    assert seconds < 0.8


def test_concurrent_threads_each_get_a_verdict():
    cases = [("0.5", "\\frac{1}{2}", True), ("\\frac{1}{3}", "\\frac{1}{2}", False)] * 2
    results: list[bool | None] = [None] * len(cases)

    def check(i, pred, gold):
        results[i] = latex_equivalent(pred, gold, timeout_s=10)

    threads = [threading.Thread(target=check, args=(i, p, g)) for i, (p, g, _) in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [expected for _, _, expected in cases]


def _latex_check_in_child(_: int) -> bool:
    return latex_equivalent("\\frac12", "0.5", timeout_s=10)


def test_works_in_forked_daemonic_worker():
    """Like a DataLoader worker: forked from a parent with live workers, and daemonic."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_latex_check_in_child, [0]) == [True]
    assert latex_equivalent("\\frac12", "0.5")  # the parent's pool still works


# --- format check -------------------------------------------------------------------------------

FORMAT_CASES = [
    ("7 + 5 = 12 . 12 - 3 = 9 . #### 9", True),
    ("#### 9", True),
    ("#### true", True),
    ("#### \\frac{1}{2}", True),
    ("#### -3", True),
    ("step one\nstep two\n#### 9\n", True),
    ("#### 9   ", True),
    ("9", False),
    ("#### 9 #### 9", False),
    ("a #### 1 b #### 2", False),
    ("#### ", False),
    ("####", False),
    ("#### 9 and more", False),
    ("#### 9\nmore", False),
    ("####9", False),  # the marker and the answer are separated by a space
    ("x#### 9", False),  # the marker starts its own word
    ("##### 9", False),
    ("#### #9", False),
    ("", False),
]


@pytest.mark.parametrize("completion, ok", FORMAT_CASES)
def test_format_ok(completion, ok):
    assert format_ok(completion) is ok


def test_format_ok_custom_pattern():
    assert format_ok("Answer: 5", r"Answer: \d+")
    assert not format_ok("Answer: 5!", r"Answer: \d+")  # fullmatch, not search


@pytest.mark.parametrize(
    "completion",
    [
        "a" * 100_000,
        " " * 100_000,
        "a #" * 33_333 + " #### 9",
        "a ###" * 25_000,
        "#### 9" + " " * 100_000 + "x",
        "x " * 50_000 + "#### 9 #### 9",
        "####" * 25_000,
    ],
)
def test_format_ok_is_linear_on_long_inputs(completion):
    _, seconds = timed(format_ok, completion)
    assert seconds < 0.2


TAGS_FORMAT_CASES = [
    ("<think>3 * 4 = 12</think>\n<answer>12</answer>", True),
    ("  <think>\nstep\n</think> <answer> 12 </answer>\n", True),
    ("<think></think><answer>12</answer>", True),  # an empty reasoning is still the structure
    ("<answer>12</answer>", False),  # no reasoning block
    ("<think>a</think>", False),  # no answer block
    ("<think>a</think><answer> </answer>", False),  # an empty answer
    ("<think>a</think><answer>12</answer> more", False),  # text after the structure
    ("so <think>a</think><answer>12</answer>", False),  # text before it
    ("<think>a<answer>1</answer></think><answer>12</answer>", False),  # a tag inside the reasoning
    ("<think>a</think><answer>12</answer><answer>12</answer>", False),  # two answers
    ("<think>a</think><answer>12", False),  # cut short
    ("<answer>12</answer><think>a</think>", False),  # the wrong order
    ("", False),
]


@pytest.mark.parametrize("completion, ok", TAGS_FORMAT_CASES)
def test_tags_format(completion, ok):
    assert format_ok(completion, TAGS_FORMAT_PATTERN) is ok


@pytest.mark.parametrize(
    "completion",
    [
        "<think>" * 15_000,
        "<think>" + "a" * 100_000 + "</think><answer>",
        "<think>a</think><answer>" + "1" * 100_000 + "</answer>x",
        "<think>a</think><answer>" + " " * 100_000,
        "</think><answer>" * 6_000,
        "<think>" + "<" * 100_000 + "</think><answer>1</answer>",
    ],
)
def test_tags_format_and_answer_are_linear_on_long_inputs(completion):
    _, seconds = timed(format_ok, completion, TAGS_FORMAT_PATTERN)
    assert seconds < 0.2
    _, seconds = timed(extract_tagged_answer, completion)
    assert seconds < 0.2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>7 + 5 = 12</think><answer>12</answer>", "12"),
        ("<think>a</think><answer> \\boxed{\\frac{1}{2}} </answer>", "\\frac{1}{2}"),
        ("<think>a</think><answer>#### 9</answer>", "9"),
        ("<think>a</think><answer>9 apples</answer>", "9"),  # the answer leading the span
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last span
        ("<think>a</think><answer>12", "12"),  # cut short: to the end of the text
        ("<think>a</think><answer> </answer> #### 7", "7"),  # an empty span: the text's answer line
        ("no tags #### 7", "7"),  # no span: the text's answer line
        ("<think>12</think>", None),
    ],
)
def test_tagged_answer_is_read_from_the_last_answer_span(text, expected):
    assert extract_tagged_answer(text) == expected


# --- dual reward --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, gold, task, correct, well_formed, total",
    [
        ("3 * 4 = 12 . #### 12", "12", "math", 1.0, 1.0, 1.2),
        ("3 * 4 = 12 . The answer is 12", "12", "math", 1.0, 0.0, 1.0),
        ("#### 13", "12", "math", 0.0, 1.0, 0.2),
        ("twelve", "12", "math", 0.0, 0.0, 0.0),
        ("#### true", "true", "logic", 1.0, 1.0, 1.2),
        ("#### false", "true", "logic", 0.0, 1.0, 0.2),
        ("#### 0.5", "\\frac{1}{2}", "math", 1.0, 1.0, 1.2),
        ("#### 12 #### 12", "12", "math", 1.0, 0.0, 1.0),
        # instruct phrasings (issue 34): correct everywhere, well formed only on a `#### n` line
        ("The final answer is 18.", "18", "math", 1.0, 0.0, 1.0),
        ("the answer is: 18 dollars", "18", "math", 1.0, 0.0, 1.0),
        ("#### **18**", "18", "math", 1.0, 1.0, 1.2),
        ("Answer: 18", "18", "math", 1.0, 0.0, 1.0),
    ],
)
def test_score_default_weights(completion, gold, task, correct, well_formed, total):
    breakdown = score(completion, gold, task)
    assert (breakdown.correct, breakdown.format) == (correct, well_formed)
    assert breakdown.total == pytest.approx(total)


def test_score_custom_weights():
    assert score("#### 12", "12", "math", w_correct=2.0, w_format=0.5).total == pytest.approx(2.5)
    assert score("#### 12", "12", "math", w_format=0.0).total == pytest.approx(1.0)
    config = dataclasses.replace(reward_from_yaml(), w_correct=3.0, w_format=1.0)
    assert config.score("#### 11", "12", "math").total == pytest.approx(1.0)


def test_score_batch_shape_and_values():
    scores = score_batch(
        ["#### 12", "The answer is 12", "#### 13", "nothing"],
        ["12", "12", "12", "12"],
        ["math"] * 4,
    )
    assert scores.shape == (4, 3) and scores.dtype == torch.float32
    expected = torch.tensor([[1, 1, 1.2], [1, 0, 1.0], [0, 1, 0.2], [0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(scores, expected)


def test_score_batch_empty_and_mismatched():
    assert score_batch([], [], []).shape == (0, 3)
    with pytest.raises(ValueError, match="equal lengths"):
        score_batch(["#### 1"], ["1", "2"], ["math"])


PAPER = {"w_correct": 1.0, "w_format": 0.2, "signed": True}  # reward=paper: lambda = 0.2


@pytest.mark.parametrize(
    "completion, gold, task, structure, correct, well_formed, total",
    [
        # Eq. (3): R_corr + 0.2 R_fmt with R in {+1, -1}
        ("3 * 4 = 12 . #### 12", "12", "math", "hash", 1.0, 1.0, 1 + 0.2),
        ("3 * 4 = 12 . The answer is 12", "12", "math", "hash", 1.0, 0.0, 1 - 0.2),
        ("#### 13", "12", "math", "hash", 0.0, 1.0, -1 + 0.2),
        ("twelve", "12", "math", "hash", 0.0, 0.0, -1 - 0.2),
        ("<think>3 * 4 = 12</think>\n<answer>12</answer>", "12", "math", "tags", 1.0, 1.0, 1.2),
        ("<think>3 * 4 = 12</think><answer>13</answer>", "12", "math", "tags", 0.0, 1.0, -0.8),
        ("<answer>12</answer>", "12", "math", "tags", 1.0, 0.0, 0.8),  # right, but no reasoning block
        ("#### 12", "12", "math", "tags", 1.0, 0.0, 0.8),  # right without the tags
        ("<think>a</think><answer>12</answer> more", "12", "math", "tags", 1.0, 0.0, 0.8),
        ("<think>a</think><answer> </answer>", "12", "math", "tags", 0.0, 0.0, -1.2),
        ("<think>a</think><answer>\\frac{1}{2}</answer>", "0.5", "math", "tags", 1.0, 1.0, 1.2),
        ("<think>every cat is a mammal</think><answer>true</answer>", "true", "logic", "tags", 1.0, 1.0, 1.2),
        ("<think>a</think><answer>false</answer>", "true", "logic", "tags", 0.0, 1.0, -0.8),
    ],
)
def test_paper_reward_by_hand(completion, gold, task, structure, correct, well_formed, total):
    """The correct and format columns stay 0/1 (they are read as rates); the total is Eq. (3)."""
    breakdown = score(completion, gold, task, structure=structure, **PAPER)
    assert (breakdown.correct, breakdown.format) == (correct, well_formed)
    assert breakdown.total == pytest.approx(total)


def test_paper_and_default_rewards_give_the_same_group_advantages():
    """R_paper = 2 R_default - 1.2 at equal weights: Eq. (4)'s group normalisation removes the affine map
    (up to its eps): rewards (1.2, 0.2, 0, 1) -> (1.2, -0.8, -1.2, 0.8)."""
    completions = ["#### 12", "#### 13", "thirteen", "The answer is 12"]
    default = score_batch(completions, ["12"] * 4, ["math"] * 4)
    paper = score_batch(completions, ["12"] * 4, ["math"] * 4, **PAPER)
    torch.testing.assert_close(paper[:, :2], default[:, :2])  # the same 0/1 columns
    torch.testing.assert_close(paper[:, 2], torch.tensor([1.2, -0.8, -1.2, 0.8]))
    paper_advantages, default_advantages = (
        group_advantages(paper[None, :, 2])[0],
        group_advantages(default[None, :, 2])[0],
    )
    torch.testing.assert_close(paper_advantages, default_advantages, rtol=2e-4, atol=0)  # eps 1e-4 against std ~1


# --- config -------------------------------------------------------------------------------------


def test_reward_config_comes_from_the_yaml():
    config = reward_from_yaml()  # format_pattern: null there is the structure's template
    assert (config.w_correct, config.w_format, config.signed, config.structure) == (1.0, 0.2, False, "hash")
    assert config.pattern == DEFAULT_FORMAT_PATTERN


def test_paper_reward_config_reads_the_backbones_structure():
    """reward=paper: {+1, -1} values and lambda 0.2; the tiny backbone's "#### n" line, the paper's
    backbone's <think>/<answer> tags."""
    tiny = reward_from_yaml(["reward=paper"])
    assert (tiny.w_correct, tiny.w_format, tiny.signed, tiny.structure) == (1.0, 0.2, True, "hash")
    assert tiny.pattern == DEFAULT_FORMAT_PATTERN
    llama = reward_from_yaml(["reward=paper", "backbone=llama2-7b+sheared-1.3b"])
    assert (llama.signed, llama.structure, llama.pattern) == (True, "tags", TAGS_FORMAT_PATTERN)
    assert llama.score("<think>4 * 3</think><answer>12</answer>", "12", "math").total == pytest.approx(1.2)
    assert reward_from_yaml(["backbone=llama2-7b+sheared-1.3b"]).structure == "tags"  # the default reward too


@pytest.mark.parametrize(
    "overrides, bad_key",
    [
        ({"w_correct": -1.0}, "w_correct"),
        ({"w_format": float("nan")}, "w_format"),
        ({"w_format": float("inf")}, "w_format"),
        ({"w_correct": "1"}, "w_correct"),
        ({"math_verify_timeout_s": 0}, "math_verify_timeout_s"),
        ({"format_pattern": "(unclosed"}, "format_pattern"),
        ({"structure": "xml"}, "reward.structure"),
        ({"signed": "yes"}, "reward.signed"),
    ],
)
def test_reward_config_rejects_bad_values(overrides, bad_key):
    with pytest.raises(ValueError, match=bad_key):
        dataclasses.replace(reward_from_yaml(), **overrides)


# --- robustness: never raises, bounded time -----------------------------------------------------

GOLDS = [("72", "math"), ("\\frac{1}{2}", "math"), ("true", "logic")]
PROPERTY_TIMEOUT_S = 0.5
# a timed-out comparison kills its worker, so the next call may also start one (~0.5 s here)
PROPERTY_BOUND_S = PROPERTY_TIMEOUT_S + 2.5

completions = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec=None, exclude_categories=())),  # surrogates, NUL, controls
    st.builds(
        lambda prefix, marker, body, suffix: prefix + marker + body + suffix,
        st.text(max_size=50),
        st.sampled_from(["#### ", "####", "The answer is ", "\\boxed{", "\\boxed{\\frac{", "$", "{", "}"]),
        st.text(alphabet="0123456789{}\\^_/.,-$ #fracsqtboxedx٧", max_size=40),
        st.text(max_size=20),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completion=completions, gold=st.sampled_from(GOLDS), lenient=st.booleans())
def test_never_raises_on_any_text(completion, gold, lenient):
    gold_answer, task = gold
    breakdown, seconds = timed(score, completion, gold_answer, task, math_verify_timeout_s=PROPERTY_TIMEOUT_S)
    assert seconds < PROPERTY_BOUND_S
    assert breakdown.correct in (0.0, 1.0) and breakdown.format in (0.0, 1.0)
    assert breakdown.total == pytest.approx(breakdown.correct + 0.2 * breakdown.format)
    answer = extract_answer(completion, lenient=lenient)
    assert answer is None or isinstance(answer, str)
    # the completion as a gold answer and as a prediction must not break the checker either
    assert is_correct(completion, completion, task, timeout_s=PROPERTY_TIMEOUT_S) in (True, False)


tagged_completions = st.one_of(
    completions,
    st.lists(
        st.one_of(
            st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<", ">", "/", " ", "\n", "#### "]),
            st.text(alphabet="0123456789{}\\$ .-truefalsboxd", max_size=12),
        ),
        max_size=12,
    ).map("".join),
)
SIGNED_TOTALS = [pytest.approx(v) for v in (1.2, 0.8, -0.8, -1.2)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completion=tagged_completions, gold=st.sampled_from(GOLDS), structure=st.sampled_from(["hash", "tags"]))
def test_paper_reward_never_raises_and_keeps_rates_and_signed_totals(completion, gold, structure):
    """reward=paper on any text, with the tags or the "####" structure: bounded time, 0/1 columns, and a
    total that is one of the four values of Eq. (3), R_corr + 0.2 R_fmt."""
    gold_answer, task = gold
    breakdown, seconds = timed(
        score, completion, gold_answer, task, structure=structure, math_verify_timeout_s=PROPERTY_TIMEOUT_S, **PAPER
    )
    assert seconds < PROPERTY_BOUND_S
    assert breakdown.correct in (0.0, 1.0) and breakdown.format in (0.0, 1.0)
    assert breakdown.total == pytest.approx((2 * breakdown.correct - 1) + 0.2 * (2 * breakdown.format - 1))
    assert breakdown.total in SIGNED_TOTALS
    answer = extract_tagged_answer(completion)
    assert answer is None or isinstance(answer, str)


@settings(max_examples=200, deadline=None)
@given(
    value=st.integers(min_value=-(10**12), max_value=10**12),
    other=st.integers(min_value=-(10**12), max_value=10**12),
    style=st.sampled_from(["{:d}", "{:,d}", "{:d}.0", "${:d}", "{:d}.", " {:d} "]),
)
def test_integer_answers_match_exactly_their_value(value, other, style):
    completion = "reasoning . #### " + style.format(value).strip()
    assert score(completion, str(value), "math").correct == 1.0
    assert score(completion, str(other), "math").correct == float(value == other)


PATHOLOGICAL = {
    "100k chars": "a" * 100_000,
    "100k open braces": "{" * 100_000,
    "100k close braces": "}" * 100_000,
    "boxed 10k deep": "\\boxed{" * 10_000 + "1" + "}" * 10_000,
    "boxed 10k deep unbalanced": "\\boxed{" * 10_000 + "1",
    "braces 10k deep in answer": "#### " + "{" * 10_000 + "1" + "}" * 10_000,
    "marker alone": "####",
    "marker and space": "#### ",
    "marker and 100k digits": "#### " + "9" * 100_000,
    "marker and 100k latex": "#### " + "\\frac{1}{2}" * 10_000,
    "100k markers": "#" * 100_000,
    "NUL bytes": "\x00" * 1000 + "#### 1\x00",
    "unicode digits": "#### ٧٢",
    "lone surrogate": "#### \\frac{1}{\ud800}",
    "100k answer-is": "the answer is " * 8_000,
    "100k commas": "1," * 50_000,
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
@pytest.mark.parametrize("gold, task", GOLDS)
def test_pathological_inputs_are_fast(name, gold, task):
    text = PATHOLOGICAL[name]
    breakdown, seconds = timed(score, text, gold, task)
    assert seconds < 1.0
    assert breakdown.total in (0.0, pytest.approx(0.2), 1.0, pytest.approx(1.2))
    for lenient in (False, True):
        _, seconds = timed(extract_answer, text, lenient=lenient)
        assert seconds < 1.0
    _, seconds = timed(is_correct, text, text, task)  # as both prediction and gold
    assert seconds < 1.0


def test_pathological_values():
    assert score(PATHOLOGICAL["boxed 10k deep"], "1", "math").correct == 1.0  # innermost box
    assert extract_answer(PATHOLOGICAL["boxed 10k deep unbalanced"]) is None
    assert score(PATHOLOGICAL["marker and 100k digits"], "72", "math") == RewardBreakdown(0.0, 1.0, 0.2)
    assert score("#### ٧٢", "72", "math") == RewardBreakdown(0.0, 1.0, 0.2)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 9 gets more", "9"),  # the model kept going after its answer: the answer still counts
        ("#### 9 #### ", "9"),  # an empty last answer line falls back to the previous one
        ("#### true false", "true"),
        ("#### \\frac{1}{2} + x", "\\frac{1}{2} + x"),  # LaTeX answers stay whole
        ("#### x", "x"),
    ],
)
def test_answer_line_takes_the_last_non_empty_marker_and_its_leading_answer(text, expected):
    assert extract_answer(text) == expected


def test_runaway_completion_is_correct_but_malformed():
    s = score("#### 9 gets more", "9", "math")
    assert (s.correct, s.format, s.total) == (1.0, 0.0, 1.0)


def test_an_idle_worker_that_died_is_replaced_not_counted_as_a_wrong_answer():
    from dlr.rewards import verify

    assert warm_up_verifier()
    verify._idle_workers[-1].proc.kill()
    verify._idle_workers[-1].proc.wait()
    assert latex_equivalent("\\frac{1}{2}", "0.5", timeout_s=30)


long_or_nested = st.one_of(
    completions,
    st.builds(
        lambda piece, n: piece * n,
        st.sampled_from(["{", "}", "\\boxed{", "#", "#### 1 ", "9", "a"]),
        st.integers(min_value=1_000, max_value=100_000),
    ),
    st.builds(
        lambda n, body: "\\boxed{" * n + body + "}" * n, st.integers(min_value=1, max_value=5_000), st.text(max_size=10)
    ),
)


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completion=long_or_nested, lenient=st.booleans())
def test_ten_thousand_strings_never_raise_and_each_takes_under_a_second(completion, lenient):
    """The text-side checks (extraction, format, logic answers) on 10k strings up to 100k characters and
    thousands of nested braces; math-verify's own bound is tested above with fewer, slower examples."""
    start = time.perf_counter()
    breakdown = score(completion, "true", "logic")
    answer = extract_answer(completion, lenient=lenient)
    assert time.perf_counter() - start < 1.0
    assert breakdown.correct in (0.0, 1.0) and breakdown.format in (0.0, 1.0)
    assert answer is None or isinstance(answer, str)
