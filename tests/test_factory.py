"""adapt_model: every method trains what it says (counted independently of the code), one step each, AdaLoRA's
regulariser and budget come from PEFT, and bad input is refused before the model is touched."""

from __future__ import annotations

import re

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from arenaseg.adapters import (
    DEFAULT_TARGETS,
    METHODS,
    AdaptOptions,
    ArenaLayer,
    adapt_model,
    arena_layers,
    format_rank_table,
    rank_report,
)
from arenaseg.models.swin_unetr import HEAD_NAME, ModelConfig, build_swin_unetr, replace_with_binary_head
from arenaseg.optim.proximal import ProximalOptimizer
from arenaseg.train.loop import TrainSettings

RANK = 4
# The smallest input the tiny Swin-UNETR accepts: sides multiples of 32, and more than one voxel per channel at
# the bottleneck for instance norm (64 x 32 x 32 -> 2 x 1 x 1).
SHAPE = (1, 1, 64, 32, 32)


def fresh_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_swin_unetr(ModelConfig.tiny())
    replace_with_binary_head(model)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(SHAPE, generator=gen)
    labels = (torch.rand(SHAPE, generator=gen) > 0.7).float()
    return images, labels


def targeted_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for n, m in model.named_modules() if re.fullmatch(DEFAULT_TARGETS, n)]


def expected_trainable(method: str, base: nn.Module) -> int:
    """Trainable parameter count of each method, from the base model's shapes alone."""
    head = sum(p.numel() for p in base.get_submodule(HEAD_NAME).parameters())
    linears = targeted_linears(base)
    assert linears and all(isinstance(m, nn.Linear) for m in linears)
    lora = sum(RANK * (m.in_features + m.out_features) for m in linears)
    head_bias = {f"{HEAD_NAME}.bias"}
    counts = {
        "lp": 0,
        "fft": sum(p.numel() for p in base.parameters()) - head,
        "bitfit": sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias") and n not in head_bias),
        "affine-ln": sum(p.numel() for m in base.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()),
        "lora": lora,
        "pissa": lora,
        "dora": lora + sum(m.out_features for m in linears),  # + DoRA's magnitude vector
        "adalora": lora + RANK * len(linears),  # + the singular values E
        "arena": lora + RANK * len(linears),  # + the gates v
    }
    return counts[method] + head


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_one_step_with_its_own_parameters(method: str) -> None:
    model = fresh_model()
    base_count = expected_trainable(method, model)
    adapted = adapt_model(model, method, AdaptOptions(rank=RANK, total_steps=10))

    assert adapted.network is model and adapted.method == method
    assert adapted.trainable_params == base_count
    if method in ("lora", "adalora", "dora", "pissa"):
        assert (adapted.trainable_params, adapted.total_params) == adapted.model.get_nb_trainable_parameters()
    head = model.get_submodule(HEAD_NAME)
    assert all(p.requires_grad for p in head.parameters())

    optimizer = adapted.make_optimizer(lr=1e-2)
    assert isinstance(optimizer, ProximalOptimizer if method == "arena" else torch.optim.AdamW)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    images, labels = batch()
    loss = adapted.training_loss(images, labels, F.binary_cross_entropy_with_logits)
    loss.backward()
    optimizer.step()
    adapted.after_step(0)
    optimizer.zero_grad()

    assert torch.isfinite(loss)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items()), "a frozen parameter moved"
    assert not torch.equal(after[f"{HEAD_NAME}.weight"], trained[f"{HEAD_NAME}.weight"])
    with torch.no_grad():
        assert adapted.model(images).shape == SHAPE


