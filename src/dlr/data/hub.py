"""Hub datasets (GSM8K, MATH-500, ProntoQA) adapted to the record schema (docs/design.md §9).

Each adapter is a pure function `(row, position) -> Record` that raises `MalformedRecord("<reason>:
<detail>")` for a row it cannot adapt; streams skip such rows and count them by reason. `position` is
"<split>-<index>", the id of a row in a release that has no id of its own (only GSM8K needs it).

Release schemas (field: type):
  openai/gsm8k, config "main", splits train/test: question: str, answer: str (the worked solution,
      with `<<48/2=24>>` calculator annotations, ending in a `#### 72` line).
  HuggingFaceH4/MATH-500, split test: problem, solution, answer, subject: str, level: int (1-5),
      unique_id: str ("test/precalculus/807.json").
  renma/ProntoQA, split validation (its one file, ProntoQA_dev_gpt-4.json, is Logic-LM's 500-problem
      5-hop fictional-ontology dev set): id: str ("ProntoQA_1"), context: str, question: str ("Is the
      following statement true or false? Max is sour."), answer: "A" | "B", options: list[str]
      (["A) True", "B) False"]), raw_logic_programs: list[str] (GPT-4's translations; unused). It has
      no gold proof, so the adapter derives one by chaining the context's rules (see `_prove`).
  Schemas checked against the releases' dataset cards and public code that loads them, not against a
  live download (this project's machines cannot reach the hub).

Depth: GSM8K, the number of solution lines; MATH-500, its difficulty `level` (its solutions are LaTeX
prose whose sentence count says little about the number of steps, and level is the standard breakdown);
ProntoQA, the number of rules the proof applies (hops).
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from dlr.data.schema import MalformedRecord, Record, SkipCounter, adapt_rows, make_record

Row = Mapping[str, Any]


def _text(row: Row, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise MalformedRecord(f"missing field: {field!r} is {type(value).__name__}")
    return value


# --- GSM8K ---------------------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^>]*>>")  # `<<48/2=24>>`: the annotation, not the worked text
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def adapt_gsm8k(row: Row, position: str) -> Record:
    solution, mark, final = _text(row, "answer").rpartition("####")
    if not mark:
        raise MalformedRecord("no final answer line: the solution has no '####'")
    answer = final.strip().replace(",", "")
    if not _NUMBER.fullmatch(answer):
        raise MalformedRecord(f"unparsable gold answer: {final.strip()!r}")
    steps = [line.strip() for line in _CALCULATOR.sub("", solution).splitlines() if line.strip()]
    if not steps:
        raise MalformedRecord("no solution steps: nothing before '####'")
    return make_record(
        id=f"gsm8k-{position}",
        task="math",
        question=_text(row, "question"),
        cot="\n".join(steps),
        answer=answer,
        depth=len(steps),
        source="gsm8k",
    )


# --- MATH-500 ------------------------------------------------------------------------------------

_BOXED = "\\boxed{"


def _unbox(solution: str) -> str:
    """`$\\boxed{\\frac{1}{2}}$` -> `$\\frac{1}{2}$`: the trained answer format is the `####` line, so the
    gold reasoning should not also teach a boxed one."""
    while (start := solution.find(_BOXED)) >= 0:
        depth = 1
        for end in range(start + len(_BOXED), len(solution)):
            depth += {"{": 1, "}": -1}.get(solution[end], 0)
            if depth == 0:
                break
        else:
            raise MalformedRecord("unbalanced \\boxed: its braces never close")
        solution = solution[:start] + solution[start + len(_BOXED) : end] + solution[end + 1 :]
    return solution


def adapt_math500(row: Row, position: str) -> Record:
    level = row.get("level")
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 5:
        raise MalformedRecord(f"bad difficulty level: {level!r}")
    return make_record(
        id=_text(row, "unique_id"),
        task="math",
        question=_text(row, "problem"),
        cot=_unbox(_text(row, "solution")),
        answer=_text(row, "answer"),
        depth=level,
        source="math500",
    )


# --- ProntoQA ------------------------------------------------------------------------------------

# ProntoQA sentences: rules "Every/Each wumpus is (not) (a/an) X." or "Wumpuses are (not) X.", the fact
# "Max is a wumpus.", and the query "Max is (not) X." (X a concept or a property).
_RULE = re.compile(r"(?:(?:Every|Each) (\w+) is|(\w+) are) (not )?(?:an? )?(\w+)")
_STATEMENT = re.compile(r"(\w+) is (not )?(an? )?(\w+)")


def _concept(word: str) -> str:
    """Canonical name: ProntoQA's fictional concepts are "-us" nouns with "-uses" plurals."""
    word = word.lower()
    return word[:-2] if word.endswith("uses") else word


