"""ProntoQA-style fictional-ontology problems (our own generator and invented words).

Someone belongs to a concept; a chain of `depth` rules leads from it to a query concept, the last rule
positive or negated. A distractor chain ends in the query concept with the opposite polarity, so the
answer cannot be read off the rule that mentions the query concept: the proof has to follow the
person's own chain, `depth` hops. Rules are shuffled.

    question: "kai is a blick . every dax is a wug . every fep is not a wug . every blick is a dax .
               true or false : kai is a wug ."
    cot:      "kai is a blick . every blick is a dax . every dax is a wug ."
    answer:   "true"

Training streams may add `extra_distractors` rules "every x is a y" whose subject x is on no chain and
whose object is the query half the time (then negated half the time) and otherwise any other concept. They leave the proof
unchanged and break the two shortcuts a small model finds on the plain problems: forward, "write the
object that is not the query" (right at depth 1 and at depth 2 with a one-rule distractor), and
backward, "the hop before the query is the subject of a rule about the query" (right half the time at
depth 2, where two rules mention the query). With extra rules only looking each rule up by its subject
finds the next hop. The fixed test set never has them.

The proof cites each rule it applies, as ProntoQA's gold chains do. That also makes the lookup a
small model has to learn symmetric: in a rule and in the proof the subject sits at the same distance
before the object, so one attention pattern finds the rule that continues the chain.
"""

from __future__ import annotations

import random

from dlr.data.schema import Record

CONCEPTS = (
    "blick",
    "dax",
    "wug",
    "fep",
    "tove",
    "glim",
    "prell",
    "quib",
    "snarf",
    "vell",
    "kront",
    "mip",
    "jorb",
    "plim",
    "trax",
    "yurn",
    "bleem",
    "drox",
    "zorp",
    "larn",
    "nib",
    "sorm",
    "tulk",
    "vosh",
)
PEOPLE = ("kai", "max", "rin", "sol", "tam", "uma", "vic", "wes", "xia", "yan", "zoe", "ola")
MAX_DEPTH = (len(CONCEPTS) - 2) // 2  # the person's chain and the distractor need distinct concepts


def check_extra_distractors(extra_distractors: tuple[int, ...], depth: int, name: str = "extra_distractors") -> None:
    """Raise, naming `name`, unless `extra_distractors` is an inclusive range [low, high] that a depth-`depth`
    problem has room for: each extra rule needs a subject of its own, outside the chain (depth + 1 concepts)
    and the longest distractor chain (depth more)."""
    room = len(CONCEPTS) - (2 * depth + 1)
    if len(extra_distractors) != 2 or not 0 <= extra_distractors[0] <= extra_distractors[1] <= room:
        raise ValueError(
            f"{name} is an inclusive range [low, high] with 0 <= low <= high <= {room} (the concepts left at "
            f"depth {depth}), got {list(extra_distractors)}"
        )


def vocabulary() -> list[str]:
    """Every word a logic problem, its proof or its answer line can contain."""
    words = {"every", "is", "a", "not", "true", "or", "false", ":", "."}
    return sorted(words | set(CONCEPTS) | set(PEOPLE))


def generate(
    rng: random.Random, depth: int, index: int, id_prefix: str, extra_distractors: tuple[int, int] = (0, 0)
) -> Record:
    """One true/false query whose proof takes exactly `depth` hops, with a number of extra distractor
    rules drawn uniformly from the inclusive range `extra_distractors` (none by default: the rng then
    draws exactly what it drew before the option existed, so existing streams and test sets are unchanged)."""
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be in 1..{MAX_DEPTH}, got {depth}")
    check_extra_distractors(extra_distractors, depth)
    low, high = extra_distractors
    person = rng.choice(PEOPLE)
    concepts = rng.sample(CONCEPTS, 2 * depth + 2)
    chain, distractor = concepts[: depth + 1], concepts[depth + 1 :]
    query = chain[-1]
    distractor = distractor[: rng.randint(1, depth)] + [query]
    negated = rng.random() < 0.5
    article = "not a" if negated else "a"
    other = "a" if negated else "not a"

    rules_used = [f"every {a} is a {b} ." for a, b in zip(chain[:-2], chain[1:-1], strict=True)]
    rules_used.append(f"every {chain[-2]} is {article} {query} .")
    rules = rules_used + [f"every {a} is a {b} ." for a, b in zip(distractor[:-2], distractor[1:-1], strict=True)]
    rules.append(f"every {distractor[-2]} is {other} {query} .")
    if high > 0:
        used = set(chain) | set(distractor)
        subjects = rng.sample([c for c in CONCEPTS if c not in used], rng.randint(low, high))
        for subject in subjects:
            target = query if rng.random() < 0.5 else rng.choice([c for c in CONCEPTS if c not in (subject, query)])
            rules.append(f"every {subject} is {'not a' if target == query and rng.random() < 0.5 else 'a'} {target} .")
    rng.shuffle(rules)

    question = " ".join([f"{person} is a {chain[0]} ."] + rules + [f"true or false : {person} is a {query} ."])
    proof = [f"{person} is a {chain[0]} ."] + rules_used
    return Record(
        id=f"{id_prefix}-{index}",
        task="logic",
        question=question,
        cot=" ".join(proof),
        answer="false" if negated else "true",
        depth=depth,
        source="synthetic_logic",
    )
