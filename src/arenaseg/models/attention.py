"""Swin window attention through torch's fused ``scaled_dot_product_attention``, in training as at inference.

MONAI's reference path materialises each window's score matrix, then adds the relative-position bias and the
shifted-window mask as separate full-size tensors; its own fused path (``use_flash_attention``) runs only without
gradients. Training is where the adapters spend their time, so ours always fuses.
"""

from __future__ import annotations

import torch
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn
from torch.nn import functional as F


class FusedWindowAttention(WindowAttention):
    """MONAI's WindowAttention, same parameters and state-dict keys, with one fused attention call.

    The relative-position bias and MONAI's additive shift mask (-100 between regions, added as MONAI adds it, not
    turned into -inf) form one additive ``attn_mask``. The windows of a shifted block are folded into the head axis
    so that the mask broadcasts over the batch instead of being copied per sample. ``qkv`` and ``proj`` are called as
    modules, so adapters that wrap them (ARENA, PEFT) keep working. Torch's fused CPU kernel gives no gradient for
    the mask: with a trainable bias table (full fine-tuning, pretraining) torch falls back to its composite path,
    which still computes MONAI's attention.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, heads).permute(2, 0, 1)
        if mask is None:
            bias = bias.unsqueeze(0)
        else:  # windows run batch-major, as MONAI's window_partition lays them out: (sample, window)
            windows = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).reshape(1, windows * heads, n, n)
            q, k, v = (t.reshape(b // windows, windows * heads, n, -1) for t in (q, k, v))
        dropout = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout, scale=self.scale)
        out = out.reshape(b, heads, n, -1).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


def fuse_window_attention(model: nn.Module) -> nn.Module:
    """Turn every MONAI WindowAttention in ``model`` into FusedWindowAttention in place; parameters, buffers and
    state-dict keys stay as they are, so checkpoints and adapters load strictly. Returns ``model``."""
    for module in model.modules():
        if type(module) is WindowAttention:
            module.__class__ = FusedWindowAttention
    return model
