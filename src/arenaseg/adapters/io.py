"""Adapter files: an adapted model's trained tensors, stored apart from its (large, frozen) base; and PEFT export.

An adapter folder holds ``adapter.safetensors`` (only the tensors the method trains: adapters + head; the whole
state dict for ``fft``) and ``adapter_config.json`` (method, options, targets, per-layer ranks, the rank allocation
that shapes alone do not restore, and the base model's signature). Each file is written atomically, the config
last, so a folder with a config always has its weights.

The base signature is every base ``state_dict`` entry's name and shape (parameters and buffers), stored in full so
that a base that does not fit is reported by its first mismatching tensor, plus ``fingerprint``, the sha256 of the
sorted entries, to tell bases apart at a glance. It checks the architecture, not the weight values: loading an
adapter onto another checkpoint of the same architecture is the caller's responsibility (values would need the
whole 62M-parameter base hashed, or a choice of tensors that some method does not change, e.g. PiSSA rewrites the
weights it wraps).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import peft
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

import arenaseg
from arenaseg.adapters.arena import arena_layers
from arenaseg.adapters.config import AdaptOptions
from arenaseg.adapters.factory import adapt_model
from arenaseg.adapters.tuners import AdaptedModel
from arenaseg.models.swin_unetr import HEAD_NAME
from arenaseg.utils.atomic import atomic_path, write_json
from arenaseg.utils.errors import UserError

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "arenaseg-adapter"
FORMAT_VERSION = 1
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"

Shapes = dict[str, tuple[int, ...]]


def base_fingerprint(shapes: Shapes) -> str:
    """sha256 over the sorted ``name:shape`` lines of a base state dict."""
    text = "".join(f"{name}:{list(shape)}\n" for name, shape in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _shapes(tensors: dict[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _check_fits(expected: Shapes, found: Shapes, what: str) -> None:
    """ValueError naming the first tensor whose name or shape differs (expected order, then unexpected extras)."""
    for name, shape in expected.items():
        if found.get(name) != shape:
            got = found.get(name, "no such tensor")
            raise UserError(f"{what}: first mismatching tensor {name!r}: expected shape {shape}, found {got}")
    extra = [name for name in found if name not in expected]
    if extra:
        raise UserError(
            f"{what}: first mismatching tensor {extra[0]!r}: expected no such tensor, found shape {found[extra[0]]}"
            f" ({len(extra)} unexpected)"
        )


def save_adapter(adapted: AdaptedModel, folder: str | Path, preprocess: dict | None = None) -> Path:
    """Write the adapter folder (see the module docstring); returns the folder. ``preprocess`` (the settings the
    adapter was trained on, e.g. its intensity scaling) is recorded in the config when given."""
    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapted.adapter_state_dict().items()}
    fingerprint = base_fingerprint(adapted.base_shapes)
    report = adapted.rank_report()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": adapted.method,
        "options": adapted.options.to_dict(),
        "targets": adapted.targets,
        "ranks": {
            name: {k: e[k] for k in ("initial_rank", "allocated_rank", "active_rank")}
            for name, e in report["layers"].items()
        },
        "allocation": adapted.allocation(),
        "trainable_params": adapted.trainable_params,
        "tensors": {k: list(v) for k, v in _shapes(tensors).items()},
        "base": {"fingerprint": fingerprint, "tensors": [[k, list(v)] for k, v in adapted.base_shapes.items()]},
        "versions": {"arenaseg": arenaseg.__version__, "peft": peft.__version__, "torch": torch.__version__},
    }
    if preprocess is not None:
        config["preprocess"] = preprocess
    with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "base_fingerprint": fingerprint})
    write_json(folder / ADAPTER_CONFIG, config)
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found: an adapter folder holds {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}"
            )
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{folder / ADAPTER_CONFIG} is not an {FORMAT} v{FORMAT_VERSION} config "
            f"(format {config.get('format')!r}, version {config.get('format_version')!r})"
        )
    return config


def read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise UserError(f"{path}: not a readable safetensors file (truncated or damaged?): {err}") from None


def load_adapter(model: nn.Module, folder: str | Path) -> AdaptedModel:
    """Re-adapt a fresh base ``model`` as the saved adapter was (ARENA at its saved, pruned ranks) and load the
    saved tensors strictly. The base and the file are checked before the model is touched: a base that does not
    fit raises ValueError naming its first mismatching tensor and leaves the model unchanged."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    expected_base = {name: tuple(shape) for name, shape in config["base"]["tensors"]}
    _check_fits(expected_base, _shapes(model.state_dict()), f"the base model does not fit the adapter in {folder}")
    tensors = read_adapter_weights(folder / ADAPTER_WEIGHTS)
    recorded = {name: tuple(shape) for name, shape in config["tensors"].items()}
    _check_fits(recorded, _shapes(tensors), f"{folder / ADAPTER_WEIGHTS} does not match its {ADAPTER_CONFIG}")

    adapted = adapt_model(model, config["method"], AdaptOptions.from_dict(config["options"]))
    adapted.restore_allocation(config["allocation"])
    source = f"{folder / ADAPTER_WEIGHTS}"
    own = adapted.adapter_state_dict()
    _check_fits(
        _shapes(own),
        _shapes(tensors),
        f"{source} does not fit the re-adapted model (written by arenaseg {config['versions']['arenaseg']}, "
        f"PEFT {config['versions']['peft']})",
    )
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)
    return adapted


def export_peft_lora(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the ARENA adapters of ``model`` as a standard PEFT LoRA adapter folder.

    Each layer keeps its components with v != 0 (pruned or not), with s * diag(v) folded into B, so PEFT's
    delta (lora_alpha / r) * B A is ours when ``alpha_pattern`` = ``rank_pattern`` (scaling 1); layers with no
    active component are left out of ``target_modules``; the head goes in ``modules_to_save``. Load it with
    ``peft.PeftModel.from_pretrained(base, folder)`` on the base model with the same head structure. Only ARENA
    tensors and the head are exported: any other parameter changed in ``model`` is not.
    """
    layers = arena_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no ARENA layers to export")
    head = model.get_submodule(HEAD_NAME)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            keep = torch.nonzero(layer.arena_v).flatten()
            if keep.numel() == 0:
                continue
            gate = (layer.scaling * layer.arena_v[keep]).view(1, -1, *([1] * (layer.arena_B.dim() - 2)))
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.arena_A.index_select(0, keep)
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.arena_B.index_select(1, keep) * gate
            ranks[name] = keep.numel()
    if not ranks:
        raise UserError("every ARENA layer is pruned to rank 0: there is no LoRA adapter to export")
    for pname, p in head.named_parameters():
        tensors[f"base_model.model.{HEAD_NAME}.{pname}"] = p.detach()
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        target_modules=list(ranks),
        rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks),
        modules_to_save=[HEAD_NAME],
        lora_dropout=0.0,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path,
    )
    config_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    folder = Path(folder)
    with atomic_path(folder / PEFT_WEIGHTS) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    write_json(folder / PEFT_CONFIG, config_dict)
    return folder