def test_arena_optimizer_steps_the_gates_proximally_and_the_rest_with_adamw() -> None:
    adapted = adapt_model(fresh_model(), "arena", AdaptOptions(rank=RANK, lam=0.0, rho=0.5, total_steps=10))
    optimizer = adapted.make_optimizer(lr=1e-3)
    gates = [layer.arena_v for layer in arena_layers(adapted.network).values()]
    assert {id(p) for p in optimizer.proximal_group["params"]} == {id(v) for v in gates}
    assert optimizer.proximal_group["rho"] == 0.5 and optimizer.proximal_group["lam"] == 0.0
    inner = {id(p) for group in optimizer.inner.param_groups for p in group["params"]}
    trainable = {id(p) for p in adapted.network.parameters() if p.requires_grad}
    assert inner == trainable - {id(v) for v in gates}


def test_freeze_tail_settles_the_gates_over_the_last_fraction_of_the_schedule() -> None:
    """The tail is counted from the options' total steps: 0.1 of 300 steps settles from step 271 on."""
    options = AdaptOptions(rank=RANK, freeze_tail=0.1, total_steps=300)
    assert adapt_model(fresh_model(), "arena", options).make_optimizer().proximal_group["settle_from"] == 271
    no_tail = AdaptOptions(rank=RANK, freeze_tail=None)
    assert adapt_model(fresh_model(), "arena", no_tail).make_optimizer().proximal_group["settle_from"] is None
    without_steps = adapt_model(fresh_model(), "arena", AdaptOptions(rank=RANK))  # the default tail, no schedule
    with pytest.raises(ValueError, match="set AdaptOptions.total_steps to the number of training steps"):
        without_steps.make_optimizer()


@pytest.mark.parametrize("method", ["lp", "fft", "lora", "adalora", "arena"])
def test_the_new_head_steps_head_lr_scale_times_further(method: str) -> None:
    """Adam's first step moves every weight by lr (sign of its gradient), so the head's step shows its lr."""
    images, labels = batch()
    moved = {}
    for scale in (1.0, 10.0):
        adapted = adapt_model(fresh_model(), method, AdaptOptions(rank=RANK, total_steps=10))
        optimizer = adapted.make_optimizer(lr=1e-3, weight_decay=0.0, head_lr_scale=scale)
        covered = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert covered == {id(p) for p in adapted.network.parameters() if p.requires_grad}
        head = adapted.network.get_submodule(HEAD_NAME).weight
        before = head.detach().clone()
        adapted.training_loss(images, labels, F.binary_cross_entropy_with_logits).backward()
        optimizer.step()
        moved[scale] = (head.detach() - before).abs().max().item()
    assert moved[1.0] == pytest.approx(1e-3, rel=1e-3)
    assert moved[10.0] == pytest.approx(1e-2, rel=1e-3)


def test_a_bad_head_lr_scale_is_refused() -> None:
    adapted = adapt_model(fresh_model(), "lp")
    with pytest.raises(ValueError, match="head_lr_scale must be > 0"):
        adapted.make_optimizer(head_lr_scale=0.0)
    with pytest.raises(ValueError, match=r"OptimizerSettings\.head_lr_scale must be > 0 and finite, got nan"):
        adapted.make_optimizer(head_lr_scale=float("nan"))


@pytest.mark.parametrize("method", ["lora", "arena"])
def test_the_python_api_optimizer_defaults_are_the_training_loops(method: str) -> None:
    """`make_optimizer()` without arguments must train like `arenaseg adapt` (one global default)."""
    defaults = TrainSettings()
    optimizer = adapt_model(fresh_model(), method, AdaptOptions(rank=RANK, total_steps=10)).make_optimizer()
    groups = optimizer.inner.param_groups if method == "arena" else optimizer.param_groups
    assert sorted(g["lr"] for g in groups) == pytest.approx([defaults.lr, defaults.lr * defaults.head_lr_scale])
    assert {g["weight_decay"] for g in groups} == {defaults.weight_decay}


def test_alpha_convention_gives_lora_and_arena_the_same_initial_scaling() -> None:
    lora = adapt_model(fresh_model(), "lora", AdaptOptions(rank=RANK))
    arena = adapt_model(fresh_model(), "arena", AdaptOptions(rank=RANK, alpha=3 * RANK))
    lora_layer = lora.model.get_submodule(f"base_model.model.{lora.targets[0]}")
    assert lora_layer.scaling["default"] == pytest.approx(1.0)  # default lora_alpha = rank
    assert all(layer.scaling == pytest.approx(3.0) for layer in arena_layers(arena.network).values())


