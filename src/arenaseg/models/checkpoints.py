"""Public Swin-UNETR checkpoints (FSEFT, MONAI BTCV and self-supervised, CLIP-Driven, SuPreM) in our model.

Each publisher saved the same network under its own wrapper, prefixes and names, and their loaders use
``strict=False``, so a wrong prefix silently loads nothing. Here the layout is detected from the keys, the keys
are mapped onto current MONAI names and the load is strict: every tensor of the model comes from the file or is
reported as missing on purpose (parts the file does not have), and every tensor of the file is loaded or
reported as ignored (modules outside Swin-UNETR). All public files were trained with MONAI's old PatchMerging,
so they get ``legacy_merging=True``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from arenaseg.models.foundation import load_state_strict
from arenaseg.models.swin_unetr import HEAD_NAME, ModelConfig, build_swin_unetr
from arenaseg.utils.errors import UserError

HeadKind = Literal["softmax", "sigmoid"]

LAYOUTS = ("fseft", "monai-btcv", "monai-ssl", "clip-driven/suprem", "arenaseg")
WRAPPERS = ("state_dict", "net", "model")
ENCODER = "swinViT."
# Softmax heads keep background in this channel (MONAI BTCV, our own files).
BACKGROUND_ROW = 0

FSEFT_CHANNELS = 29
FSEFT_ROWS = {
    "spleen": 0,
    "kidney_left": 2,
    "gallbladder": 3,
    "esophagus": 4,
    "liver": 5,
    "stomach": 6,
    "aorta": 7,
    "pancreas": 10,
    "duodenum": 13,
}
BTCV_CLASSES = (
    "background",
    "spleen",
    "right_kidney",
    "left_kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_and_splenic_vein",
    "pancreas",
    "right_adrenal_gland",
    "left_adrenal_gland",
)

_SSL_ENCODER_KEY = re.compile(r"^(patch_embed\.|layers\d+\.|swinViT\.)")


@dataclass
class LoadedCheckpoint:
    """A model ready to adapt, and an account of where each of its tensors came from."""

    model: nn.Module
    config: ModelConfig
    layout: str
    loaded: list[str]
    missing: list[str]
    ignored: list[str]
    head_kind: HeadKind | None
    class_rows: dict[str, int]
    source: str = ""

    def summary(self) -> str:
        """What was loaded, left at random initialisation or ignored: for people to check before a run."""
        c = self.config
        merging = "legacy" if c.legacy_merging else "current"
        lines = [
            f"{self.source}: layout {self.layout}, {merging} PatchMerging",
            f"model: feature_size {c.feature_size}, depths {c.depths}, heads {c.num_heads}, "
            f"window {c.window_size}, in_channels {c.in_channels}, out_channels {c.out_channels}",
            f"loaded {len(self.loaded)} tensors from the file",
        ]
        if self.missing:
            lines.append(
                f"missing {len(self.missing)} tensors, not in the file and left at random initialisation "
                f"(train them before use): {', '.join(_modules(self.missing))}"
            )
        if self.ignored:
            lines.append(
                f"ignored {len(self.ignored)} tensors of modules outside Swin-UNETR: "
                f"{', '.join(_modules(self.ignored))}"
            )
        if self.head_kind is None:
            lines.append("head: none usable in the file; give the model a new head")
        else:
            rows = ", ".join(f"{name}={row}" for name, row in self.class_rows.items()) or "no class names"
            lines.append(f"head: {self.head_kind}, {c.out_channels} channels; class rows: {rows}")
        return "\n".join(lines)


def unwrap(obj: object) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint (top level, or under 'state_dict', 'net' or 'model')."""
    return _split_wrapper(obj)[1]


