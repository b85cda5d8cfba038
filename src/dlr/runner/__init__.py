"""What `src/train.py` runs: one function per `method.name`, each writing into the run folder.

The flow follows lightning-hydra-template: seed, instantiate data, model, callbacks, loggers and trainer
from the config, fit, evaluate, write results beside the resolved config. `common.py` holds the config
helpers, `arms.py` builds and trains the RL arms, `single.py` runs one job, `compare.py` the comparison.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dlr.resume import resolve_ckpt_path
from dlr.runner.common import check_writable, is_rank_zero, output_dir, prompt_format, quiet_logs, reward_config
from dlr.runner.compare import run_dlr_vs_grpo
from dlr.runner.single import run_dlr, run_evaluate, run_grpo, run_warmstart

METHODS = {
    "warmstart": run_warmstart,
    "evaluate": run_evaluate,
    "dlr": run_dlr,
    "grpo": run_grpo,
    "dlr_vs_grpo": run_dlr_vs_grpo,
}


def run(cfg: DictConfig) -> None:
    quiet_logs()
    if cfg.method.name not in METHODS:
        raise SystemExit(f"error: method.name must be one of {sorted(METHODS)}, got {cfg.method.name!r}")
    reward_config(cfg), prompt_format(cfg)  # a bad reward or prompt setting fails before any model loads
    # A missing checkpoint fails here too; `last` becomes the newest of this task's.
    typed = cfg.get("ckpt_path")
    with open_dict(cfg):
        cfg.ckpt_path = resolve_ckpt_path(
            typed, Path(cfg.paths.log_dir) / cfg.task_name, comparison=cfg.method.name == "dlr_vs_grpo"
        )
    if cfg.ckpt_path != typed and is_rank_zero():
        print(f"ckpt_path={typed}: resuming from {cfg.ckpt_path}")
    out = output_dir(cfg)
    check_writable(out)
    if is_rank_zero():
        OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(cfg.get("num_threads") or torch.get_num_threads())
    METHODS[cfg.method.name](cfg, out)
