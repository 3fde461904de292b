"""Foundation models by name or path: the built-ins shipped in ``models/builtin/``, our own ``.safetensors``
files, or public ``.pt/.pth/.ckpt`` checkpoints; and the head row that starts a base organ's binary head."""

from __future__ import annotations

import re
from pathlib import Path

from arenaseg.models.checkpoints import (
    BACKGROUND_ROW,
    LoadedCheckpoint,
    layout_class_rows,
    layout_head_kind,
    load_public_checkpoint,
)
from arenaseg.models.foundation import load_foundation
from arenaseg.utils.errors import UserError

BUILTIN_DIR = Path(__file__).with_name("builtin")
# Each is NAME.safetensors + NAME.json (card) in BUILTIN_DIR, produced by the project's pretraining runs.
BUILTIN_NAMES = ("btcv-fs", "phantom-demo")
PUBLIC_SUFFIXES = (".pt", ".pth", ".ckpt")
_SIDES = ("left", "right")


def model_path(name_or_path: str) -> Path:
    """The file a built-in name or a path stands for (it may not exist)."""
    return BUILTIN_DIR / f"{name_or_path}.safetensors" if name_or_path in BUILTIN_NAMES else Path(name_or_path)


def model_file(name_or_path: str) -> Path | None:
    """The file a model name or path stands for, None when there is none (e.g. a built-in not installed)."""
    path = model_path(name_or_path)
    return path if path.is_file() else None


def load_model(name_or_path: str) -> LoadedCheckpoint:
    """A built-in name, our own ``.safetensors`` file, or a public PyTorch checkpoint, loaded strictly."""
    path = model_path(name_or_path)
    if name_or_path in BUILTIN_NAMES:
        if not path.is_file():
            raise FileNotFoundError(
                f"built-in model {name_or_path!r} is not installed: {path} is missing "
                f"(pass the path of a checkpoint file instead)"
            )
        return _load_own(path)
    if not path.is_file():
        raise UserError(
            f"{name_or_path!r} is neither a built-in model ({', '.join(BUILTIN_NAMES)}) nor an existing "
            f"file; a path to our .safetensors file or a public {'/'.join(PUBLIC_SUFFIXES)} checkpoint "
            f"is also accepted"
        )
    if path.suffix == ".safetensors":
        return _load_own(path)
    if path.suffix in PUBLIC_SUFFIXES:
        return load_public_checkpoint(path)
    raise UserError(
        f"{path}: unsupported file type {path.suffix!r}; expected .safetensors (arenaseg) or "
        f"{'/'.join(PUBLIC_SUFFIXES)} (public Swin-UNETR checkpoints)"
    )


def class_row(loaded: LoadedCheckpoint, organ: str) -> tuple[int, int | None] | None:
    """(class row, background row or None for sigmoid heads) of ``organ`` in the checkpoint's head: the
    arguments of ``replace_with_binary_head`` for a zero-shot start. None when the organ is not one of its
    classes or it has no usable head. Names match up to case, separators and side order: kidney_left ==
    left_kidney == "Left kidney"."""
    if loaded.head_kind is None:
        return None
    wanted = organ_key(organ)
    background = BACKGROUND_ROW if loaded.head_kind == "softmax" else None
    for name, row in loaded.class_rows.items():
        if organ_key(name) == wanted:
            return row, background
    return None


def organ_key(name: str) -> str:
    """Comparison key of an organ name: lower case, no separators, the side last."""
    words = [w for w in re.split(r"[\s_\-]+", name.lower()) if w]
    sides = [w for w in words if w in _SIDES]
    return "".join([w for w in words if w not in _SIDES] + sides)


def _load_own(path: Path) -> LoadedCheckpoint:
    model, config = load_foundation(path)
    return LoadedCheckpoint(
        model=model,
        config=config,
        layout="arenaseg",
        loaded=list(model.state_dict()),
        missing=[],
        ignored=[],
        head_kind=layout_head_kind("arenaseg", config),
        class_rows=layout_class_rows("arenaseg", config),
        source=str(path),
    )
