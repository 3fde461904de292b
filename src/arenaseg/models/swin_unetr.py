"""The Swin-UNETR we adapt: MONAI's network, sized by a small config, plus the binary head swap."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMergingV2
from torch import nn
from torch.nn import functional as F

from arenaseg.models.attention import fuse_window_attention
from arenaseg.utils.dataclass_json import from_json

HEAD_NAME = "out.conv.conv"


class LegacyPatchMerging(PatchMergingV2):
    """MONAI's 3D PatchMerging before its issue 8284 fix: public checkpoints (FSEFT, SuPreM, CLIP-Driven, MONAI
    BTCV) were trained with this sub-grid order, two offsets repeated and (1,1,0), (0,1,1) never used."""

    OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        parts = [x[:, i::2, j::2, k::2, :] for i, j, k in self.OFFSETS]
        return self.reduction(self.norm(torch.cat(parts, -1)))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Swin-UNETR; stored in every checkpoint card so that weights always find their model."""

    out_channels: int = 14
    feature_size: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    in_channels: int = 1
    legacy_merging: bool = False
    class_names: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def cpu_preset(cls, out_channels: int, **kw) -> ModelConfig:
        """The size we pretrain and benchmark on a 2-core CPU (about 4 s per step of 2 patches of 64^3)."""
        return cls(out_channels=out_channels, feature_size=12, **kw)

    @classmethod
    def tiny(cls, out_channels: int = 3, **kw) -> ModelConfig:
        """A fast model for tests: one block per stage, 32^3 inputs."""
        return cls(out_channels=out_channels, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return from_json(cls, d, tuples=True)


def build_swin_unetr(config: ModelConfig) -> SwinUNETR:
    """MONAI SwinUNETR with the layout of the public checkpoints (instance norm, normalize=True, qkv bias).

    Window attention runs through torch's fused scaled_dot_product_attention in training and at inference
    (`models.attention`): the same outputs to float rounding, the same state-dict keys. Every model we build, load
    or pretrain comes from here.
    """
    model = SwinUNETR(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        feature_size=config.feature_size,
        depths=config.depths,
        num_heads=config.num_heads,
        window_size=config.window_size,
        normalize=True,
        downsample=LegacyPatchMerging if config.legacy_merging else "merging",
    )
    return fuse_window_attention(model)


def output_head(model: nn.Module) -> nn.Conv3d:
    head = model.get_submodule(HEAD_NAME)
    if not isinstance(head, nn.Conv3d):
        raise TypeError(f"expected a Conv3d output head at {HEAD_NAME!r}, found {type(head).__name__}")
    return head


def replace_with_binary_head(
    model: nn.Module, init_class: int | None = None, background_class: int | None = 0
) -> nn.Conv3d:
    """Swap the output head for a 1-channel (sigmoid) 1x1x1 conv for one target organ.

    With ``init_class`` the new logit starts as that pretrained class's log-odds against background
    (row difference for a softmax head, the row itself when ``background_class`` is None, as for sigmoid heads),
    so that a base organ starts from the foundation model's own (zero-shot) prediction.
    """
    old = output_head(model)
    new = nn.Conv3d(old.in_channels, 1, kernel_size=1)
    with torch.no_grad():
        if init_class is None:
            nn.init.normal_(new.weight, std=1e-2)
            nn.init.zeros_(new.bias)
        else:
            if not 0 <= init_class < old.out_channels:
                raise ValueError(f"init_class {init_class} outside the head's {old.out_channels} channels")
            w, b = old.weight[init_class].clone(), old.bias[init_class].clone()
            if background_class is not None:
                w -= old.weight[background_class]
                b -= old.bias[background_class]
            new.weight.copy_(w.unsqueeze(0))
            new.bias.copy_(b.unsqueeze(0))
    parent_name, _, attr = HEAD_NAME.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new.to(old.weight.device))
    return new