def test_adalora_adds_pefts_orthogonality_term_and_allocates_its_budget() -> None:
    options = AdaptOptions(rank=RANK, adalora_target_rank=1, total_steps=10, orth_reg_weight=0.3)
    adapted = adapt_model(fresh_model(), "adalora", options)
    images, labels = batch()

    optimizer = adapted.make_optimizer(lr=1e-2)
    allocator = adapted.model.base_model.rankallocator
    plain: list[torch.Tensor] = []

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE that records the value it returns, i.e. the loss before PEFT adds anything."""
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        plain.append(loss.detach().clone())
        return loss

    for step in (0, 1):
        total = adapted.training_loss(images, labels, loss_fn)
        with torch.no_grad():
            terms = []
            for name, p in adapted.network.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    cov = p @ p.T if ".lora_A." in name else p.T @ p
                    terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0])))
            regu = torch.stack(terms).mean()
        assert len(terms) == 2 * len(adapted.targets) and regu > 0.1
        assert (total - plain[-1]).item() == pytest.approx(0.3 * regu.item(), rel=1e-4)

        total.backward()
        optimizer.step()
        adapted.after_step(step)
        optimizer.zero_grad()
        # PEFT's schedule: step 0 keeps the initial budget, step 1 masks down to budget_schedule(1).
        budget, _ = allocator.budget_schedule(step)
        report = adapted.rank_report()["totals"]
        assert report["initial_rank"] == RANK * len(adapted.targets)
        assert report["active_rank"] == budget
    assert budget < RANK * len(adapted.targets)


def test_train_head_false_leaves_only_the_adapters_trainable() -> None:
    adapted = adapt_model(fresh_model(), "lora", AdaptOptions(rank=RANK, train_head=False))
    head = adapted.network.get_submodule(HEAD_NAME)
    assert not any(p.requires_grad for p in head.parameters())
    assert adapted.trainable_params == expected_trainable("lora", fresh_model()) - sum(
        p.numel() for p in head.parameters()
    )
    assert adapted.trainable_params == adapted.model.get_nb_trainable_parameters()[0]


def test_rank_report_counts_active_components_and_their_parameters() -> None:
    adapted = adapt_model(fresh_model(), "arena", AdaptOptions(rank=RANK))
    layers = arena_layers(adapted.network)
    names = list(layers)
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            layer.arena_v.copy_(torch.tensor([1.0, 0.0, -2.0, 0.0]) if i % 2 else torch.zeros(RANK))
    report = rank_report(adapted.network)
    assert adapted.rank_report() == report
    for i, name in enumerate(names):
        entry, base = report["layers"][name], layers[name].base_layer
        active = 2 if i % 2 else 0
        assert (entry["initial_rank"], entry["active_rank"], entry["allocated_rank"]) == (RANK, active, RANK)
        assert entry["params"] == active * (base.in_features + base.out_features + 1)
        assert entry["full_rank"] == min(base.in_features, base.out_features)
    assert report["totals"]["active_rank"] == 2 * (len(names) // 2)
    assert report["totals"]["params"] == sum(e["params"] for e in report["layers"].values())
    table = format_rank_table(report)
    assert names[1] in table and f"total ({len(names)} layers)" in table
    assert "can be independent" not in table  # every layer is wider than RANK


@pytest.mark.parametrize("method", ["arena", "lora"])
def test_a_rank_above_a_layers_width_counts_as_that_width_in_the_usable_rank(method: str) -> None:
    """The tiny model's first stage is 12 wide: at rank 16 its layers hold 4 redundant components each."""
    adapted = adapt_model(fresh_model(), method, AdaptOptions(rank=16))
    with torch.no_grad():
        for layer in arena_layers(adapted.network).values():
            layer.arena_v.fill_(1.0)  # ARENA's gates start at zero: switch every component on
    report = rank_report(adapted.network)
    narrow = [e for e in report["layers"].values() if e["full_rank"] < 16]
    assert narrow and all(e["full_rank"] == 12 and e["active_rank"] == 16 for e in narrow)
    totals = report["totals"]
    assert totals["usable_rank"] == totals["active_rank"] - 4 * len(narrow)
    assert f"at most {totals['usable_rank']} can be independent" in format_rank_table(report)


