"""Command-line habits from LightningCLI mapped onto Hydra overrides."""

from __future__ import annotations

# Hydra's own flags keep their meaning; every other `--key` is read as a config override.
HYDRA_FLAGS = {
    "--help",
    "--hydra-help",
    "--version",
    "--cfg",
    "--resolve",
    "--package",
    "--run",
    "--multirun",
    "--shell-completion",
    "--config-path",
    "--config-name",
    "--config-dir",
    "--info",
    "--experimental-rerun",
}
HYDRA_SHORT_FLAGS = {"-h", "-c", "-p", "-r", "-m", "-sc", "-cp", "-cn", "-cd", "-i"}


def normalize_cli_args(args: list[str]) -> list[str]:
    """`--trainer.max_steps=5` and `--trainer.max_steps 5` become `trainer.max_steps=5`."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if not arg.startswith("--") or name in HYDRA_FLAGS or len(arg) == 2:
            out.append(arg)
        elif "=" in arg:
            out.append(arg[2:])
        elif i + 1 < len(args) and _is_value(args[i + 1]):
            out.append(f"{arg[2:]}={args[i + 1]}")
            i += 1
        else:
            raise SystemExit(f"error: option {arg} needs a value (write {arg}=VALUE)")
        i += 1
    return out


def _is_value(arg: str) -> bool:
    """The word after `--key` is its value unless it is itself a flag or an override."""
    return not arg.startswith("--") and arg not in HYDRA_SHORT_FLAGS and "=" not in arg
