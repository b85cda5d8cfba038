"""A shipped DLR stage 1: the state latent alignment trains (assistant adapters, heads, projector),
saved with the hash of the frozen main it was trained against and what it cost.

Stage 1 needs more compute than the CPU main job's budget holds, so it is trained once per readout
(`STAGE1_COMMANDS`: `experiment=dlr_stage1_tiny` and `dlr_stage1_tiny_answer`), shipped under
`data/backbones/tiny/dlr_stage1/<readout>/`, and loaded by `method.alignment.init_from`. Loading
it over another main model, another readout or other latent sizes fails, saying which.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dlr.models.readout import READOUTS

STATE_FILE, INFO_FILE = "stage1.safetensors", "stage1.json"
STAGE1_COMMANDS = {  # what regenerates the tiny backbone's shipped stage 1 of each readout
    "rationale": "python src/train.py experiment=dlr_stage1_tiny",
    "answer": "python src/train.py experiment=dlr_stage1_tiny_answer",
}
STAGE1_PREFIXES = ("policy.", "projector.")  # the critic and pi_ref are not stage 1's
# the latent settings a stage 1 was trained for, by mode: what its state's shapes and its chains' meaning depend on
MATCHING_SETTINGS = {
    "parallel": ("steps", "dim", "mode", "num_modes", "projector"),
    "recurrent": ("max_steps", "dim", "mode", "compression", "projector", "init"),  # init: the chain's start token
}
# folders that predate a key hold what was then the only choice
WRITTEN_BEFORE_THE_KEY = {"projector": "mlp", "init": "random"}


def matching_settings(latent) -> dict:
    """The latent settings a stage 1 must share with the run that loads it."""
    return {key: getattr(latent, key) for key in MATCHING_SETTINGS[latent.mode]}


def stage1_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable stage-1 tensors of a DLR module (backbone weights left out: they are reloaded)."""
    return {
        key: value.detach().cpu().contiguous()
        for key, value in module.state_dict().items()
        if key.startswith(STAGE1_PREFIXES) and not module.is_backbone_key(key)
    }


def export_stage1(module: torch.nn.Module, folder: Path, info: dict) -> None:
    """Write `stage1.safetensors` and `stage1.json` (info + the main's hash, readout and latent sizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(stage1_state(module), str(folder / STATE_FILE))
    settings = module.settings
    header = {
        "main_sha256": module.main_sha256,
        "readout": settings.readout,
        "latent": matching_settings(settings.latent),
    }
    (folder / INFO_FILE).write_text(json.dumps({**header, **info}, indent=2) + "\n")


def stage1_folder(path: Path, readout: str) -> Path:
    """`path` holds one stage 1, or one sub-folder of them per readout: the one for `readout`, named
    even when only another readout's sub-folder exists (so a missing one is reported by its own path)."""
    by_readout = not (path / INFO_FILE).is_file() and any((path / kind).is_dir() for kind in READOUTS)
    return path / readout if by_readout else path


def shipped_stage1_folder(path: Path, readout: str, regenerate: str) -> Path:
    """The folder of `readout`'s stage 1 under `path` (`stage1_folder`), holding its state and info;
    ValueError naming that folder and `regenerate`, the command that builds it, when they are missing."""
    folder = stage1_folder(path, readout)
    if not (folder / STATE_FILE).is_file() or not (folder / INFO_FILE).is_file():
        raise ValueError(
            f"method.alignment.init_from={path} holds no {STATE_FILE} + {INFO_FILE} for the {readout} readout "
            f"(looked in {folder}); build it with `{regenerate}`"
        )
    return folder


def load_stage1(module: torch.nn.Module, folder: Path, regenerate: str) -> dict:
    """Load a shipped stage 1 into `module` (from `folder` or its sub-folder for the module's
    readout); returns its info. `regenerate` is the command that rebuilds it, quoted in the errors."""
    folder = shipped_stage1_folder(folder, module.settings.readout, regenerate)
    info = json.loads((folder / INFO_FILE).read_text())
    if info["main_sha256"] != module.main_sha256:
        raise ValueError(
            f"the stage 1 in {folder} was trained against another main model (SHA-256 {info['main_sha256'][:12]}…, "
            f"this one is {str(module.main_sha256)[:12]}…): regenerate it with `{regenerate}`"
        )
    settings = module.settings
    wanted = {"readout": settings.readout, **matching_settings(settings.latent)}
    shipped = {"readout": info["readout"], **WRITTEN_BEFORE_THE_KEY, **info["latent"]}
    shipped = {key: shipped.get(key) for key in wanted}  # keys of the other mode are not compared
    if wanted != shipped:
        raise ValueError(f"the stage 1 in {folder} was trained with {shipped}, this run asks for {wanted}")
    state = load_file(str(folder / STATE_FILE))
    expected = set(stage1_state(module))
    if set(state) != expected:
        raise ValueError(
            f"the stage 1 in {folder} does not fit this DLR module: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - expected)[:5]} (different adapters?): regenerate it with `{regenerate}`"
        )
    module.load_state_dict(state, strict=False)
    return info
