"""Block-coordinate optimizer for ARENA: an inner optimizer (AdamW) on A, B and the head, a proximal l1 step on v.

Convention (the one place it is defined): the gates v form their own param group, flagged ``proximal: True``, with
an ``lr`` that LR schedulers scale like any other group's, and ``lr0``, that group's lr when the optimizer was built.
With eta_t = lr / lr0 (the schedule's current factor) and step size s_t = rho * eta_t each step is

    v <- soft_threshold(v - s_t * d, s_t * lam)

where the direction d is chosen by ``v_gradient``:

- ``"plain"``: d = grad_v, the exact proximal-gradient step for L + lam*||v||_1 (its fixed points are the
  minimisers of L + lam*||v||_1 whatever the schedule; the brief's v <- xi(v - rho*grad, eta_t*lam) is this step
  with rho folded into lam's scale).
- ``"adam"`` (default): d = m_hat / (sqrt(u_hat) + eps), Adam's bias-corrected, RMS-normalised gradient
  (betas 0.9, 0.999). Why: at a new segmentation head the Dice-loss gradient reaching v is 1e-9..1e-6 (measured on
  the BTCV-FS model: benchmarks/results/v_gradient_scale.md), so a plain step leaves v at ~0 while AdamW moves A, B
  and LoRA's factors by ~lr per step whatever the gradient's scale. Normalised, v moves at the same pace as
  the factors, and lam becomes scale-free:
  a component stays on only while its mean gradient exceeds lam times its RMS (a persistent pull, not noise).
  This is the plain step on an l1 penalty weighted per component by its gradient RMS.

A zeroed entry comes back when its step exceeds the threshold (a proximal step, not a hard mask); with
``freeze_pruned=True`` (default False) entries that were non-zero and then reached zero stay zero, and from step
``settle_from`` on (default None: never) no entry at zero comes back, so the active set can only shrink.

The step runs on all gates at once (one flat vector, a fixed number of kernels whatever the number of gates), as
PyTorch's foreach optimizers do: a model holds one small gate tensor per adapted layer, and a Python loop issuing
several kernels per gate made ARENA's GPU step slower than LoRA's. This module knows nothing of the adapter type:
the caller hands it the gate tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

V_GRADIENTS = ("adam", "plain")  # the direction d of the step on v (see above)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8  # AdamW's default, so that v and the factors A, B react alike to vanishing gradients


def soft_threshold(x: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """sign(x) * max(|x| - tau, 0): the proximal map of tau*||.||_1."""
    if (tau < 0).any() if isinstance(tau, torch.Tensor) else tau < 0:
        raise ValueError(f"soft_threshold needs tau >= 0, got {tau}")
    return torch.sign(x) * torch.relu(x.abs() - tau)


class ProximalOptimizer(Optimizer):
    """One optimizer object (so that any LR scheduler and checkpoint code work) over two blocks of parameters.

    ``params`` (tensors or param groups, e.g. with their own lr) go to the inner optimizer, ``v_params`` (the gates,
    for ARENA every ``arena_v``) to the proximal step; lam, rho, freeze_pruned, settle_from and v_gradient are the
    step's numbers.
    ``param_groups`` is the inner optimizer's groups (the same dicts, so schedulers reach them) followed by the
    proximal group of the gates. ``inner`` is an optimizer class/factory called as ``inner(params, lr=lr)`` or an
    optimizer already built on the ordinary parameters (then ``params`` must be empty). ``params`` may be empty when
    only gates are trained. The gates must share one dtype and device (they are concatenated).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        v_params: Iterable[torch.Tensor],
        *,
        lam: float,
        rho: float,
        lr: float = 1e-3,
        freeze_pruned: bool = False,
        settle_from: int | None = None,
        v_gradient: str = "adam",
        inner: Optimizer | Callable[..., Optimizer] = torch.optim.AdamW,
    ) -> None:
        if v_gradient not in V_GRADIENTS:
            raise ValueError(f"v_gradient must be one of {V_GRADIENTS}, got {v_gradient!r}")
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        if settle_from is not None and not settle_from >= 1:
            raise ValueError(f"settle_from must be a step >= 1 or None, got {settle_from!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0 (the schedule factor is lr / lr0), got {lr!r}")
        params, v_params = list(params), list(v_params)
        if not v_params:
            raise ValueError("ProximalOptimizer needs at least one gate parameter v")
        inner_ids = {id(p) for item in params for p in (item["params"] if isinstance(item, dict) else [item])}
        if inner_ids & {id(v) for v in v_params}:
            raise ValueError("a gate is also among the inner optimizer's parameters: give each parameter once")
        if isinstance(inner, Optimizer):
            if params:
                raise ValueError("give either params or an already built inner optimizer, not both")
            self.inner: Optimizer | None = inner
        else:
            self.inner = inner(params, lr=lr) if params else None
        inner_groups = self.inner.param_groups if self.inner is not None else []
        v_group = dict(
            params=v_params,
            proximal=True,
            lr=lr,
            lr0=lr,
            lam=lam,
            rho=rho,
            freeze_pruned=freeze_pruned,
            settle_from=settle_from,
            v_gradient=v_gradient,
            steps=0,
        )
        super().__init__([*inner_groups, v_group], defaults={"lr": lr})
        for v in v_params:
            self.state[v]["pruned"] = torch.zeros_like(v, dtype=torch.bool)
            self.state[v]["exp_avg"] = torch.zeros_like(v)
            self.state[v]["exp_avg_sq"] = torch.zeros_like(v)

    @property
    def proximal_group(self) -> dict[str, Any]:
        return self.param_groups[-1]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.inner is not None:
            self.inner.step()
        group = self.proximal_group
        group["steps"] += 1
        gates = [v for v in group["params"] if v.grad is not None]
        if gates:
            self._proximal_step(group, gates)
        return loss

    def _proximal_step(self, group: dict[str, Any], gates: list[torch.Tensor]) -> None:
        """The documented step on every gate with a gradient, on flat concatenations of the gates, their gradients
        and their state, written back with one foreach copy each."""
        states = [self.state[v] for v in gates]

        def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
            return torch.cat([t.reshape(-1) for t in tensors])

        def write_back(targets: list[torch.Tensor], values: torch.Tensor) -> None:
            pieces = values.split([t.numel() for t in targets])
            torch._foreach_copy_(targets, [p.view_as(t) for p, t in zip(pieces, targets, strict=True)])

        v, grad = flat(gates), flat(g.grad for g in gates)
        step_size = group["rho"] * group["lr"] / group["lr0"]
        direction = grad
        if group["v_gradient"] == "adam":
            exp_avg, exp_avg_sq = flat(s["exp_avg"] for s in states), flat(s["exp_avg_sq"] for s in states)
            exp_avg.lerp_(grad, 1 - ADAM_BETAS[0])
            exp_avg_sq.mul_(ADAM_BETAS[1]).addcmul_(grad, grad, value=1 - ADAM_BETAS[1])
            m_hat = exp_avg / (1 - ADAM_BETAS[0] ** group["steps"])
            u_hat = exp_avg_sq / (1 - ADAM_BETAS[1] ** group["steps"])
            direction = m_hat / (u_hat.sqrt() + ADAM_EPS)
            write_back([s["exp_avg"] for s in states], exp_avg)
            write_back([s["exp_avg_sq"] for s in states], exp_avg_sq)
        new = soft_threshold(v - step_size * direction, step_size * group["lam"])
        pruned = flat(s["pruned"] for s in states)
        if group["freeze_pruned"]:
            new.masked_fill_(pruned, 0)
        settle_from = group.get("settle_from")  # absent from the state of optimizers saved before the option
        if settle_from is not None and group["steps"] >= settle_from:
            new.masked_fill_(v == 0, 0)
        pruned |= (v != 0) & (new == 0)
        write_back([s["pruned"] for s in states], pruned)
        write_back(gates, new)

    def state_dict(self) -> dict[str, Any]:
        group = self.proximal_group
        return {
            "inner": self.inner.state_dict() if self.inner is not None else None,
            "proximal_group": {k: val for k, val in group.items() if k != "params"},
            "pruned": [self.state[v]["pruned"].clone() for v in group["params"]],
            "moments": [
                (self.state[v]["exp_avg"].clone(), self.state[v]["exp_avg_sq"].clone()) for v in group["params"]
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        expected = {"inner", "proximal_group", "pruned", "moments"}
        if set(state_dict) != expected:
            raise ValueError(
                f"not a ProximalOptimizer state_dict: keys {sorted(state_dict)}, expected {sorted(expected)}"
            )
        gates = self.proximal_group["params"]
        if (state_dict["inner"] is None) != (self.inner is None) or len(state_dict["pruned"]) != len(gates):
            raise ValueError("the saved ProximalOptimizer was built on a different set of parameters")
        for v, pruned in zip(gates, state_dict["pruned"], strict=True):
            if pruned.shape != v.shape:
                raise ValueError(f"saved gate mask of shape {tuple(pruned.shape)} for a gate of shape {tuple(v.shape)}")
        if self.inner is not None:
            self.inner.load_state_dict(state_dict["inner"])
        inner_groups = self.inner.param_groups if self.inner is not None else []
        self.param_groups = [*inner_groups, {**state_dict["proximal_group"], "params": gates}]
        for v, pruned, (m, u) in zip(gates, state_dict["pruned"], state_dict["moments"], strict=True):
            self.state[v]["pruned"] = pruned.to(device=v.device, dtype=torch.bool).clone()
            self.state[v]["exp_avg"] = m.to(device=v.device, dtype=v.dtype).clone()
            self.state[v]["exp_avg_sq"] = u.to(device=v.device, dtype=v.dtype).clone()
