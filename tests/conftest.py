"""Shared fixtures: composing the Hydra config as `src/train.py` does, and a tiny model built locally."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides or [])


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
