"""Fused window attention: the same outputs and gradients as MONAI's reference WindowAttention (shifted and plain
windows, padded odd volumes, batches, fp32 and autocast), on every model our loaders build, with unchanged keys."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import WindowAttention, compute_mask
from safetensors import safe_open
from torch import nn

from arenaseg.adapters import AdaptOptions, adapt_model
from arenaseg.models.attention import FusedWindowAttention, fuse_window_attention
from arenaseg.models.registry import load_model, model_path
from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr, replace_with_binary_head
from arenaseg.utils.errors import UserError
from arenaseg.utils.precision import autocast, check_precision

WINDOW = (7, 7, 7)
DIM, HEADS = 12, 3
CPU = torch.device("cpu")
# Max |difference| to MONAI's reference, relative to the reference's largest value, for the output and each gradient.
# Dropping the shift mask or the (enlarged) bias moves the output by several times the loosest of these.
TOLERANCE = {"fp32": 5e-5, "bf16": 5e-2, "fp16": 5e-3}
# Two blocks per stage: the second one of each shifts its windows, which is where the mask comes in.
SHIFTED = dataclasses.replace(ModelConfig.tiny(), depths=(2, 2, 2, 2))


def reference(fused: nn.Module) -> nn.Module:
    """A copy of ``fused`` whose window attention runs MONAI's own (unfused) code."""
    plain = copy.deepcopy(fused)
    for module in plain.modules():
        if isinstance(module, FusedWindowAttention):
            module.__class__ = WindowAttention
            module.use_flash_attention = False
    return plain


def attention_pair() -> tuple[nn.Module, nn.Module]:
    """Fused and reference attention with the same weights; the bias table enlarged so that errors in it show."""
    torch.manual_seed(0)
    fused = fuse_window_attention(nn.Sequential(WindowAttention(DIM, HEADS, WINDOW, qkv_bias=True)))[0]
    with torch.no_grad():
        fused.relative_position_bias_table.normal_()
    return fused, reference(fused)


def tokens(windows: int, seed: int = 1) -> torch.Tensor:
    n = WINDOW[0] * WINDOW[1] * WINDOW[2]
    return torch.randn(windows, n, DIM, generator=torch.Generator().manual_seed(seed))


def shift_mask() -> torch.Tensor:
    """MONAI's mask for a 14^3 grid shifted by 3: 8 windows per sample."""
    return compute_mask([14, 14, 14], WINDOW, (3, 3, 3), CPU)


def forward_backward(precision: str, module: nn.Module, x: torch.Tensor, *args) -> dict[str, torch.Tensor]:
    """The output and the gradients w.r.t. the input and every trainable parameter."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with autocast(precision, CPU):
        out = module(x, *args)
    weights = torch.linspace(-1, 1, out.numel(), dtype=x.dtype).view_as(out)
    (out.to(x.dtype) * weights).sum().backward()
    return {"output": out, "input": x.grad} | {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


def max_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |got - want| relative to the largest |want|."""
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tolerance: float) -> None:
    assert got.keys() == want.keys()
    differences = {name: max_difference(got[name], want[name]) for name in want}
    assert max(differences.values()) <= tolerance, differences


def runs_on_cpu(precision: str) -> bool:
    try:
        check_precision(precision, CPU)
    except UserError:
        return False
    return True


PRECISIONS = [pytest.param(p, marks=pytest.mark.skipif(not runs_on_cpu(p), reason="no autocast")) for p in TOLERANCE]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shifted", [True, False])
@pytest.mark.parametrize("trainable_bias", [True, False])
def test_window_attention_matches_monai(precision: str, shifted: bool, trainable_bias: bool) -> None:
    """Two samples of 8 windows each. A frozen bias table (what the adapters leave) takes torch's fused kernel, a
    trainable one its composite path."""
    fused, plain = attention_pair()
    for m in (fused, plain):
        m.relative_position_bias_table.requires_grad_(trainable_bias)
    mask = shift_mask() if shifted else None
    x = tokens(2 * 8)
    got = forward_backward(precision, fused, x, mask)
    assert_same(got, forward_backward(precision, plain, x, mask), TOLERANCE[precision])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("wrong", ["no mask", "no bias"])
