"""The proximal optimizer: the exact soft threshold, convergence to the closed-form lasso solution under any
schedule, the documented step convention, re-activation vs freeze_pruned, and exact resumption."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LambdaLR

from arenaseg.adapters.arena import ArenaConfig, ArenaLinear
from arenaseg.optim.proximal import ProximalOptimizer, soft_threshold


def by_definition(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return torch.where(x > tau, x - tau, torch.where(x < -tau, x + tau, torch.zeros_like(x)))


def test_soft_threshold_matches_its_definition() -> None:
    torch.manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64)
    for tau in (0.0, 0.3, 1.5):
        t = torch.full_like(x, tau)
        assert torch.equal(soft_threshold(x, tau), by_definition(x, t))
    assert torch.equal(soft_threshold(x, 0.0), x)
    tau = torch.rand(1000, dtype=torch.float64)  # element-wise thresholds
    assert torch.equal(soft_threshold(x, tau), by_definition(x, tau))
    at_edges = torch.tensor([0.3, -0.3, 0.0, 0.30001, -0.30001])
    assert torch.equal(soft_threshold(at_edges, 0.3)[:3], torch.zeros(3))
    assert (soft_threshold(at_edges, 0.3)[3:] * torch.tensor([1.0, -1.0]) > 0).all()
    with pytest.raises(ValueError, match="tau >= 0"):
        soft_threshold(x, -0.1)
    with pytest.raises(ValueError, match="tau >= 0"):
        soft_threshold(x, torch.tensor([0.1, -0.1]))


def lasso_problem(n: int = 40, p: int = 12) -> tuple[torch.Tensor, torch.Tensor, float]:
    """y and an orthogonal design X (X^T X = I), with lam at the median of |X^T y| so that half the entries die."""
    g = torch.Generator().manual_seed(0)
    x, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    y = torch.randn(n, generator=g, dtype=torch.float64)
    return x, y, float((x.T @ y).abs().median())


@pytest.mark.parametrize("schedule", ["constant", "exponential", "cosine"])
def test_proximal_iterations_reach_the_closed_form_lasso_solution(schedule: str) -> None:
    x, y, lam = lasso_problem()
    solution = soft_threshold(x.T @ y, lam)  # argmin 0.5||y - X v||^2 + lam ||v||_1 for X^T X = I
    assert 0 < torch.count_nonzero(solution) < len(solution)
    v = nn.Parameter(torch.zeros(x.shape[1], dtype=torch.float64))
    optimizer = ProximalOptimizer([], [v], lam=lam, rho=0.3, lr=0.1, v_gradient="plain")
    scheduler = {
        "constant": LambdaLR(optimizer, lambda _: 1.0),
        "exponential": ExponentialLR(optimizer, gamma=0.99),
        "cosine": CosineAnnealingLR(optimizer, T_max=400),
    }[schedule]
    for _ in range(400):
        optimizer.zero_grad()
        (0.5 * (y - x @ v).square().sum()).backward()
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(v.detach(), solution, atol=1e-6, rtol=0)
    assert torch.equal(v.detach() == 0, solution == 0)


def test_one_step_follows_the_documented_convention() -> None:
    """v <- soft_threshold(v - rho*eta*grad, rho*eta*lam) with eta = lr / initial lr of the gate group, while the
    ordinary parameters get exactly the inner AdamW step at the scheduled lr."""
    torch.manual_seed(0)
    w, v = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(7))
    reference_w = nn.Parameter(w.detach().clone())
    lam, rho, lr, eta = 0.4, 0.5, 1e-2, 0.25
    optimizer = ProximalOptimizer([w], [v], lam=lam, rho=rho, lr=lr, v_gradient="plain")
    reference = torch.optim.AdamW([reference_w], lr=lr)
    for opt in (optimizer, reference):
        LambdaLR(opt, lambda _: eta)
    assert [g["lr"] for g in optimizer.param_groups] == [lr * eta, lr * eta]
    v_grad, w_grad = torch.randn(7), torch.randn(5)
    v.grad, w.grad, reference_w.grad = v_grad, w_grad.clone(), w_grad.clone()
    expected_v = soft_threshold(v.detach() - rho * eta * v_grad, rho * eta * lam)
    optimizer.step()
    reference.step()
    torch.testing.assert_close(v.detach(), expected_v, atol=1e-7, rtol=0)
    assert torch.equal(w, reference_w)
    optimizer.zero_grad()
    assert w.grad is None and v.grad is None


@pytest.mark.parametrize("freeze_pruned", [False, True])
def test_a_zeroed_gate_comes_back_unless_frozen(freeze_pruned: bool) -> None:
    v = nn.Parameter(torch.tensor([0.05, 1.0, 0.0]))
    optimizer = ProximalOptimizer([], [v], lam=0.1, rho=1.0, lr=1.0, freeze_pruned=freeze_pruned, v_gradient="plain")
    v.grad = torch.tensor([0.0, 0.0, 0.0])  # prox alone: 0.05 -> 0, 1.0 -> 0.9, 0 stays
    optimizer.step()
    torch.testing.assert_close(v.detach(), torch.tensor([0.0, 0.9, 0.0]))
    v.grad = torch.tensor([-2.0, 0.0, -2.0])  # strong gradient on the pruned gate and on the never-active one
    optimizer.step()
    comeback = 0.0 if freeze_pruned else 1.9
    torch.testing.assert_close(v.detach(), torch.tensor([comeback, 0.8, 1.9]))  # a gate that started at 0 is free


def small_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(ArenaLinear(nn.Linear(6, 6), rank=4, alpha=1.0), nn.ReLU(), nn.Linear(6, 2))
    return model, torch.randn(32, 6), torch.randn(32, 2)


def train(model, optimizer, scheduler, x, y, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("v_gradient", ["plain", "adam"])
def test_state_dict_round_trip_resumes_exactly(v_gradient: str) -> None:
    model, x, y = small_problem()
    lam, rho = (0.002, 0.5) if v_gradient == "plain" else (0.6, 0.05)
    config = ArenaConfig(rank=4, lam=lam, rho=rho, freeze_pruned=True, v_gradient=v_gradient)
    optimizer = ProximalOptimizer.for_model(model, config, lr=1e-2)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[-1]["proximal"]
    assert optimizer.proximal_group["params"] == [model[0].arena_v]
    scheduler = CosineAnnealingLR(optimizer, T_max=20)
    train(model, optimizer, scheduler, x, y, 8)
    assert 0 < model[0].active_rank() < 4 and optimizer.state[model[0].arena_v]["pruned"].any()  # mask is saved too
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = copy.deepcopy(model)
    resumed_optimizer = ProximalOptimizer.for_model(resumed, config, lr=1e-2)
    resumed_scheduler = CosineAnnealingLR(resumed_optimizer, T_max=20)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    assert resumed_optimizer.param_groups[0] is resumed_optimizer.inner.param_groups[0]  # schedulers reach AdamW
    train(model, optimizer, scheduler, x, y, 5)
    train(resumed, resumed_optimizer, resumed_scheduler, x, y, 5)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name

    fresh = ProximalOptimizer.for_model(resumed, config, lr=1e-2)
    with pytest.raises(ValueError, match="not a ProximalOptimizer state_dict"):
        fresh.load_state_dict(saved["optimizer"]["inner"])


def test_bad_arguments_raise() -> None:
    model, _, _ = small_problem()
    v = model[0].arena_v
    for kw, message in [({"lam": -1.0, "rho": 0.1}, "lam"), ({"lam": 0.1, "rho": 0.0}, "rho")]:
        with pytest.raises(ValueError, match=message):
            ProximalOptimizer([], [v], **kw)
    with pytest.raises(ValueError, match="at least one gate"):
        ProximalOptimizer(model.parameters(), [], lam=0.1, rho=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        ProximalOptimizer(model.parameters(), [v], lam=0.1, rho=0.1)
    with pytest.raises(ValueError, match="no trainable ARENA gates"):
        ProximalOptimizer.for_model(nn.Linear(3, 3), ArenaConfig())
    factors = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("arena_v")]
    with pytest.raises(ValueError, match="every trainable parameter except the gates"):
        ProximalOptimizer.for_model(model, ArenaConfig(), groups=[{"params": factors[1:]}])
    with pytest.raises(ValueError, match="every trainable parameter except the gates"):
        ProximalOptimizer.for_model(model, ArenaConfig(), groups=[{"params": [*factors, v]}])


def test_adam_direction_first_step_and_noise_pruning() -> None:
    """Default direction: Adam's normalised gradient, so the first step moves every gate by rho*eta*sign(grad)
    (minus the threshold) whatever the gradient's scale; a gate whose gradient only flips sign (noise) is driven
    back to zero while one with a persistent pull keeps growing."""
    v = nn.Parameter(torch.zeros(3))
    lam, rho = 0.3, 0.1
    optimizer = ProximalOptimizer([], [v], lam=lam, rho=rho, lr=1.0)
    v.grad = torch.tensor([-1e-5, 5e-3, -2.0])
    optimizer.step()
    torch.testing.assert_close(v.detach(), rho * (1 - lam) * torch.tensor([1.0, -1.0, 1.0]), atol=1e-4, rtol=0)

    gates = nn.Parameter(torch.zeros(2))
    optimizer = ProximalOptimizer([], [gates], lam=lam, rho=rho, lr=1.0)
    for step in range(200):
        gates.grad = torch.tensor([-1e-4, 1e-4 * (-1) ** step])  # persistent pull vs. pure noise
        optimizer.step()
    assert gates[0] > 1.0 and gates[1] == 0
