"""Shared fixtures: composing the Hydra config as `src/train.py` does, settings built from it (the YAML is the
one source of their values: `settings_from_yaml(DLRSettings, "dlr", {"rl": {"beta": 0.0}})` changes one), and
a tiny model built locally."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlr.config import CONFIG_DIR, compose_config, reward_from_yaml, settings_from_yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
__all__ = ["CONFIG_DIR", "compose_config", "quiet_cpu_trainer", "reward_from_yaml", "run_train", "settings_from_yaml"]


def run_train(args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python src/train.py ARGS` the way a user does; output captured as text."""
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def quiet_cpu_trainer(tmp_path: Path, max_steps: int):
    """A Lightning Trainer for in-process fits of a module: CPU, no logger, checkpoints, bar or summary."""
    from lightning import Trainer

    return Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> Path:
    """An untrained tiny main + assistant with the project's tokenizer, saved like the shipped backbone."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    from dlr.models import tiny

    folder = tmp_path_factory.mktemp("tiny_backbone")
    tokenizer = tiny.build_tokenizer()
    shape = tiny.TinyShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    for name, model in (
        ("main", LlamaForCausalLM(tiny.main_config(tokenizer, shape))),
        ("assistant", Qwen2ForCausalLM(tiny.assistant_config(tokenizer, shape))),
    ):
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    return folder
