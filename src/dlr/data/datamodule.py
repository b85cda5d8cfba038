"""Streams of records for training and a fixed test set, for every data source (docs/design.md §9).

Batches are plain `list[Record]`: each method tokenizes for its own models (the assistant and the
main model may have different tokenizers), so the data side stays model-agnostic.

Procedural streams derive record i from a seed string `"{seed}:{rank}:{i}"`, so the stream is the
same on every run, distinct per DDP rank, and can be resumed from any position. Train and test use
disjoint seeds and no test question ever appears in the train stream.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from dlr.data import synthetic_logic, synthetic_math
from dlr.data.frontier import DepthFrontier
from dlr.data.schema import Record, SkipCounter

GENERATORS: dict[str, Callable[..., Record]] = {  # (rng, depth, index, id_prefix, **task options) -> Record
    "math": synthetic_math.generate,
    "logic": synthetic_logic.generate,
}
SYNTHETIC_SOURCES = {"synthetic_math": {"math": 1.0}, "synthetic_logic": {"logic": 1.0}}
HUB_SOURCES = ("gsm8k", "math500", "prontoqa")


@dataclass(frozen=True)
class ProceduralSpec:
    """What a procedural stream draws: task weights, an inclusive depth range and, for training streams,
    an inclusive range of extra distractor rules per logic problem (synthetic_logic.py)."""

    task_weights: dict[str, float]  # e.g. {"math": 0.5, "logic": 0.5}
    min_depth: int
    max_depth: int
    logic_extra_distractors: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        unknown = set(self.task_weights) - set(GENERATORS)
        if unknown or not self.task_weights:
            raise ValueError(f"data task weights must name tasks from {sorted(GENERATORS)}, got {self.task_weights}")
        if any(w < 0 for w in self.task_weights.values()) or sum(self.task_weights.values()) <= 0:
            raise ValueError(f"data task weights must be >= 0 with a positive sum, got {self.task_weights}")
        if not 1 <= self.min_depth <= self.max_depth:
            raise ValueError(f"data depths need 1 <= min_depth <= max_depth, got {self.min_depth}..{self.max_depth}")
        deepest = min(self.max_depth, synthetic_logic.MAX_DEPTH)  # deeper fails in the generator, naming depth
        synthetic_logic.check_extra_distractors(self.logic_extra_distractors, deepest, "data.logic_extra_distractors")

    def task_options(self, task: str) -> dict:
        """Keyword options of `task`'s generator."""
        return {"extra_distractors": self.logic_extra_distractors} if task == "logic" else {}


def procedural_record(
    spec: ProceduralSpec, seed: int, rank: int, index: int, frontier: DepthFrontier | None = None
) -> Record:
    """Record `index` of the stream `(seed, rank)`; a pure function of its arguments (the frontier's
    depth weights included): depths uniform, or drawn by the frontier's weights."""
    rng = random.Random(f"{seed}:{rank}:{index}")
    tasks = sorted(spec.task_weights)
    task = rng.choices(tasks, weights=[spec.task_weights[t] for t in tasks])[0]
    if frontier is None:
        depth = rng.randint(spec.min_depth, spec.max_depth)
    else:
        depth = rng.choices(list(frontier.depths), weights=frontier.weights(task))[0]
    return GENERATORS[task](rng, depth, index, f"{task}-s{seed}-r{rank}", **spec.task_options(task))


def fixed_test_set(spec: ProceduralSpec, seed: int, per_depth: int) -> list[Record]:
    """`per_depth` problems for every (task, depth) of `spec`, in a fixed order."""
    records = []
    for task in sorted(t for t, w in spec.task_weights.items() if w > 0):
        options = spec.task_options(task)
        for depth in range(spec.min_depth, spec.max_depth + 1):
            rng = random.Random(f"test:{seed}:{task}:{depth}")
            records += [GENERATORS[task](rng, depth, i, f"{task}-test-d{depth}", **options) for i in range(per_depth)]
    return records


