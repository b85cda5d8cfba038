"""Procedural multi-step arithmetic word problems (our own templates).

A problem starts someone with a count of objects and applies `depth` gains or losses, each one
reasoning step. The running count stays in [0, MAX_VALUE] so every number is one token of the tiny
vocabulary and the arithmetic table stays small enough for a CPU warm start (docs/design.md §11).

    question: "ana has 7 pens . ana gets 5 more . ana gives 3 away . how many pens does ana have now ?"
    cot:      "gets 5 : 7 + 5 = 12 . gives 3 : 12 - 3 = 9 ."
    answer:   "9"

Each step of the gold solution names the clause it uses (`gets 5 :`), which gives a small model a
content anchor to find the next clause instead of having to count positions.
"""

from __future__ import annotations

import random

from dlr.data.schema import Record

MAX_VALUE = 99  # running counts stay in [0, MAX_VALUE]: about 1,800 one-step facts, learnt only partly by the tiny main (a graded frontier)
MAX_STEP = 9  # each gain or loss moves the count by 1..MAX_STEP
NAMES = ("ana", "ben", "cara", "dev", "eli", "fay", "gus", "hana", "ivo", "jun", "kim", "leo")
OBJECTS = ("pens", "apples", "coins", "books", "cards", "shells", "stamps", "marbles")
GAINS = (("gets", "more"), ("finds", "more"), ("buys", "more"), ("wins", "more"))
LOSSES = (("gives", "away"), ("loses", "today"), ("sells", "today"), ("drops", "today"))


def vocabulary() -> list[str]:
    """Every word a math problem, its solution or its answer line can contain."""
    words = set(NAMES) | set(OBJECTS)
    for verb, tail in GAINS + LOSSES:
        words |= {verb, tail}
    words |= {"has", "how", "many", "does", "have", "now", "?", ".", ":", "+", "-", "="}
    return sorted(words) + [str(n) for n in range(MAX_VALUE + 1)]


def generate(rng: random.Random, depth: int, index: int, id_prefix: str) -> Record:
    """One problem whose gold solution takes exactly `depth` arithmetic steps."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    value = rng.randint(2, MAX_VALUE - 5)
    clauses = [f"{name} has {value} {obj} ."]
    steps = []
    for _ in range(depth):
        gain = value == 0 or (value < MAX_VALUE and rng.random() < 0.5)
        if gain:
            amount = rng.randint(1, min(MAX_STEP, MAX_VALUE - value))
            verb, tail = rng.choice(GAINS)
            new_value, op = value + amount, "+"
        else:
            amount = rng.randint(1, min(MAX_STEP, value))
            verb, tail = rng.choice(LOSSES)
            new_value, op = value - amount, "-"
        clauses.append(f"{name} {verb} {amount} {tail} .")
        steps.append(f"{verb} {amount} : {value} {op} {amount} = {new_value} .")
        value = new_value
    clauses.append(f"how many {obj} does {name} have now ?")
    return Record(
        id=f"{id_prefix}-{index}",
        task="math",
        question=" ".join(clauses),
        cot=" ".join(steps),
        answer=str(value),
        depth=depth,
        source="synthetic_math",
    )
