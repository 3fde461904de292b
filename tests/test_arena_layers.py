"""ARENA layers: exact base function at init, gradients everywhere, both evaluation orders alike, prune/merge
invariance, targeting, rank choice."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

from arenaseg.adapters.arena import (
    ArenaConv3d,
    ArenaLayer,
    ArenaLinear,
    active_ranks,
    apply_arena,
    arena_layers,
    is_arena_v,
    merge_arena,
    prune_arena,
)
from arenaseg.adapters.config import DEFAULT_TARGETS, ArenaConfig
from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr
from arenaseg.optim.proximal import ProximalOptimizer
from arenaseg.utils.precision import autocast


def conv_base(**kw) -> nn.Conv3d:
    return nn.Conv3d(3, 5, kernel_size=3, stride=2, padding=1, **kw)


def randomise_(layer: ArenaLayer, zero_every: int = 0) -> None:
    """Give a layer a non-trivial delta (init has v = 0), optionally with some gates exactly zero."""
    with torch.no_grad():
        layer.arena_v.normal_()
        if zero_every:
            layer.arena_v[::zero_every] = 0.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


LAYERS = {
    "linear": lambda: ArenaLinear(nn.Linear(8, 6), rank=4, scaling=0.7),
    "conv-k3-s2-p1": lambda: ArenaConv3d(conv_base(), rank=4, scaling=0.7),
    "conv-dilated-replicate": lambda: ArenaConv3d(
        nn.Conv3d(3, 5, 3, dilation=2, padding=2, padding_mode="replicate"), rank=4, scaling=0.7
    ),
}


def layer_input(layer: ArenaLayer) -> torch.Tensor:
    return torch.randn(2, 7, 8) if isinstance(layer, ArenaLinear) else torch.randn(2, 3, 9, 8, 7)


def test_config_validation_and_round_trip() -> None:
    for kw, field in [
        ({"rank": 0}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"lam": -1e-3}, "lam"),
        ({"rho": 0.0}, "rho"),
        ({"alpha": 0.0}, "alpha"),
        ({"target_modules": "("}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
    ]:
        with pytest.raises(ValueError, match=rf"ArenaConfig\.{field}"):
            ArenaConfig(**kw)
    config = ArenaConfig(rank=4, alpha=2.0, target_modules=["qkv"], lam=0.5, rho=0.1, freeze_pruned=True)
    assert ArenaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ArenaConfig keys"):
        ArenaConfig.from_dict({**config.to_dict(), "dropout": 0.1})


def test_init_computes_exactly_the_base_function() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 6)
    x = torch.randn(2, 7, 8)
    expected = linear(x)
    assert torch.equal(ArenaLinear(linear, rank=4, scaling=1.0)(x), expected)
    conv = conv_base()
    x = torch.randn(2, 3, 9, 8, 7)
    expected = conv(x)
    assert torch.equal(ArenaConv3d(conv, rank=4, scaling=1.0)(x), expected)


def test_factors_are_orthonormal_at_init_and_base_is_frozen() -> None:
    torch.manual_seed(0)
    layer = ArenaConv3d(conv_base(), rank=4, scaling=1.0)
    a = layer.arena_A.reshape(4, -1)
    b = layer.arena_B.reshape(5, 4)
    torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["arena_A", "arena_B", "arena_v"]


def test_factor_shapes_match_peft_lora() -> None:
    """The PEFT export relies on arena_A / arena_B having lora_A.weight / lora_B.weight's shapes."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(8, 6), "conv": conv_base()})
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["lin", "conv"]))
    apply_arena(model, ArenaConfig(rank=4, target_modules=["lin", "conv"]))
    for name, layer in arena_layers(model).items():
        peft_layer = lora.base_model.model[name]
        assert layer.arena_A.shape == peft_layer.lora_A["default"].weight.shape
        assert layer.arena_B.shape == peft_layer.lora_B["default"].weight.shape
        assert layer.arena_v.shape == (4,)