class ProceduralStream(IterableDataset):
    """Infinite seeded stream of procedural records, skipping any question that is in the test set;
    with a frontier, each record's depth is drawn by the frontier's weights at the time it is drawn."""

    def __init__(
        self,
        spec: ProceduralSpec,
        seed: int,
        rank: int,
        exclude_questions: frozenset[str],
        frontier: DepthFrontier | None = None,
    ) -> None:
        self.spec, self.seed, self.rank, self.frontier = spec, seed, rank, frontier
        self.exclude_questions = exclude_questions
        self.next_index = 0  # position in the stream; saved and restored on resume
        self.skipped = SkipCounter()

    def __iter__(self) -> Iterator[Record]:
        while True:
            record = procedural_record(self.spec, self.seed, self.rank, self.next_index, self.frontier)
            self.next_index += 1
            if record.question in self.exclude_questions:
                self.skipped.skip("question is in the test set")
                continue
            yield record


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` of a hub training stream visits its `count` records: a permutation
    drawn from `(seed, epoch)` alone, so each seed reads its own order, every epoch another, on every run."""
    order = list(range(count))
    random.Random(f"hub:{seed}:{epoch}").shuffle(order)
    return order


class HubStream(IterableDataset):
    """Records of a hub dataset (or a local JSONL file in its schema), in a seeded order that changes every
    epoch, sharded by rank, skipping test-set questions (single-split releases train and test on one split).

    The split is read once and kept: the training splits are small (GSM8K's 7,473 records are a few MB) and
    record i of the stream is then a pure function of (seed, rank, i), so a resumed run goes on from its
    position (`next_index`) exactly as the procedural streams do. Epoch e visits `epoch_order(n, seed, e)`
    and rank r takes every world_size-th record of it from the r-th."""

    def __init__(
        self,
        name: str,
        split: str,
        local_path: str | None,
        seed: int,
        rank: int,
        world_size: int,
        exclude_questions: frozenset[str],
    ) -> None:
        self.name, self.split, self.local_path, self.seed = name, split, local_path, seed
        self.rank, self.world_size = rank, world_size
        self.exclude_questions = exclude_questions
        self.next_index = 0  # position in this rank's stream; saved and restored on resume
        self.skipped = SkipCounter()
        self._records: list[Record] | None = None
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, this rank's record indices in that epoch)

    def records(self) -> list[Record]:
        """The split's usable records in file order, read on first use (malformed rows and test-set
        questions are counted in `skipped`)."""
        if self._records is None:
            from dlr.data.hub import stream_hub_records

            rows = stream_hub_records(self.name, self.split, self.skipped, local_path=self.local_path)
            self._records = []
            for record in rows:
                if record.question in self.exclude_questions:
                    self.skipped.skip("question is in the test set")
                else:
                    self._records.append(record)
        return self._records

    def record_at(self, index: int) -> Record:
        """Record `index` of this rank's stream."""
        records = self.records()
        per_epoch = len(range(self.rank, len(records), self.world_size))
        if per_epoch == 0:
            raise ValueError(f"dataset {self.name!r} split {self.split!r} has no valid records for rank {self.rank}")
        epoch, offset = divmod(index, per_epoch)
        if self._order[0] != epoch:  # one permutation per epoch, drawn when the epoch starts
            self._order = (epoch, epoch_order(len(records), self.seed, epoch)[self.rank :: self.world_size])
        return records[self._order[1][offset]]

    def __iter__(self) -> Iterator[Record]:
        while True:
            record = self.record_at(self.next_index)
            self.next_index += 1
            yield record


class ReasoningDataModule(LightningDataModule):
    """Train stream and fixed test set for one data source.

    `source`: synthetic_math | synthetic_logic | mixed | gsm8k | math500 | prontoqa. `frontier`
    (procedural sources): `{enabled, floor, decay}` of the depth frontier (frontier.py); the arm's
    rollouts update it through `callbacks/frontier.py`. `logic_extra_distractors` (procedural sources):
    inclusive range of extra distractor rules per logic problem of the training stream; the fixed test
    set never has them. Hub sources read `train_split` and `test_split` from the hub, or local JSONL files in
    the release's schema instead: `train_path` and `test_path` one for each, or `local_path` one for both
    (the test set is its first `test_size` records, training reads the rest).
    """

    def __init__(
        self,
        source: str,
        batch_size: int,
        train_depths: Sequence[int],
        eval_depths: Sequence[int],
        train_seed: int,
        test_seed: int,
        test_per_depth: int,
        mix_weights: dict[str, float] | None = None,
        train_split: str | None = None,
        test_split: str | None = None,
        local_path: str | None = None,
        train_path: str | None = None,
        test_path: str | None = None,
        test_size: int = 200,
        frontier: dict | None = None,
        logic_extra_distractors: Sequence[int] = (0, 0),
    ) -> None:
        super().__init__()
        if source not in (*SYNTHETIC_SOURCES, "mixed", *HUB_SOURCES):
            raise ValueError(
                f"data.source must be one of {sorted([*SYNTHETIC_SOURCES, 'mixed', *HUB_SOURCES])}, got {source!r}"
            )
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.source, self.batch_size = source, batch_size
        self.train_seed, self.test_seed, self.test_per_depth = train_seed, test_seed, test_per_depth
        if source in HUB_SOURCES:  # a release's own held-out split unless configured otherwise
            from dlr.data.hub import HUB_DATASETS

            default = HUB_DATASETS[source].default_split
            train_split, test_split = train_split or default, test_split or default
        if local_path and (train_path or test_path):
            raise ValueError(
                "data.local_path serves both splits: set it alone, or set data.train_path and data.test_path instead"
            )
        for key, path in (
            ("data.local_path", local_path),
            ("data.train_path", train_path),
            ("data.test_path", test_path),
        ):
            if path and not Path(path).is_file():
                raise ValueError(
                    f"{key}={path}: no such file (a JSONL file in the hub schema, relative to {Path.cwd()})"
                )
        self.train_split, self.test_split, self.test_size = train_split, test_split, test_size
        # (config key, local JSONL file) each split reads instead of the hub; a file of None: the hub
        self.train_file_setting = ("data.train_path", train_path) if train_path else ("data.local_path", local_path)
        self.test_file_setting = ("data.test_path", test_path) if test_path else ("data.local_path", local_path)
        weights = dict(mix_weights or {}) if source == "mixed" else SYNTHETIC_SOURCES.get(source, {})
        extra = tuple(logic_extra_distractors)
        if extra != (0, 0) and not weights:
            raise ValueError(f"data.logic_extra_distractors needs a procedural source, got {source!r}")
        self.train_spec = ProceduralSpec(weights, *train_depths, logic_extra_distractors=extra) if weights else None
        self.eval_spec = ProceduralSpec(weights, *eval_depths) if weights else None
        self.frontier = self._frontier(dict(frontier or {}))
        self._test_set: list[Record] | None = None
        self._test_skipped = SkipCounter()
        self.train_stream: ProceduralStream | HubStream | None = None
        # Lightning fetches one batch ahead, so the stream's own position runs ahead of training: each
        # batch carries the position after it, and only batches actually used advance `_consumed`.
        self._batch_ends: deque[int] = deque()
        self._consumed = 0

    def _frontier(self, settings: dict) -> DepthFrontier | None:
        unknown = set(settings) - {"enabled", "floor", "decay"}
        if unknown:
            raise ValueError(f"data.frontier has unknown keys {sorted(unknown)} (known: enabled, floor, decay)")
        if not settings.pop("enabled", False):
            return None
        if self.train_spec is None:
            raise ValueError(f"data.frontier.enabled needs a procedural source (depths to draw), got {self.source!r}")
        tasks = tuple(sorted(t for t, w in self.train_spec.task_weights.items() if w > 0))
        return DepthFrontier(tasks, self.train_spec.min_depth, self.train_spec.max_depth, **settings)

    @property
    def is_procedural(self) -> bool:
        return self.train_spec is not None

    @property
    def train_file(self) -> str | None:
        return self.train_file_setting[1]

    @property
    def test_file(self) -> str | None:
        return self.test_file_setting[1]

    def check_source(self) -> None:
        """Fail at start (before any model loads) when a hub dataset cannot be reached or read."""
        if not self.is_procedural:
            from dlr.data.hub import check_hub_dataset

            for split, file in {(self.train_split, self.train_file), (self.test_split, self.test_file)}:
                check_hub_dataset(self.source, split, file)

    def _reads_one_source(self) -> bool:
        """Whether the training stream and the test set read the same rows (one file, or one split of a
        release): the test set is then the first `test_size` of them and training gets the rest."""
        if self.train_file or self.test_file:
            return self.train_file == self.test_file
        return self.train_split == self.test_split

    def check_training_data(self) -> None:
        """Fail at start (before any model loads) when the test set leaves the training stream no record:
        one file or split for both, with `test_size` at least its number of valid records."""
        if self.is_procedural or not self._reads_one_source():
            return  # a split of its own: check_source finds it empty, if it is
        from dlr.data.hub import stream_hub_records

        self.check_source()  # an unreachable hub fails fast here, not after `datasets`' retries
        test_questions = frozenset(r.question for r in self.test_records())
        rows = stream_hub_records(self.source, self.train_split, SkipCounter(), local_path=self.train_file)
        if all(record.question in test_questions for record in rows):
            where = "{}={}".format(*self.train_file_setting) if self.train_file else f"split {self.train_split!r}"
            raise ValueError(
                f"data.test_size={self.test_size} takes all {len(test_questions)} valid records of {where} for the "
                "test set, leaving none to train on: lower data.test_size, or give the training records a file of "
                "their own with data.train_path and data.test_path"
            )

    def test_records(self) -> list[Record]:
        """The fixed test set (same on every call, every rank, every run)."""
        if self._test_set is None:
            if self.eval_spec is not None:
                self._test_set = fixed_test_set(self.eval_spec, self.test_seed, self.test_per_depth)
            else:
                from dlr.data.hub import stream_hub_records

                rows = stream_hub_records(self.source, self.test_split, self._test_skipped, local_path=self.test_file)
                self._test_set = list(itertools.islice(rows, self.test_size))
                if not self._test_set:  # e.g. a file in another release's schema: every row is malformed
                    where = "{}={}".format(*self.test_file_setting) if self.test_file else f"split {self.test_split!r}"
                    raise ValueError(
                        f"{where} has no valid {self.source} records (skipped: {dict(self._test_skipped.by_reason)})"
                    )
        return self._test_set

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is not None:
            return
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        exclude = frozenset(r.question for r in self.test_records())
        if self.train_spec is not None:
            self.train_stream = ProceduralStream(self.train_spec, self.train_seed, rank, exclude, self.frontier)
        else:
            self.train_stream = HubStream(
                self.source, self.train_split, self.train_file, self.train_seed, rank, world, exclude
            )

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """Records dropped so far, by stream and reason (malformed rows, test-set questions)."""
        counts = {"test": dict(self._test_skipped.by_reason)}
        if self.train_stream is not None:
            counts["train"] = dict(self.train_stream.skipped.by_reason)
        return counts

    def _collate(self, records: list[Record]) -> list[Record]:
        self._batch_ends.append(self.train_stream.next_index)
        return records

    def train_dataloader(self) -> DataLoader:
        self.setup()
        # Records are cheap to make or kept in memory; one process keeps the stream position exact for resuming.
        return DataLoader(self.train_stream, batch_size=self.batch_size, collate_fn=self._collate, num_workers=0)

    def transfer_batch_to_device(self, batch: list[Record], device, dataloader_idx: int) -> list[Record]:
        return batch  # records are text; each method makes its tensors on its own device

    def on_before_batch_transfer(self, batch: list[Record], dataloader_idx: int) -> list[Record]:
        if self._batch_ends:  # this batch is now being trained on
            self._consumed = self._batch_ends.popleft()
        return batch

    def state_dict(self) -> dict:
        """The stream position (procedural and hub streams alike) and the frontier's estimate. On resume the
        one batch Lightning had fetched ahead is drawn again, by the restored estimate (which has seen one
        batch more)."""
        if self.train_stream is None:
            return {}
        state = {"next_index": self._consumed}
        if self.frontier is not None:
            state["frontier"] = self.frontier.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.setup()
        if "next_index" in state:  # a hub stream saved by an earlier version has none: it starts over
            self.train_stream.next_index = self._consumed = state["next_index"]
            self._batch_ends.clear()
        if self.frontier is not None and "frontier" in state:
            self.frontier.load_state_dict(state["frontier"])
