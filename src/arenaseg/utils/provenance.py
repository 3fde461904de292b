"""Where a result came from: the code's commit and the device's name, recorded in every run and benchmark file."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch


@functools.cache
def git_commit() -> str:
    """Short commit of this code, read once per process (the CLI reads it at start), so that a long bench whose
    checkout moves on records the code it imported; "-dirty" when the package's tracked files differed from it.
    $ARENASEG_COMMIT, when set, wins: a working tree copied to another machine (e.g. a rented GPU) may carry no
    .git, or a stale one that names an older commit."""
    if os.environ.get("ARENASEG_COMMIT"):
        return os.environ["ARENASEG_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", str(Path(__file__).parents[1]))
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's model, or the CPU's with the torch thread count (``utils.device.device_kind`` reads it back)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