@pytest.mark.parametrize("kind", LAYERS)
def test_forward_equals_the_dense_weight_and_merge_reproduces_it(kind) -> None:
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    randomise_(layer)
    x = layer_input(layer)
    base = layer.base_layer
    if isinstance(layer, ArenaLinear):
        dense = F.linear(x, base.weight + layer.delta_weight(), base.bias)
    else:
        dense = base._conv_forward(x, base.weight + layer.delta_weight(), base.bias)
    out = layer(x)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    assert rel_err(out, base(x)) > 1e-2  # the delta is really there
    merged = layer.merged_module()
    assert type(merged) is type(base)
    assert merged.state_dict().keys() == base.state_dict().keys()
    assert rel_err(merged(x), out) <= 1e-5


def in_order(layer: ArenaLayer, x: torch.Tensor, merged: bool, precision: str = "fp32") -> list[torch.Tensor]:
    """Output and gradients (A, B, v, input) of one forward + backward with the evaluation order forced, the forward
    under ``precision``'s autocast as in the training loop."""
    layer.merged_is_cheaper = lambda _x: merged  # shadows the rule on this instance
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    with autocast(precision, x.device):
        out = layer(x)
    out.backward(torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape))
    del layer.merged_is_cheaper
    return [out.detach(), layer.arena_A.grad, layer.arena_B.grad, layer.arena_v.grad, x.grad]