def _article(concept: str) -> str:
    return "an" if concept[0] in "aeiou" else "a"


def _prove(context: str, query: str) -> tuple[bool, list[str], int]:
    """(truth of `query`, proof sentences, hops): chain the context's rules from its one fact to the queried
    concept, shortest chain first. The proof reads like ProntoQA's own chain of thought, one rule per
    hop: "Max is a yumpus. Each yumpus is a dumpus. Max is a dumpus. ... Tumpuses are not sour. Max is
    not sour." """
    rules: dict[str, list[tuple[str, bool, str]]] = {}  # concept -> (derived concept, negated, sentence)
    facts: list[tuple[str, str, str]] = []  # (name, concept, sentence)
    for sentence in filter(None, (s.strip() for s in context.split("."))):
        if rule := _RULE.fullmatch(sentence):
            subject, plural_subject, negated, obj = rule.groups()
            rules.setdefault(_concept(subject or plural_subject), []).append((_concept(obj), bool(negated), sentence))
        elif (fact := _STATEMENT.fullmatch(sentence)) and not fact.group(2):
            facts.append((fact.group(1), _concept(fact.group(4)), sentence))
        else:
            raise MalformedRecord(f"unparsable context sentence: {sentence!r}")
    asked = _STATEMENT.fullmatch(query.rsplit("?", 1)[-1].strip().rstrip("."))
    if not asked or len(facts) != 1 or facts[0][0] != asked.group(1):
        raise MalformedRecord(f"unparsable query: {query!r}")
    (name, start, fact), (_, query_negated, query_article, query_word) = facts[0], asked.groups()
    target = _concept(query_word)

    # Breadth-first over the concepts the person belongs to; a negated conclusion ("is not sour") is a
    # property and leads nowhere (ProntoQA's rules all start from a concept).
    parent: dict[str, tuple[str, bool, str] | None] = {start: None}  # concept -> (from, negated, rule)
    queue = deque([start])
    while queue and target not in parent:
        concept = queue.popleft()
        for derived, negated, sentence in rules.get(concept, []):
            if derived not in parent:
                parent[derived] = (concept, negated, sentence)
                if not negated:
                    queue.append(derived)
    if target not in parent or target == start:
        raise MalformedRecord(f"unprovable query: no chain of rules reaches {query_word!r}")

    hops: list[tuple[str, bool, str]] = []  # (derived concept, negated, rule), first hop first
    concept = target
    while (step := parent[concept]) is not None:
        hops.insert(0, (concept, step[1], step[2]))
        concept = step[0]
    proof = [f"{fact}."]
    for concept, _, sentence in hops[:-1]:  # intermediate hops are all positive: "Max is a dumpus."
        proof += [f"{sentence}.", f"{name} is {_article(concept)} {concept}."]
    _, negated, sentence = hops[-1]
    proof += [f"{sentence}.", f"{name} is {'not ' if negated else ''}{query_article or ''}{query_word}."]
    return negated == bool(query_negated), proof, len(hops)


def adapt_prontoqa(row: Row, position: str) -> Record:
    options = row.get("options") or []
    labels = dict(str(option).split(") ", 1) for option in options if ") " in str(option))  # "A) True"
    gold = labels.get(_text(row, "answer").strip(), "").strip().lower()
    if gold not in ("true", "false"):
        raise MalformedRecord(f"unparsable gold answer: {row.get('answer')!r} with options {options!r}")
    context, question = _text(row, "context"), _text(row, "question")
    truth, proof, hops = _prove(context, question)
    if truth != (gold == "true"):
        raise MalformedRecord(f"gold answer contradicts the proof: gold {gold}")
    return make_record(
        id=_text(row, "id"),
        task="logic",
        question=f"{context} {question}",
        cot=" ".join(proof),
        answer=gold,
        depth=hops,
        source="prontoqa",
    )


# --- registry and streaming ----------------------------------------------------------------------


@dataclass(frozen=True)
class HubDataset:
    """Where a release lives on the hub and how its rows become records."""

    hub_id: str
    config: str | None
    splits: tuple[str, ...]
    default_split: str  # the held-out split to evaluate on
    fields: tuple[str, ...]  # what a local JSONL copy must carry
    adapt: Callable[[Row, str], Record]  # (row, position) -> Record