def test_a_dropped_mask_or_bias_fails_these_tolerances(precision: str, wrong: str) -> None:
    fused, plain = attention_pair()
    x, mask = tokens(8), shift_mask()
    if wrong == "no bias":
        with torch.no_grad():
            plain.relative_position_bias_table.zero_()
    got = forward_backward(precision, fused, x, mask)["output"]
    want = forward_backward(precision, plain, x, None if wrong == "no mask" else mask)["output"]
    assert max_difference(got, want) > 5 * TOLERANCE[precision]


def test_attention_dropout_only_in_training() -> None:
    fused, plain = attention_pair()
    fused.attn_drop.p = plain.attn_drop.p = 0.5
    x, mask = tokens(8), shift_mask()
    with torch.no_grad():
        assert max_difference(fused.eval()(x, mask), plain.eval()(x, mask)) <= TOLERANCE["fp32"]
        assert max_difference(fused.train()(x, mask), plain(x, mask)) > 100 * TOLERANCE["fp32"]


def swin_pair(config: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """A fused Swin-UNETR as we build it, enlarged bias tables, and its MONAI reference."""
    torch.manual_seed(0)
    fused = build_swin_unetr(config)
    with torch.no_grad():
        for m in window_attention(fused):
            m.relative_position_bias_table.normal_()
    return fused, reference(fused)


class Stages(nn.Module):
    """The encoder's hidden states, flattened into one output."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.flatten() for h in self.encoder(x)])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encoder_on_an_odd_volume_matches_monai(precision: str) -> None:
    """33x35x37 voxels: every stage pads to whole windows, shifted (masked) and shrunk windows included."""
    fused, plain = (Stages(m.swinViT) for m in swin_pair(SHIFTED))
    x = torch.randn(1, 1, 33, 35, 37, generator=torch.Generator().manual_seed(2))
    got = forward_backward(precision, fused, x)
    assert_same(got, forward_backward(precision, plain, x), TOLERANCE[precision])


def test_whole_model_batch_of_two_matches_monai() -> None:
    """In float64: the decoder's instance norms over a few bottleneck voxels amplify float32 rounding in the input's
    gradient far beyond any attention error."""
    fused, plain = (m.double() for m in swin_pair(SHIFTED))
    x = torch.randn(2, 1, 64, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = forward_backward("fp32", fused, x)
    assert_same(got, forward_backward("fp32", plain, x), 1e-10)


def window_attention(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, WindowAttention)]


def test_loaded_models_are_fused_with_unchanged_keys(tmp_path) -> None:
    """The built-in model and a public checkpoint written from MONAI's own SwinUNETR."""
    builtin = load_model("phantom-demo").model
    with safe_open(str(model_path("phantom-demo")), "pt") as f:
        assert set(builtin.state_dict()) == set(f.keys())
    config = ModelConfig.tiny(out_channels=14)
    monai = SwinUNETR(
        in_channels=1,
        out_channels=14,
        feature_size=config.feature_size,
        depths=config.depths,
        num_heads=config.num_heads,
        normalize=True,
    )
    torch.save({"state_dict": monai.state_dict()}, tmp_path / "btcv.pt")
    public = load_model(str(tmp_path / "btcv.pt")).model
    assert list(public.state_dict()) == list(monai.state_dict())
    for model in (builtin, public):
        assert window_attention(model)
        assert all(type(m) is FusedWindowAttention for m in window_attention(model))


@pytest.mark.parametrize("method", ["arena", "lora"])
def test_adapters_wrap_the_fused_attention(method: str) -> None:
    """ARENA and PEFT find attn.qkv / attn.proj under their names, and the fused forward calls their wrappers."""
    fused, _ = swin_pair(SHIFTED)
    replace_with_binary_head(fused)
    adapted = adapt_model(fused, method, AdaptOptions(rank=4))
    assert any(t.endswith("attn.qkv") for t in adapted.targets)
    assert any(t.endswith("attn.proj") for t in adapted.targets)
    assert all(type(m) is FusedWindowAttention for m in window_attention(fused))
    assert all(type(m.qkv) is not nn.Linear for m in window_attention(fused))
    with torch.no_grad():
        for p in fused.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p), alpha=0.1)
    x = torch.randn(1, 1, 33, 35, 37, generator=torch.Generator().manual_seed(4))
    got = forward_backward("fp32", Stages(fused.swinViT), x)
    assert_same(got, forward_backward("fp32", Stages(reference(fused).swinViT), x), TOLERANCE["fp32"])
