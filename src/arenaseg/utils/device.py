"""Which torch device a job runs on, and how a result names it (so CPU and GPU numbers never mix unnoticed)."""

from __future__ import annotations

import torch

from arenaseg.utils.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first GPU when torch sees one, else the CPU; naming an absent GPU is an error, not a
    silent fall-back, because CPU and GPU runs of one benchmark must not be confused."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device {name!r}: use {DEVICE_CHOICES}") from err
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}: use {DEVICE_CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but torch sees no CUDA GPU here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def device_kind(device: torch.device | str | None) -> str:
    """The kind, cpu or gpu, of a torch device or of a `utils.provenance.device_name` string (as stored in
    run.json); "unknown" for a record that names no device, so that it never passes for either kind."""
    if isinstance(device, torch.device):
        return "gpu" if device.type == "cuda" else "cpu"
    if not device:
        return "unknown"
    return "cpu" if device.startswith("cpu") else "gpu"