HUB_DATASETS: dict[str, HubDataset] = {
    "gsm8k": HubDataset("openai/gsm8k", "main", ("train", "test"), "test", ("question", "answer"), adapt_gsm8k),
    "math500": HubDataset(
        "HuggingFaceH4/MATH-500",
        None,
        ("test",),
        "test",
        ("problem", "solution", "answer", "subject", "level", "unique_id"),
        adapt_math500,
    ),
    "prontoqa": HubDataset(
        "renma/ProntoQA",
        None,
        ("validation",),
        "validation",
        ("id", "context", "question", "answer", "options", "raw_logic_programs"),
        adapt_prontoqa,
    ),
}


class HubUnavailable(RuntimeError):
    """A hub dataset was asked for and the hub cannot be reached; the message says what to do instead."""


def _dataset(name: str, split: str, local_path: str | None) -> HubDataset:
    """The registry entry for `name`, after checking `split` exists (a local file is its own split)."""
    if name not in HUB_DATASETS:
        raise ValueError(f"unknown hub dataset {name!r}; valid names: {', '.join(sorted(HUB_DATASETS))}")
    spec = HUB_DATASETS[name]
    if local_path is None and split not in spec.splits:
        raise ValueError(f"hub dataset {name!r} ({spec.hub_id}) has splits {list(spec.splits)}, got {split!r}")
    return spec


def _unavailable(spec: HubDataset, split: str, cause: str) -> HubUnavailable:
    return HubUnavailable(
        f"Dataset '{spec.hub_id}' (split '{split}') is not available: the Hugging Face Hub could not be "
        f"reached ({' '.join(cause.split())}). To run offline, use a procedural data source, data=synthetic_math, "
        f"data=synthetic_logic or data=mixed, or stream local copies with data.train_path=/path/to/train.jsonl "
        f"data.test_path=/path/to/test.jsonl (one JSON object per line with the fields of '{spec.hub_id}': "
        f"{', '.join(spec.fields)}). "
        f"A copy already in the Hugging Face cache is used when HF_HUB_OFFLINE=1 is set."
    )


def stream_hub_records(
    name: str, split: str, skipped: SkipCounter, *, local_path: str | None = None
) -> Iterator[Record]:
    """Records of hub dataset `name`, streamed (nothing is downloaded whole); malformed rows are skipped
    and counted in `skipped`. With `local_path`, rows come from that JSONL file (in the release's
    fields) instead, read by the same `datasets` streaming loader; `split` then only names the ids.

    Raises at call time, not at the first `next`: ValueError for an unknown name or split,
    HubUnavailable when `datasets` gives up reaching the hub (after its own retries: 23 s here).
    """
    spec = _dataset(name, split, local_path)
    import datasets  # lazily: the package works without `datasets` for the procedural sources

    if local_path is not None:
        rows = datasets.load_dataset("json", data_files=local_path, split="train", streaming=True)
    else:
        try:
            rows = datasets.load_dataset(spec.hub_id, spec.config, split=split, streaming=True)
        # What `datasets` raises when neither the hub nor the cache has it: ConnectionError, or
        # FileNotFoundError when something other than the hub answered (a proxy, a wrong HF_ENDPOINT).
        except (ConnectionError, FileNotFoundError) as err:
            cause = "HF_HUB_OFFLINE=1 is set and the cache has no copy" if datasets.config.HF_HUB_OFFLINE else str(err)
            raise _unavailable(spec, split, cause) from None
    return adapt_rows(enumerate(rows), lambda item: spec.adapt(item[1], f"{split}-{item[0]}"), skipped)


def _probe_hub(spec: HubDataset, split: str) -> None:
    """One request, no retries: raise HubUnavailable unless the hub answers within HF_HUB_ETAG_TIMEOUT
    (default 10 s). Without it a machine with no network waits through `datasets`' 23 s of retries."""
    from huggingface_hub import constants

    try:
        request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
        urllib.request.urlopen(request, timeout=constants.HF_HUB_ETAG_TIMEOUT).close()
    except urllib.error.HTTPError:
        pass  # the hub answered, even if with an error status: it is reachable
    except OSError as err:  # URLError (DNS failure, refused connection), timeout
        raise _unavailable(spec, split, str(getattr(err, "reason", err))) from None


def check_hub_dataset(name: str, split: str, local_path: str | None = None) -> Record:
    """Fail at start, not mid-run: open the stream and return its first valid record. The hub is probed
    first (`_probe_hub`), except with HF_HUB_OFFLINE=1, where `datasets` only reads its cache."""
    spec = _dataset(name, split, local_path)
    if local_path is None:
        import datasets

        if not datasets.config.HF_HUB_OFFLINE:
            _probe_hub(spec, split)
    first = next(stream_hub_records(name, split, SkipCounter(), local_path=local_path), None)
    if first is None:
        raise ValueError(f"hub dataset {name!r} split {split!r} has no valid records ({local_path or spec.hub_id})")
    return first