def snapshot(model: nn.Module) -> tuple:
    return (
        list(model.state_dict()),
        {n: p.requires_grad for n, p in model.named_parameters()},
        [type(m) for m in model.modules()],
    )


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("sgd-lora", {}, r"unknown adaptation method 'sgd-lora'; valid methods: arena, lora, adalora"),
        ("lora", {"target_modules": r".*nothing_like_this"}, r"matched no module .*swinViT\.patch_embed\.proj"),
        ("arena", {"target_modules": r".*blocks\.0"}, r"cannot adapt .*blocks\.0.*Linear and nn\.Conv3d"),
        ("pissa", {"target_modules": ["swinViT.patch_embed.proj"]}, r"it is a Conv3d, and PEFT's pissa supports"),
        ("adalora", {}, r"adalora needs AdaptOptions\.total_steps"),
        ("adalora", {"total_steps": 5, "adalora_tinit": 5}, r"budgeting phase"),
        ("lora", {"target_modules": [HEAD_NAME]}, r"output head 'out\.conv\.conv'"),
        ("lp", {"train_head": False}, r"lp trains the head only"),
    ],
)
def test_bad_method_or_targets_leave_the_model_untouched(method: str, options: dict, message: str) -> None:
    model = fresh_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        adapt_model(model, method, AdaptOptions(rank=RANK, **options))
    assert snapshot(model) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, r"AdaptOptions\.rank must be an integer >= 1, got 0"),
        ({"lam": -1e-3}, r"AdaptOptions\.lam must be >= 0"),
        ({"rho": 0.0}, r"AdaptOptions\.rho must be > 0"),
        ({"freeze_tail": 1.0}, r"AdaptOptions\.freeze_tail must be None or a fraction > 0 and < 1"),
        ({"target_modules": "(unclosed"}, r"AdaptOptions\.target_modules must be a valid regex"),
        ({"rank": 4, "adalora_target_rank": 5}, r"adalora_target_rank must be an integer in \[1, rank=4\]"),
    ],
)
def test_bad_options_are_refused_with_the_field_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptOptions(**options)


def test_an_adapted_model_is_not_adapted_twice() -> None:
    model = fresh_model()
    adapt_model(model, "arena", AdaptOptions(rank=RANK))
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapted already"):
        adapt_model(model, "lora", AdaptOptions(rank=RANK))
    assert snapshot(model) == before
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert any(isinstance(m, ArenaLayer) for m in model.modules())


def test_each_family_reports_its_own_progress_and_finalizes_itself() -> None:
    """ARENA's progress bar shows its active rank and finalize() prunes; the other families have neither."""
    adapted = adapt_model(fresh_model(), "arena", AdaptOptions(rank=RANK))
    layers = arena_layers(adapted.network)
    with torch.no_grad():
        for layer in layers.values():
            layer.arena_v.copy_(torch.tensor([0.5, 0.0, 0.0, -1.0]))
    assert adapted.progress() == {"rank": 2 * len(layers)}
    adapted.finalize()
    assert [layer.arena_v.numel() for layer in arena_layers(adapted.network).values()] == [2] * len(layers)
    lora = adapt_model(fresh_model(), "lora", AdaptOptions(rank=RANK))
    before = {n: p.detach().clone() for n, p in lora.network.named_parameters()}
    lora.finalize()
    assert lora.progress() == {} and lora.extra_state() == {}
    assert all(torch.equal(p, before[n]) for n, p in lora.network.named_parameters())