def detect_layout(checkpoint: Mapping[str, object]) -> str:
    """Name the publisher's layout from the keys of the checkpoint as loaded, wrapper included.

    The wrapper is evidence: MONAI's BTCV file has exactly the keys our own files have, but comes under
    'state_dict' (our state dicts are saved bare); a ``module.`` prefix or ``swin_vit`` naming also marks a
    public file.
    """
    wrapper, state = _split_wrapper(checkpoint)
    stripped = [k.removeprefix("module.") for k in state]
    if any(k.startswith("backbone.") for k in stripped):
        return "clip-driven/suprem"
    keys = [k.replace("swin_vit", "swinViT") for k in stripped]
    has_encoder = any(k.startswith(ENCODER + "patch_embed.") for k in keys)
    has_decoder = any(k.startswith("decoder1.") for k in keys)
    if has_encoder and any(k.startswith("classifier.") for k in keys):
        return "fseft"
    if not has_decoder and (has_encoder or any(k.startswith("patch_embed.") for k in keys)):
        return "monai-ssl"
    if has_encoder and has_decoder and f"{HEAD_NAME}.weight" in keys:
        public = wrapper is not None or any(k.startswith("module.") or "swin_vit" in k for k in state)
        return "monai-btcv" if public else "arenaseg"
    raise UserError(
        f"unrecognised checkpoint layout (first keys: {list(state)[:5]}); known layouts: {', '.join(LAYOUTS)}"
    )


