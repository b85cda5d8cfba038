"""Entry point: compose the Hydra config, run the experiment it names, write the results.

python src/train.py experiment=warmstart_tiny trainer.max_steps=20
python src/train.py experiment=eval_tiny --trainer.accelerator cpu   # LightningCLI style works too
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
os.environ["PROJECT_ROOT"] = str(PROJECT_ROOT)  # configs resolve paths from this checkout
sys.path.insert(0, str(PROJECT_ROOT / "src"))  # run from a checkout without `pip install -e .`

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from dlr.cli import normalize_cli_args  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from dlr.config import check_settings
    from dlr.runner import run

    check_settings(cfg)  # every numeric setting and the data, before any model loads
    run(cfg)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *normalize_cli_args(sys.argv[1:])]
    main()