@pytest.mark.parametrize("pruned", [False, True], ids=["full", "pruned"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", LAYERS)
def test_both_evaluation_orders_give_the_same_outputs_and_gradients(kind, dtype, tol, pruned) -> None:
    torch.manual_seed(0)
    layer = LAYERS[kind]().to(dtype)
    randomise_(layer, zero_every=3 if pruned else 0)
    if pruned:
        layer.prune_()
    x = layer_input(layer).to(dtype)
    factored, merged = in_order(layer, x, merged=False), in_order(layer, x, merged=True)
    for name, a, b in zip(("output", "A", "B", "v", "input"), merged, factored, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")
    assert rel_err(merged[0], layer.base_layer(x)) > 1e-2  # the delta is really there


@pytest.mark.parametrize("kind", LAYERS)
def test_a_layer_pruned_to_rank_0_computes_the_base_in_either_order(kind) -> None:
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    layer.prune_()  # v = 0 at init: every component goes
    x = layer_input(layer)
    for merged in (False, True):
        assert torch.equal(in_order(layer, x, merged)[0], layer.base_layer(x))


@pytest.mark.parametrize("kind", LAYERS)
def test_the_merged_order_leaves_the_frozen_base_without_gradient(kind) -> None:
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    randomise_(layer)
    base = {n: p.detach().clone() for n, p in layer.base_layer.named_parameters()}
    in_order(layer, layer_input(layer), merged=True)
    for name, p in layer.base_layer.named_parameters():
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, base[name]), name


@pytest.mark.parametrize("kind", LAYERS)
def test_both_orders_under_bf16_autocast_give_bf16_outputs_and_float32_gradients(kind) -> None:
    """The orders round differently, by about bf16's resolution of the output, and agree with the float32 result
    to that."""
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    randomise_(layer)
    x = layer_input(layer)
    exact = in_order(layer, x, merged=False)
    for run in (in_order(layer, x, merged, "bf16") for merged in (False, True)):
        assert run[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in run[1:])
        for name, a, b in zip(("output", "A", "B", "v", "input"), run, exact, strict=True):
            assert rel_err(a.float(), b) < 2e-2, name


def test_the_rule_merges_a_large_rank_on_a_narrow_layer_only() -> None:
    """A decoder-like conv with few channels at r=64 merges; a wide linear at r=4 stays factored while gradients
    are on, and merges without them (no weight gradient to pay for)."""
    narrow = ArenaConv3d(nn.Conv3d(12, 12, 3, padding=1), rank=64, scaling=1.0)
    assert narrow.merged_is_cheaper(torch.empty(2, 12, 16, 16, 16))
    wide, x = ArenaLinear(nn.Linear(512, 512), rank=4, scaling=1.0), torch.empty(1024, 512)
    assert not wide.merged_is_cheaper(x)
    with torch.no_grad():
        assert wide.merged_is_cheaper(x)


def test_scaling_is_not_divided_by_the_rank() -> None:
    """Over-ranking changes nothing: a rank-8 layer holding a rank-2 layer's components (other gates 0) computes the
    same function and gives the shared gates the same gradients, so lam means the same at any initial rank."""
    torch.manual_seed(0)
    small = ArenaLinear(nn.Linear(8, 6), rank=2, scaling=0.7)
    large = ArenaLinear(copy.deepcopy(small.base_layer), rank=8, scaling=0.7)
    randomise_(small)
    with torch.no_grad():
        large.arena_v.zero_()
        for name, idx in (
            ("arena_A", (slice(0, 2),)),
            ("arena_B", (slice(None), slice(0, 2))),
            ("arena_v", (slice(0, 2),)),
        ):
            getattr(large, name)[idx] = getattr(small, name)
    x = torch.randn(5, 8)
    out_small, out_large = small(x), large(x)
    torch.testing.assert_close(out_large, out_small, atol=1e-6, rtol=0)
    out_small.square().sum().backward()
    out_large.square().sum().backward()
    torch.testing.assert_close(large.arena_v.grad[:2], small.arena_v.grad, atol=1e-5, rtol=1e-5)
    doubled = ArenaLinear(copy.deepcopy(small.base_layer), rank=2, scaling=1.4)
    doubled.load_state_dict(small.state_dict())
    base = small.base_layer(x)
    torch.testing.assert_close(doubled(x) - base, 2 * (out_small - base), atol=1e-6, rtol=1e-5)


def test_every_block_gets_gradient_by_the_second_step() -> None:
    torch.manual_seed(0)
    layer = ArenaLinear(nn.Linear(8, 6), rank=4, scaling=1.0)
    x, target = torch.randn(16, 8), torch.randn(16, 6)
    optimizer = ProximalOptimizer([layer.arena_A, layer.arena_B], [layer.arena_v], lam=0.0, rho=0.1, lr=1e-2)
    grads = []
    for _ in range(2):
        optimizer.zero_grad()
        F.mse_loss(layer(x), target).backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad})
        optimizer.step()
    assert torch.count_nonzero(grads[0]["arena_v"]) == 4  # v already at step 0, thanks to B != 0
    assert not grads[0]["arena_A"].any() and not grads[0]["arena_B"].any()  # v = 0 at step 0
    assert torch.count_nonzero(grads[1]["arena_v"]) == 4
    for name in ("arena_A", "arena_B"):
        per_component = grads[1][name].transpose(0, 1 if name == "arena_B" else 0).reshape(4, -1)
        assert per_component.abs().sum(1).min() > 0, f"a component of {name} got no gradient at step 1"


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_prune_keeps_the_function_and_shrinks_the_factors(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = ArenaLinear(nn.Linear(8, 6), rank=6, scaling=1.0), torch.randn(3, 8)
    else:
        layer, x = ArenaConv3d(conv_base(), rank=6, scaling=1.0), torch.randn(2, 3, 6, 6, 6)
    randomise_(layer, zero_every=3)  # gates 0 and 3 are zero
    keep = torch.nonzero(layer.arena_v).flatten()
    before, a, b, v = layer(x), layer.arena_A.clone(), layer.arena_B.clone(), layer.arena_v.clone()
    layer.prune_()
    assert (layer.initial_rank, layer.active_rank(), layer.arena_v.numel()) == (6, 4, 4)
    assert torch.equal(layer.arena_A, a[keep]) and torch.equal(layer.arena_B, b[:, keep])
    assert torch.equal(layer.arena_v, v[keep])
    assert all(p.requires_grad for p in (layer.arena_A, layer.arena_B, layer.arena_v))
    # Outputs reach ~2.4, where float32 rounding is ~2e-7 and a shorter sum rounds differently; the delta is ~2.
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    with torch.no_grad():
        layer.arena_v.zero_()
    layer.prune_()
    assert layer.arena_v.shape == (0,) and layer.arena_A.shape[0] == 0 and layer.arena_B.shape[1] == 0
    assert torch.equal(layer(x), layer.base_layer(x))
    assert rel_err(layer.merged_module()(x), layer.base_layer(x)) == 0.0


def test_list_targets_match_names_and_dotted_suffixes_only() -> None:
    model = nn.ModuleDict(
        {"proj": nn.Linear(4, 4), "block": nn.ModuleDict({"proj": nn.Linear(4, 4), "out_proj": nn.Linear(4, 4)})}
    )
    assert apply_arena(model, ArenaConfig(rank=2, target_modules=["proj"])) == ["proj", "block.proj"]
    assert isinstance(model["block"]["out_proj"], nn.Linear)
    assert is_arena_v("block.proj.arena_v") and is_arena_v("arena_v")
    assert not is_arena_v("block.proj.arena_A") and not is_arena_v("block.proj.not_arena_v")
    assert set(model.state_dict()) >= {"block.proj.base_layer.weight", "block.proj.arena_A", "block.proj.arena_v"}


def snapshot(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor], list[bool]]:
    return (
        [f"{n}:{type(m).__name__}" for n, m in model.named_modules()],
        {k: t.clone() for k, t in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
    )


def assert_unmodified(model: nn.Module, before) -> None:
    names, state, flags = snapshot(model)
    assert names == before[0] and flags == before[2]
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)


