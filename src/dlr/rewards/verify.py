"""Final-answer extraction and equivalence checking (docs/design.md §9).

Extraction (`extract_answer`; `extract_tagged_answer` reads a `<answer>...</answer>` span first), in priority order:
  1. the last `####` marker: the rest of its line;
  2. the last `The answer is X` or `The final answer is X` (case-insensitive, optional colon), or a line
     that opens with `Answer:` / `Final answer:` (markdown bold around it allowed): the rest of its line,
     its leading number when a unit or words follow (`18 dollars` -> `18`);
  3. the last `\\boxed{...}`, nested braces handled; an unbalanced last box gives nothing;
  4. lenient mode only: the last number in the text.
A marker followed by nothing falls through to the next rule. The extracted text is cleaned: trailing
period, surrounding markdown bold `**...**` and `$...$` dropped, and a `\\boxed{...}` inside it is unwrapped.

Normalisation decisions (`normalize_answer`, `parse_number`):
  - surrounding whitespace, a trailing period, `$...$` delimiters, a leading currency `$` are dropped;
  - a trailing `%` or `\\%` is dropped, so "50%" == "50" (GSM8K golds carry no percent sign);
  - `1,000` -> `1000` only for well-formed thousands groups; `72.0`/`72.00` -> `72`;
  - only ASCII digits make a number. Python's int()/Fraction() would accept Arabic-Indic and other
    unicode digits; here "٧٢" is simply not a number, so it never matches gold "72";
  - numbers are compared exactly as fractions: integers, decimals and `a/b`; numbers longer than
    `MAX_NUMBER_CHARS` are compared as strings only (Python refuses int() on >4300 digits).

Equivalence (`is_correct`):
  - logic: only `true`/`false` (case-insensitive) count; `yes`/`no` do not, because the gold answers
    and the trained answer line use true/false and rewarding synonyms would blur that target;
  - math: equal normalised strings, else exact numeric equality when both sides are plain numbers,
    else math-verify (LaTeX/sympy equivalence) under a time limit that works on any thread.

Time limit: math-verify's own timeouts use signal.alarm, which only works on the main thread, and
sympy can hang on short inputs (e.g. comparing `9^{9^{9}}` with 1/2). So math-verify runs in
persistent worker subprocesses (this file executed as a script) that answer JSON-line requests; the
caller waits on the pipe with poll() and a deadline, and on timeout kills the worker and starts a fresh
one on the next call. Workers are pooled: a caller takes an idle worker or starts one, so concurrent
threads each get their own and never queue behind each other. Plain subprocesses (not multiprocessing)
also work inside daemonic DataLoader workers and never re-import the training script. Cheap pre-checks
keep huge inputs and digit-free predictions against numeric golds away from sympy entirely.
Everything here is POSIX-only (poll on pipes).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1.0  # per math-verify comparison; typical comparisons take milliseconds
MAX_NUMBER_CHARS = 1000  # longer "numbers" are only compared as strings
MAX_LATEX_CHARS = 1000  # longer answers never reach sympy (no real answer is this long)
_WORKER_STARTUP_TIMEOUT_S = 30.0  # python start + importing sympy; paid once per worker
_WORKER_BACKSTOP_S = 60  # the worker's own signal timeout, so an orphaned worker stops computing
_MAX_IDLE_WORKERS = 4  # each holds sympy (~70 MB); extra workers from a burst of threads are closed

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"  # the answer span of reward.structure=tags
# Instruct models' closing phrasings: "The (final) answer is: 18", and "Answer: 18" or "**Final Answer:** 18"
# opening a line (only there: "the answer: 18" mid-sentence is too loose to read as a final answer).
_ANSWER_IS = re.compile(
    r"the (?:final )?answer is:?|^[ \t]*(?:\*\*)?(?:final )?answer(?::\*\*|(?:\*\*)?:)", re.IGNORECASE | re.MULTILINE
)
_BOXED = "\\boxed{"
_BRACE = re.compile(r"[{}]")
_NUMBER_IN_TEXT = re.compile(r"-?[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?")
_THOUSANDS = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")
_TRAILING_ZEROS = re.compile(r"([+-]?[0-9]+)\.0+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_FRACTION = re.compile(r"[+-]?[0-9]+/[0-9]+")
_ASCII_DIGIT = re.compile(r"[0-9]")


# --- extraction ---------------------------------------------------------------------------------


def extract_answer(text: str, *, lenient: bool = False) -> str | None:
    """The final answer in a completion, or None. Strict mode (lenient=False) is what rewards use."""
    mark = len(text)
    while (mark := text.rfind("####", 0, mark)) >= 0:  # the last non-empty answer line
        if answer := _clean(_rest_of_line(text, mark + 4)):
            return _plain_head(answer)
    if (last_answer_is := _last_match(_ANSWER_IS, text)) and (
        answer := _clean(_rest_of_line(text, last_answer_is.end()))
    ):
        return _plain_head(answer)
    if (boxed := _last_boxed(text)) and (answer := _clean(boxed)):
        return answer
    if lenient:
        if last_number := _last_match(_NUMBER_IN_TEXT, text):
            return last_number.group()
    return None


def extract_tagged_answer(text: str) -> str | None:
    """The answer of a `<think>...</think><answer>...</answer>` completion (reward.structure=tags): the
    text after the last `<answer>`, up to its `</answer>` or the end (a decode cut short still said
    it), read as `extract_answer` reads a line (`#### 72`, `\\boxed{72}` inside are unwrapped) or else
    taken whole; with no `<answer>` or an empty one, `extract_answer` of the whole text, so the
    correct answer of a completion without the tags still counts, as in the `####` structure."""
    start = text.rfind(ANSWER_OPEN)
    if start >= 0:
        content = text[start + len(ANSWER_OPEN) :]
        if (close := content.find(ANSWER_CLOSE)) >= 0:
            content = content[:close]
        if answer := extract_answer(content) or _clean(content):
            return _plain_head(answer)
    return extract_answer(text)


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    """The last match of `pattern` in `text` (one linear scan, no list of matches)."""
    last = None
    for last in pattern.finditer(text):  # noqa: B007 - the loop variable is the result
        pass
    return last


def _plain_head(answer: str) -> str:
    """`9 gets more` -> `9`: a model that did not stop after its answer still gave that answer.
    Only when the whole line is not itself a number or a truth value (LaTeX answers stay whole)."""
    head = answer.split(maxsplit=1)[0]
    if head != answer and parse_number(answer) is None and parse_bool(answer) is None:
        if parse_number(_strip_delimiters(head)) is not None or parse_bool(head) is not None:
            return _strip_delimiters(head)
    return answer


def _rest_of_line(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start:] if end < 0 else text[start:end]


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`; None if there is none or its braces never close."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    content_start = start + len(_BOXED)
    depth = 1
    for brace in _BRACE.finditer(text, content_start):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[content_start : brace.start()]
    return None


def _clean(answer: str) -> str:
    answer = _strip_delimiters(answer)
    if _BOXED in answer and (boxed := _last_boxed(answer)) is not None:
        answer = boxed.strip()
    return answer


def _strip_delimiters(answer: str) -> str:
    """Drop surrounding whitespace, trailing periods, a markdown bold `**...**` and a `$...$` math wrapper."""
    answer = answer.strip().rstrip(".").strip()
    if len(answer) >= 4 and answer.startswith("**") and answer.endswith("**"):
        answer = answer[2:-2].strip().rstrip(".").strip()
    if len(answer) >= 2 and answer[0] == answer[-1] == "$":
        answer = answer[1:-1].strip()
    return answer


# --- normalisation ------------------------------------------------------------------------------


def normalize_answer(answer: str) -> str:
    """Canonical surface form of an answer (see module docstring for the rules)."""
    answer = _strip_delimiters(answer).removeprefix("$").strip()
    if answer.endswith("\\%"):
        answer = answer[:-2]
    answer = answer.removesuffix("%").strip()
    if _THOUSANDS.fullmatch(answer):
        answer = answer.replace(",", "")
    if match := _TRAILING_ZEROS.fullmatch(answer):
        answer = match.group(1)
    return answer


def parse_number(answer: str) -> Fraction | None:
    """Exact value of a plain ASCII integer, decimal or `a/b` after normalisation, else None."""
    answer = normalize_answer(answer)
    if len(answer) > MAX_NUMBER_CHARS:
        return None
    if _DECIMAL.fullmatch(answer) or _FRACTION.fullmatch(answer):
        try:
            return Fraction(answer)
        except ZeroDivisionError:  # "1/0"
            return None
    return None


def parse_bool(answer: str) -> bool | None:
    """True/False for `true`/`false` in any case (trailing period and whitespace ignored), else None."""
    return {"true": True, "false": False}.get(normalize_answer(answer).lower())


# --- equivalence --------------------------------------------------------------------------------


def is_correct(pred: str | None, gold: str, task: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether an extracted prediction matches the gold answer. Never raises on any strings; a
    math-verify comparison takes at most `timeout_s` (plus a one-off worker start). Unknown `task`
    is a programming error and raises ValueError."""
    if task not in ("math", "logic"):
        raise ValueError(f"task must be 'math' or 'logic', got {task!r}")
    if pred is None:
        return False
    if task == "logic":
        pred_bool = parse_bool(pred)
        return pred_bool is not None and pred_bool == parse_bool(gold)
    pred, gold = normalize_answer(pred), normalize_answer(gold)
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    pred_number, gold_number = parse_number(pred), parse_number(gold)
    if pred_number is not None and gold_number is not None:
        return pred_number == gold_number
    if gold_number is not None and not _ASCII_DIGIT.search(pred):
        return False  # only degenerate symbolic identities (x/x) could match; not worth sympy
    if len(pred) > MAX_LATEX_CHARS or len(gold) > MAX_LATEX_CHARS:
        return False
    return latex_equivalent(pred, gold, timeout_s=timeout_s)


