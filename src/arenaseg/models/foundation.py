"""Our own foundation-model files: safetensors weights whose metadata carries the architecture, plus a card.

A file is ``NAME.safetensors`` (tensors, and the ``ModelConfig`` as JSON in the header metadata) with
``NAME.json`` (the model card: data, cases, steps, metrics) and ``NAME.md`` (the same card for people) beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr
from arenaseg.utils.atomic import atomic_path, write_json, write_text
from arenaseg.utils.errors import UserError

CONFIG_KEY = "arenaseg_model_config"


def save_foundation(
    path: str | Path, model: nn.Module, config: ModelConfig, card: dict | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write weights (+ card JSON/Markdown when given) atomically; returns the .safetensors path.

    ``dtype=torch.float16`` halves a shipped file: floating tensors are stored in it and integer buffers (the Swin
    blocks' relative position indices, ~1 MB each as int64) as int16 when they fit; loading casts both back.
    """
    path = Path(path).with_suffix(".safetensors")
    tensors = {k: _compact(v, dtype).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={CONFIG_KEY: json.dumps(config.to_dict())})
    if card is not None:
        write_json(path.with_suffix(".json"), card)
        write_text(path.with_suffix(".md"), card_markdown(card))
    return path


def _compact(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None:
        return tensor
    if tensor.is_floating_point():
        return tensor.to(dtype)
    small = torch.iinfo(torch.int16)
    if tensor.numel() and small.min <= int(tensor.min()) and int(tensor.max()) <= small.max:
        return tensor.to(torch.int16)
    return tensor


def read_config(path: str | Path) -> ModelConfig:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise UserError(f"{path}: not a readable safetensors file (truncated or damaged?): {err}") from None
    if CONFIG_KEY not in meta:
        raise UserError(f"{path}: not an arenaseg foundation file (no {CONFIG_KEY!r} in its safetensors metadata)")
    try:
        return ModelConfig.from_dict(json.loads(meta[CONFIG_KEY]))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise UserError(f"{path}: its model configuration ({CONFIG_KEY}) is invalid: {err}") from None


def load_foundation(path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """Build the model its metadata describes and load the weights strictly."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"foundation model file not found: {path}")
    config = read_config(path)
    try:
        model = build_swin_unetr(config)
    except (TypeError, ValueError) as err:  # MONAI checks the architecture's numbers with ValueError
        raise UserError(f"{path}: its model configuration does not build a Swin-UNETR: {err}") from None
    try:
        state = load_file(str(path))
    except Exception as err:  # SafetensorError for damaged files
        raise UserError(f"{path}: cannot read its tensors (truncated or damaged?): {err}") from None
    load_state_strict(model, state, source=str(path))
    return model, config


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor or fail with the first missing, unexpected or mis-shaped key named."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if bad_shape:
            k = bad_shape[0]
            parts.append(
                f"shape mismatch at {k!r}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                f" ({len(bad_shape)} mismatching)"
            )
        if missing:
            parts.append(f"{len(missing)} missing keys, first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first {unexpected[0]!r}")
        raise UserError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def card_markdown(card: dict) -> str:
    lines = [f"# {card.get('name', 'foundation model')}", ""]
    for key, value in card.items():
        if key == "name":
            continue
        if isinstance(value, dict):
            lines.append(f"## {key}")
            lines += [f"- {k}: {v}" for k, v in value.items()]
            lines.append("")
        else:
            lines.append(f"- **{key}**: {value}")
    return "\n".join(lines) + "\n"
