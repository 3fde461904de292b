"""Mixed precision for training and inference: ``fp32`` (no autocast), ``bf16`` or ``fp16`` (torch.autocast on the
forward and the loss; fp16 adds a GradScaler, since its narrow exponent range underflows small gradients).

Autocast only lowers the operations it lists (matmuls, convolutions); parameters, their gradients, the optimizers'
states and the proximal step on ARENA's gates stay float32 in every mode. Default: fp32 on every device. bf16 is
the usual GPU choice, but no GPU measurement backs it here yet (benchmarks/results/step_time.md), and on the CPU
bf16 needs the Dice-parity check of issue 15 first. fp16 on the CPU works but is much slower than fp32 on CPUs
without native half-precision kernels (8-12x for a tiny Swin-UNETR training step on our x86 machine).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from arenaseg.utils.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_PRECISION = "fp32"  # on every device, for the reasons above
PRECISION_HELP = (
    "autocast precision of the forward pass and loss: fp32 (none), bf16, or fp16 (with loss scaling); weights and "
    "optimizer states stay float32. fp32 on every device until bf16's Dice parity is measured; fp16 is slow on CPUs "
    "without half-precision kernels"
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """UserError unless ``precision`` is known and torch's autocast runs it on ``device``'s type."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return
    with warnings.catch_warnings():  # an unsupported dtype makes autocast warn and switch itself off
        warnings.simplefilter("ignore")
        supported = torch.amp.is_autocast_available(device.type)
        if supported:
            with torch.autocast(device.type, dtype=DTYPES[precision]):
                supported = torch.is_autocast_enabled(device.type)
    if not supported:
        raise UserError(f"torch {torch.__version__} cannot autocast to {precision} on {device.type}; use fp32")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context for a forward pass (and loss) in ``precision``; fp32 is a no-op."""
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16; for the other precisions a disabled scaler whose scale/step/update are plain calls."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