def latex_equivalent(pred: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """math-verify equivalence of two answer strings, bounded by `timeout_s` on any thread.
    False on timeout, worker crash or worker start failure (logged); never raises."""
    try:
        worker = _take_worker()
        while worker.proc.poll() is not None:  # an idle worker died meanwhile (killed for memory, say)
            worker.close()
            worker = _take_worker()
    except OSError as error:
        logger.warning("math-verify worker did not start (%s); answer counted as wrong", error)
        return False
    verdict = worker.ask(pred, gold, timeout_s)
    if verdict is None:
        worker.close()
        logger.warning("math-verify gave no verdict within %.2fs; worker restarted", timeout_s)
        return False
    _return_worker(worker)
    return verdict


def warm_up_verifier() -> bool:
    """Start a math-verify worker now, so the first comparison does not pay its start-up.
    Returns whether a worker is ready."""
    try:
        _return_worker(_take_worker())
    except OSError as error:
        logger.warning("math-verify worker did not start (%s)", error)
        return False
    return True


# --- math-verify worker pool --------------------------------------------------------------------


class _Worker:
    """One math-verify subprocess speaking JSON lines: request `[pred, gold]`, reply `1` or `0`."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # keep terminal Ctrl-C away; it exits on stdin EOF instead
        )
        self._pending = b""
        if self._read_line(_WORKER_STARTUP_TIMEOUT_S) != b"ready":
            self.close()
            raise OSError("no ready signal from math-verify worker")

    def ask(self, pred: str, gold: str, timeout_s: float) -> bool | None:
        """The worker's verdict, or None if it did not answer within `timeout_s` or died."""
        try:
            self.proc.stdin.write(json.dumps([pred, gold]).encode("ascii") + b"\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        reply = self._read_line(timeout_s)
        return None if reply is None else reply == b"1"

    def _read_line(self, timeout_s: float) -> bytes | None:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # not select(): that fails for fd >= 1024
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._pending:
            left_ms = (deadline - time.monotonic()) * 1000
            if not left_ms > 0 or not poller.poll(left_ms):  # `not >` also stops on NaN
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # worker exited
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):  # a broken pipe may fail to flush on close
                pipe.close()


_idle_workers: list[_Worker] = []
_idle_lock = threading.Lock()


def _take_worker() -> _Worker:
    with _idle_lock:
        if _idle_workers:
            return _idle_workers.pop()
    return _Worker()  # started outside the lock so other threads are not held up


def _return_worker(worker: _Worker) -> None:
    with _idle_lock:
        if len(_idle_workers) < _MAX_IDLE_WORKERS:
            _idle_workers.append(worker)
            return
    worker.close()


def _forget_parent_workers() -> None:
    """In a forked child the inherited workers belong to the parent; start afresh."""
    global _idle_workers, _idle_lock
    _idle_workers, _idle_lock = [], threading.Lock()


def _close_idle_workers() -> None:
    with _idle_lock:
        while _idle_workers:
            _idle_workers.pop().close()


os.register_at_fork(after_in_child=_forget_parent_workers)
atexit.register(_close_idle_workers)


def _serve() -> None:
    """Worker main loop (this file run as a script). Signal timeouts work here (main thread) and
    only serve as a backstop for a worker whose parent died mid-comparison."""
    from math_verify import parse, verify

    logging.disable(logging.CRITICAL)  # math-verify warns on every timeout/parse failure

    def parse_answer(answer: str) -> list:
        return parse("\\boxed{" + answer + "}", parsing_timeout=_WORKER_BACKSTOP_S)

    print("ready", flush=True)
    for line in sys.stdin:
        try:
            pred, gold = json.loads(line)
            same = verify(parse_answer(gold), parse_answer(pred), timeout_seconds=_WORKER_BACKSTOP_S)
        except Exception:  # any failure is a non-match, never a dead worker
            same = False
        print(1 if same else 0, flush=True)


if __name__ == "__main__":
    _serve()