def test_bad_inputs_raise_and_leave_the_model_unmodified() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv3d(4, 4, 1, groups=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("first Linear/Conv3d modules are ['0', '2']")):
        apply_arena(model, ArenaConfig(target_modules=r"attn\..*"))
    with pytest.raises(ValueError, match="cannot adapt '1': .*got LayerNorm"):
        apply_arena(model, ArenaConfig(target_modules=["0", "1"]))  # '0' is fine and must not be half-applied
    with pytest.raises(ValueError, match="cannot adapt '2': .*groups=2"):
        apply_arena(model, ArenaConfig(target_modules=["0", "2"]))
    with pytest.raises(ValueError, match="ArenaLinear cannot wrap a Conv3d"):
        ArenaLinear(conv_base(), rank=2, scaling=1.0)
    config = ArenaConfig(target_modules=["0"])
    for field, bad in [("rank", 0), ("lam", -1.0), ("rho", 0.0)]:
        with pytest.raises(ValueError, match=rf"ArenaConfig\.{field}"):
            apply_arena(model, ArenaConfig(target_modules=["0"], **{field: bad}))
        setattr(config, field, bad)  # a config mutated after construction is re-validated
        with pytest.raises(ValueError, match=rf"ArenaConfig\.{field}"):
            apply_arena(model, config)
        config = ArenaConfig(target_modules=["0"])
    assert_unmodified(model, before)
    apply_arena(model, config)
    with pytest.raises(ValueError, match="got ArenaLinear"):
        apply_arena(model, config)