def map_to_swin_unetr(state: Mapping[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a state dict of ``layout`` to MONAI SwinUNETR keys; returns (mapped, ignored original keys)."""
    _check_layout(layout)
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        name = key.removeprefix("module.").replace("swin_vit", "swinViT")
        if layout == "clip-driven/suprem":
            if not name.startswith("backbone."):
                ignored.append(key)
                continue
            name = name.removeprefix("backbone.")
        elif layout == "monai-ssl":
            if not _SSL_ENCODER_KEY.match(name):
                ignored.append(key)
                continue
            if not name.startswith(ENCODER):
                name = ENCODER + name
            name = name.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        elif layout == "fseft" and name.startswith("classifier."):
            name = HEAD_NAME + name.removeprefix("classifier")
        if name in mapped:
            raise UserError(f"two keys map to {name!r} (one of them {key!r}): the checkpoint is not a {layout} file")
        mapped[name] = value
    return mapped, ignored


def load_public_checkpoint(
    path: str | Path,
    feature_size: int | None = None,
    out_channels: int | None = None,
    layout: str | None = None,
) -> LoadedCheckpoint:
    """Build our model for a public (or bare-state-dict) ``.pt/.pth/.ckpt`` file and load it strictly.

    The architecture is read from the tensors; ``feature_size``/``out_channels`` state what the caller
    expects (a file that does not fit is refused). Files without a usable head get ``out_channels`` channels
    (default 1) at random initialisation, reported in ``missing``. ``layout`` overrides detection, e.g.
    "monai-btcv" for MONAI's BTCV weights re-saved without their 'state_dict' wrapper.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    obj = load_torch_file(path)
    try:
        found = _check_layout(layout) if layout is not None else detect_layout(obj)
        mapped, ignored = map_to_swin_unetr(unwrap(obj), found)
        config = _infer_config(mapped, found, feature_size, out_channels)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    model = build_swin_unetr(config)
    own = model.state_dict()
    missing = [k for k in own if k not in mapped and _may_be_absent(k, found)]
    load_state_strict(model, {k: own[k] for k in missing} | mapped, source=str(path))
    return LoadedCheckpoint(
        model=model,
        config=config,
        layout=found,
        loaded=[k for k in own if k in mapped],
        missing=missing,
        ignored=ignored,
        head_kind=layout_head_kind(found, config),
        class_rows=layout_class_rows(found, config),
        source=str(path),
    )


def _rows_from_class_names(config: ModelConfig) -> dict[str, int]:
    """Head row of each named class of our own models: ``class_names`` lists every channel (background first)
    or only the foreground classes (rows 1..); a single-channel (sigmoid) head's one name is row 0."""
    names, n = config.class_names, config.out_channels
    if not names:
        return {}
    if len(names) == n:
        return {name: row for row, name in enumerate(names) if n == 1 or row != BACKGROUND_ROW}
    if len(names) == n - 1:
        return {name: row for row, name in enumerate(names, start=1)}
    raise UserError(
        f"class_names has {len(names)} names for a {n}-channel head: expected {n} (background first) or {n - 1}"
    )


def load_torch_file(path: Path, map_location: str | torch.device = "cpu") -> object:
    """Tensors and plain containers only: ``weights_only=True`` refuses any pickle that could run code. A damaged
    file and a refused one each get a UserError that says which it is."""
    if Path(path).stat().st_size == 0:
        raise UserError(f"{path}: empty file, not a PyTorch checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message runs over many lines; its "Unsupported ..." line says what failed, in its first sentence
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else "").split(". ")[0]
        if "Unsupported global" not in detail:  # random bytes fail on an "Unsupported operand" instead
            raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {detail}") from None
        raise UserError(
            f"{path}: refused: the file holds Python objects besides tensors and plain containers, and "
            f"unpickling them could run code ({detail})"
        ) from None
    except Exception as e:  # the zip reader and the unpickler fail on damaged files with many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {first}"
        ) from None


def _split_wrapper(obj: object) -> tuple[str | None, dict[str, torch.Tensor]]:
    if not isinstance(obj, Mapping):
        raise UserError(
            f"not a state dict: the file holds a {type(obj).__name__}; expected a mapping of parameter names "
            f"to tensors, at top level or under one of {WRAPPERS}"
        )
    for key in WRAPPERS:
        if isinstance(obj.get(key), Mapping):
            return key, _as_state(obj[key], f"under {key!r}")
    return None, _as_state(obj, "at top level")


def _as_state(obj: Mapping, where: str) -> dict[str, torch.Tensor]:
    if not obj:
        raise UserError(f"not a state dict: empty mapping {where}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(
                f"not a state dict: entry {key!r} {where} is a {type(value).__name__}, not a tensor "
                f"(keys: {list(obj)[:5]}); expected names to tensors, at top level or under one of {WRAPPERS}"
            )
    return dict(obj)


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return layout


def _infer_config(
    state: Mapping[str, torch.Tensor], layout: str, feature_size: int | None, out_channels: int | None
) -> ModelConfig:
    """The architecture the tensors describe; explicit arguments win so that a misfit fails at the load."""
    embed = state.get(ENCODER + "patch_embed.proj.weight")
    if embed is None:
        raise UserError(f"no {ENCODER}patch_embed.proj.weight after mapping the {layout} layout")
    depths, heads = [], []
    for stage in range(1, 5):
        prefix = f"{ENCODER}layers{stage}.0.blocks."
        blocks = {k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}
        table = state.get(prefix + "0.attn.relative_position_bias_table")
        if table is None:
            raise UserError(f"no Swin blocks (relative position table) under {prefix!r}")
        depths.append(len(blocks))
        heads.append(table.shape[1])
    rows = state[f"{ENCODER}layers1.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (round(rows ** (1 / 3)) + 1) // 2
    if (2 * window - 1) ** 3 != rows:
        raise UserError(f"relative position table with {rows} rows is not (2w-1)^3 for a 3D window w")
    head = state.get(f"{HEAD_NAME}.weight")
    if out_channels is None:
        out_channels = head.shape[0] if head is not None else 1
    btcv = layout == "monai-btcv" and out_channels == len(BTCV_CLASSES)
    return ModelConfig(
        out_channels=out_channels,
        feature_size=embed.shape[0] if feature_size is None else feature_size,
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_size=window,
        in_channels=embed.shape[1],
        legacy_merging=layout != "arenaseg",
        class_names=BTCV_CLASSES if btcv else (),
    )


def _may_be_absent(key: str, layout: str) -> bool:
    """Model tensors a layout does not carry: the self-supervised file is the Swin encoder alone, CLIP-Driven
    and SuPreM replace the head by their own text-conditioned one."""
    if layout == "monai-ssl":
        return not key.startswith(ENCODER)
    if layout == "clip-driven/suprem":
        return key.startswith(HEAD_NAME + ".")
    return False


def layout_head_kind(layout: str, config: ModelConfig) -> HeadKind | None:
    """How the head's channels read: one softmax over classes, or one sigmoid each (None: no usable head)."""
    if layout in ("monai-ssl", "clip-driven/suprem"):
        return None
    if layout == "fseft" or (layout == "arenaseg" and config.out_channels == 1):
        return "sigmoid"
    return "softmax"


def layout_class_rows(layout: str, config: ModelConfig) -> dict[str, int]:
    """Head row of each known class, only where the head is the published one (a re-headed file's are unknown)."""
    if layout == "fseft" and config.out_channels == FSEFT_CHANNELS:
        return dict(FSEFT_ROWS)
    if layout in ("monai-btcv", "arenaseg"):
        return _rows_from_class_names(config)
    return {}


def _modules(keys: list[str]) -> list[str]:
    """Top-level module names of some keys, for a readable summary."""
    names = (k.removeprefix("module.").removeprefix("backbone.").split(".")[0] for k in keys)
    return sorted(set(names))
