"""A Hydra sweep of the comparison ranked (`python src/bench.py sweep <multirun folder>`): one row per job
with the values it swept and its final greedy accuracy at the depths it trained on, on the set its
`data.test_seed` drew (a validation set: the sweeps never read the fixed test set)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf


def sweep_rows(folder: Path) -> list[dict]:
    """One row per finished job of `folder` (its numbered sub-folders), best first: the swept overrides,
    each arm's mean start and final accuracy over the trained depths, and the gain between them."""
    rows = []
    for job in sorted(p for p in folder.iterdir() if (p / "summary.json").is_file()):
        cfg = OmegaConf.load(job / "config_resolved.yaml")
        swept = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        low, high = cfg.data.train_depths
        trained = [str(d) for d in range(low, high + 1)]
        for arm, summary in json.loads((job / "summary.json").read_text())["arms"].items():
            start = statistics.fmean(summary["start_accuracy_by_depth"][d] for d in trained)
            final = statistics.fmean(summary["accuracy_by_depth"][d] for d in trained)
            rows.append(
                {
                    "job": job.name,
                    "arm": arm,
                    "overrides": " ".join(swept),
                    "test_seed": cfg.data.test_seed,
                    "trained_depths": f"{low}-{high}",
                    "start": start,
                    "final": final,
                    "gain": final - start,
                }
            )
    if not rows:
        raise SystemExit(f"error: no finished job (a sub-folder with summary.json) in {folder}")
    return sorted(rows, key=lambda r: -r["final"])