def test_swin_unetr_default_targets_init_prune_and_merge() -> None:
    """On the tiny Swin-UNETR (eval, 64^3: its smallest valid size): the block linears only, exact function at init,
    unchanged function under pruning, and merging back to the base architecture."""
    torch.manual_seed(0)
    model = build_swin_unetr(ModelConfig.tiny()).eval()
    base_keys = list(model.state_dict())
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        base_out = model(x)
        names = apply_arena(model, ArenaConfig(rank=4))
        assert len(names) == 16 and all(re.fullmatch(DEFAULT_TARGETS, n) for n in names)
        assert "swinViT.patch_embed.proj" not in names  # a Conv3d that a naive "proj" pattern would catch
        frozen = [p.requires_grad for n, p in model.named_parameters() if ".base_layer." in n]
        assert len(frozen) == 2 * len(names) and not any(frozen)
        assert torch.equal(model(x), base_out)
        for i, layer in enumerate(arena_layers(model).values()):
            randomise_(layer)
            layer.arena_v.mul_(0.05)
            layer.arena_v[: i % 4] = 0.0  # ranks 4, 3, 2, 1, 4, ...
        adapted_out = model(x)
        assert rel_err(adapted_out, base_out) > 1e-3
        prune_arena(model)
        assert active_ranks(model) == {n: (4, 4 - i % 4) for i, n in enumerate(names)}
        assert all(layer.arena_v.numel() == 4 - i % 4 for i, layer in enumerate(arena_layers(model).values()))
        # Pruning shortens the sums, so rounding moves logits of size ~3 by up to ~1e-6 (measured 9e-7, too close to
        # a 1e-6 bound); the adapter moves them by ~1e-2, so 1e-5 keeps a margin on both sides.
        torch.testing.assert_close(model(x), adapted_out, atol=1e-5, rtol=0)
        assert merge_arena(model) is model
        assert not arena_layers(model) and list(model.state_dict()) == base_keys
        assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
        assert rel_err(model(x), adapted_out) <= 1e-5


def test_rank_selection_on_a_rank_3_target() -> None:
    """Fit W0 + Delta (rank 3) from r = 16: the l1 gate keeps exactly 3 components at a middle lam, none when lam
    exceeds every gradient v can receive, and all 16 without penalty.

    The target is scaled so that Delta's projection on a random unit component b^T Delta a has rms lam:
    a fair fraction of the 16 random components is then recruited at step 0, and only the 3 true directions pay.
    Gates that reach zero stay there (freeze_pruned): allowed to come back, a fourth gate leaves zero for tens of
    steps every few hundred, in float32 and float64 and in either evaluation order, so the count at the last step
    would be a matter of timing.
    """
    n, m, steps = 32, 32, 2000
    # plain: the exact proximal-gradient step
    default = ArenaConfig(rank=16, lam=1e-3, rho=1e-2, v_gradient="plain", freeze_pruned=True)
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, 3, generator=g))
    w, _ = torch.linalg.qr(torch.randn(n, 3, generator=g))
    sigma = torch.tensor([3.0, 2.0, 1.0])
    sigma *= default.lam * (m * n) ** 0.5 / sigma.norm()  # ||Delta||_F / sqrt(mn) = lam
    delta = u @ torch.diag(sigma) @ w.T
    x = torch.randn(512, n, generator=g)
    # With unit a_i, b_i and v = 0 the gradient of v_i is -b_i^T C a_i with C = Delta X^T X / N, so a lam above
    # ||C||_2 keeps every gate at zero for good (A and B get no gradient while v = 0).
    never = 2.0 * float(torch.linalg.matrix_norm(delta @ x.T @ x / len(x), ord=2))

    def fit(lam: float) -> int:
        torch.manual_seed(0)
        layer = ArenaLinear(nn.Linear(n, m), rank=16, scaling=default.scaling)
        with torch.no_grad():
            target = layer.base_layer(x) + x @ delta.T
        optimizer = ProximalOptimizer(
            [layer.arena_A, layer.arena_B],
            [layer.arena_v],
            lam=lam,
            rho=default.rho,
            v_gradient="plain",
            freeze_pruned=default.freeze_pruned,
            lr=1e-2,
        )
        for _ in range(steps):
            optimizer.zero_grad()
            (0.5 * (layer(x) - target).square().sum(1).mean()).backward()
            optimizer.step()
        return layer.active_rank()

    assert fit(default.lam) == 3
    assert fit(never) == 0
    assert fit(0.0) == 16
