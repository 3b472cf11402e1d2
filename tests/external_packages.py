"""Real framework releases the launch tests check against, fetched from the package index on
first use into .ci/ (git-ignored) and reused after: `python -m pytest` alone sets them up,
on a developer's machine as in CI. Without the index the tests that need them skip, saying so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHTITAN_PINS = (
    # what `pip install torchtitan` gives (0.3.0) without its dependencies, plus the light
    # packages its config and model code import (no triton, datasets or tensorboard)
    "torchtitan==0.3.0", "spmd_types==0.2.3", "torchdata==0.11.0", "tyro==1.0.17",
    "docstring-parser==0.18.0", "typeguard==4.6.1", "typing_extensions==4.16.0",
    "tokenizers==0.23.3", "safetensors==0.8.0", "einops==0.8.2",
)
BRIDGE_WHEELS = ("megatron-bridge==0.3.1", "megatron-core==0.16.1")
PIP_TIMEOUT_S = 600


def _pip(args: list[str]) -> bool:
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check",
                               "--quiet", *args], capture_output=True, text=True,
                              timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def ensure_torchtitan(target: Path) -> None:
    """torchtitan 0.3.0 and its light imports under `target`, installed once."""
    if not (target / "torchtitan").is_dir():
        _pip(["install", "--no-deps", "--target", str(target), *TORCHTITAN_PINS])


def ensure_bridge_wheels(target: Path) -> None:
    """The megatron-bridge and megatron-core release wheels in `target`, downloaded once."""
    if not any(target.glob("megatron_bridge-0.3.1-*.whl")) or \
            not any(target.glob("megatron_core-0.16.1-*.whl")):
        _pip(["download", "--no-deps", "-d", str(target), *BRIDGE_WHEELS])
