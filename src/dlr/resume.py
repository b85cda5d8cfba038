"""`ckpt_path`, checked before any model loads. `last` means, as a Lightning user means it, the newest
`checkpoints/last.ckpt` of this task (`logs/<task_name>/<run>/`), not the empty folder of the run starting now."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def newest(paths: Iterable[Path]) -> Path | None:
    """The most recently written of `paths` (a timestamped folder name says when a run began, not when it saved)."""
    return max(paths, key=lambda path: path.stat().st_mtime, default=None)


def newest_last_checkpoint(task_dir: Path) -> Path | None:
    """The newest `<run>/checkpoints/last.ckpt` among the task's run folders."""
    return newest(task_dir.glob("*/checkpoints/last.ckpt"))


def newest_interrupted_comparison(task_dir: Path) -> Path | None:
    """The run folder of a comparison whose newest checkpoint belongs to an unfinished (arm, seed): one whose
    `<run>/<arm>/seed_N/` holds `checkpoints/last.ckpt` but no `result.json`."""
    unfinished = [
        ckpt
        for ckpt in task_dir.glob("*/*/seed_*/checkpoints/last.ckpt")
        if not (ckpt.parents[1] / "result.json").exists()
    ]
    ckpt = newest(unfinished)
    return ckpt.parents[3] if ckpt is not None else None


def resolve_ckpt_path(ckpt_path: str | None, task_dir: Path, comparison: bool) -> str | None:
    """The checkpoint to resume from (None: start fresh); where there is none, SystemExit with one line.

    A comparison resumes each (arm, seed) from its own checkpoint when rerun in its run folder, so it takes
    no `ckpt_path`: the error names the folder to rerun in. A URL (`s3://...`) is left to Lightning.
    """
    if ckpt_path is None:
        return None
    if comparison:
        folder = newest_interrupted_comparison(task_dir) if ckpt_path == "last" else None
        where = folder or f"{task_dir}/<timestamp>"
        raise SystemExit(
            f"error: a comparison takes no ckpt_path (each arm and seed resumes from its own checkpoint): "
            f"drop ckpt_path={ckpt_path} and rerun in the run's folder, hydra.run.dir={where}"
        )
    if ckpt_path == "last":
        last = newest_last_checkpoint(task_dir)
        if last is None:
            raise SystemExit(
                f"error: ckpt_path=last: no checkpoint to resume, nothing matches {task_dir}/*/checkpoints/last.ckpt"
            )
        return str(last)
    if "://" not in ckpt_path and not Path(ckpt_path).is_file():
        raise SystemExit(f"error: ckpt_path={ckpt_path}: no such checkpoint file")
    return ckpt_path
