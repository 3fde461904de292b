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

from arenaseg.adapters.arena import ArenaLinear, is_arena_v
from arenaseg.adapters.config import ArenaConfig
from arenaseg.optim.proximal import ADAM_EPS, ProximalOptimizer, soft_threshold


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
    """y and an orthogonal design X (X^T X = I), with lam halfway between the two middle values of |X^T y| so that
    half the entries die. Never lam at one of them: that entry would sit on the threshold, and whether it ends at
    exactly 0 would be decided by rounding (it did differ between machines)."""
    g = torch.Generator().manual_seed(0)
    x, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    y = torch.randn(n, generator=g, dtype=torch.float64)
    below, above = (x.T @ y).abs().sort().values[p // 2 - 1 : p // 2 + 1].tolist()
    assert above - below > 0.04 * above  # every |X^T y| is >= 2% of lam away from it
    return x, y, (below + above) / 2


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


def test_from_the_settle_step_a_gate_at_zero_stays_there_and_an_active_one_can_still_go() -> None:
    v = nn.Parameter(torch.tensor([0.0, 0.05, 1.0]))
    optimizer = ProximalOptimizer([], [v], lam=0.1, rho=1.0, lr=1.0, settle_from=2, v_gradient="plain")
    v.grad = torch.tensor([-2.0, 0.0, 0.0])  # step 1, before the tail: the gate at zero comes back
    optimizer.step()
    torch.testing.assert_close(v.detach(), torch.tensor([1.9, 0.0, 0.9]))
    v.grad = torch.tensor([0.0, -2.0, 0.0])  # step 2, in the tail: the switched-off gate's pull would bring it back
    optimizer.step()
    torch.testing.assert_close(v.detach(), torch.tensor([1.8, 0.0, 0.8]))
    v.grad = torch.tensor([1.8, 0.0, 0.0])  # in the tail, an active gate still reaches zero
    optimizer.step()
    torch.testing.assert_close(v.detach(), torch.tensor([0.0, 0.0, 0.7]))
    with pytest.raises(ValueError, match="settle_from"):
        ProximalOptimizer([], [v], lam=0.1, rho=1.0, settle_from=0)


def small_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(ArenaLinear(nn.Linear(6, 6), rank=4, scaling=1.0), nn.ReLU(), nn.Linear(6, 2))
    return model, torch.randn(32, 6), torch.randn(32, 2)


def gated(model: nn.Module, lr: float, **step) -> ProximalOptimizer:
    """As the adapter factory builds it: the gates to the proximal step, every other trainable tensor to AdamW."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gates = [p for n, p in named if is_arena_v(n)]
    return ProximalOptimizer([p for n, p in named if not is_arena_v(n)], gates, lr=lr, **step)


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
    step = dict(lam=lam, rho=rho, freeze_pruned=True, v_gradient=v_gradient)
    optimizer = gated(model, lr=1e-2, **step)
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
    resumed_optimizer = gated(resumed, lr=1e-2, **step)
    resumed_scheduler = CosineAnnealingLR(resumed_optimizer, T_max=20)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    assert resumed_optimizer.param_groups[0] is resumed_optimizer.inner.param_groups[0]  # schedulers reach AdamW
    train(model, optimizer, scheduler, x, y, 5)
    train(resumed, resumed_optimizer, resumed_scheduler, x, y, 5)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name

    fresh = gated(resumed, lr=1e-2, **step)
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
    with pytest.raises(ValueError, match="give each parameter once"):
        ProximalOptimizer(model.parameters(), [v], lam=0.1, rho=0.1)
    with pytest.raises(ValueError, match="give each parameter once"):
        ProximalOptimizer([{"params": [model[2].weight]}, {"params": [v]}], [v], lam=0.1, rho=0.1)


def test_adam_direction_first_step_and_noise_pruning() -> None:
    """Default direction: Adam's normalised gradient, so the first step moves every gate by rho*eta*sign(grad)
    (minus the threshold) whatever the gradient's scale; a gate whose gradient only flips sign (noise) is driven
    back to zero while one with a persistent pull keeps growing."""
    v = nn.Parameter(torch.zeros(3))
    lam, rho = 0.3, 0.1
    optimizer = ProximalOptimizer([], [v], lam=lam, rho=rho, lr=1.0)
    grad = torch.tensor([-1e-5, 5e-3, -2.0])
    v.grad = grad
    optimizer.step()
    # Adam's first direction is grad / (|grad| + eps): sign(grad) to within eps / |grad| <= 1e-3 over five decades.
    # Compared exactly (to float32 rounding), not to the bare sign: eps makes the smallest gate 1e-4 short of it.
    direction = grad / (grad.abs() + ADAM_EPS)
    assert (direction - grad.sign()).abs().max() <= 1.01e-3
    torch.testing.assert_close(v.detach(), -rho * direction.sign() * (direction.abs() - lam), atol=1e-6, rtol=0)

    gates = nn.Parameter(torch.zeros(2))
    optimizer = ProximalOptimizer([], [gates], lam=lam, rho=rho, lr=1.0)
    for step in range(200):
        gates.grad = torch.tensor([-1e-4, 1e-4 * (-1) ** step])  # persistent pull vs. pure noise
        optimizer.step()
    assert gates[0] > 1.0 and gates[1] == 0


def per_gate_reference(gates, grads, lrs, lam, rho, freeze_pruned, v_gradient):
    """The step written out gate by gate (the pre-batching formula), in float64: v, pruned after every step."""
    v = [g.clone() for g in gates]
    m, u = [torch.zeros_like(g) for g in gates], [torch.zeros_like(g) for g in gates]
    pruned = [torch.zeros_like(g, dtype=torch.bool) for g in gates]
    for t, (step_grads, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        s = rho * lr / lrs[0]
        for i, g in enumerate(step_grads):
            if g is None:
                continue
            d = g
            if v_gradient == "adam":
                m[i] = 0.9 * m[i] + 0.1 * g
                u[i] = 0.999 * u[i] + 0.001 * g * g
                d = (m[i] / (1 - 0.9**t)) / ((u[i] / (1 - 0.999**t)).sqrt() + 1e-8)
            x = v[i] - s * d
            assert ((x.abs() - s * lam).abs() > 1e-6).all()  # no entry on the threshold: no rounding decides
            new = torch.where(x.abs() > s * lam, x - torch.sign(x) * s * lam, torch.zeros_like(x))
            if freeze_pruned:
                new[pruned[i]] = 0
            pruned[i] |= (v[i] != 0) & (new == 0)
            v[i] = new
    return v, pruned


@pytest.mark.parametrize("v_gradient", ["adam", "plain"])
@pytest.mark.parametrize("freeze_pruned", [False, True])
def test_batched_step_equals_the_per_gate_formula(v_gradient: str, freeze_pruned: bool) -> None:
    """All gates in one flat step, yet each one exactly as if stepped alone: gates of several sizes and shapes, a
    gate without a gradient (skipped, its moments untouched), a changing lr, entries pruned and coming back."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4,), (16,), (1,), (3, 5), (64,)]
    start = [0.3 * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    lrs = [1.0, 0.8, 0.5, 0.9, 0.3, 0.7]
    grads = [
        [
            None if (t == 2 and i == 1) else torch.randn(s, generator=g, dtype=torch.float64)
            for i, s in enumerate(shapes)
        ]
        for t in range(len(lrs))
    ]
    lam, rho = (0.5, 0.1) if v_gradient == "adam" else (0.8, 0.1)
    expected, expected_pruned = per_gate_reference(start, grads, lrs, lam, rho, freeze_pruned, v_gradient)

    gates = [nn.Parameter(s.clone()) for s in start]
    optimizer = ProximalOptimizer(
        [], gates, lam=lam, rho=rho, lr=lrs[0], freeze_pruned=freeze_pruned, v_gradient=v_gradient
    )
    for step_grads, lr in zip(grads, lrs, strict=True):
        optimizer.proximal_group["lr"] = lr
        for v, grad in zip(gates, step_grads, strict=True):
            v.grad = grad
        optimizer.step()
    for v, want, want_pruned in zip(gates, expected, expected_pruned, strict=True):
        torch.testing.assert_close(v.detach(), want, atol=1e-12, rtol=0)
        assert torch.equal(v.detach() == 0, want == 0)
        assert torch.equal(optimizer.state[v]["pruned"], want_pruned)
    comebacks = sum(int((p & (w != 0)).sum()) for p, w in zip(expected_pruned, expected, strict=True))
    pruned, active = sum(int(p.sum()) for p in expected_pruned), sum(int((w != 0).sum()) for w in expected)
    assert pruned > 0 and active > 0 and (comebacks == 0 if freeze_pruned else comebacks > 0)  # all cases met


def test_at_the_default_lambda_a_persistent_pull_stays_on_and_pure_noise_is_switched_off() -> None:
    """The rank-selection promise at the library's defaults: a gate whose gradient pulls one way keeps its component,
    a gate fed zero-mean noise loses it. With the Adam-normalised direction a gate survives only while its mean
    gradient exceeds lam times its RMS, so this holds whatever the gradients' scale."""
    config = ArenaConfig()
    torch.manual_seed(0)
    n, steps = 500, 300
    v = torch.zeros(2 * n, requires_grad=True)
    optimizer = ProximalOptimizer([], [v], lam=config.lam, rho=config.rho, lr=1e-3, v_gradient=config.v_gradient)
    for _ in range(steps):
        pull = -(1.0 + 0.5 * torch.randn(n))  # a persistent pull towards +v, noisy from batch to batch
        v.grad = torch.cat([pull, torch.randn(n)]) * 1e-6  # the scale of a real gate's gradient does not matter
        optimizer.step()
    persistent, noise = v.detach()[:n], v.detach()[n:]
    assert (persistent > 10 * config.rho).all()  # every one on, by more than ten full steps' worth
    assert (noise != 0).float().mean() < 0.1  # at most a tenth of the noise-fed components still on
