"""ARENA adapter layers: W = W0 + s * B diag(v) A, with an l1 penalty on v that switches whole rank components off.

Scaling convention (the one place it is defined): s = ``ArenaConfig.alpha``, NOT alpha / r as in LoRA. The gate v
carries each component's magnitude, so the penalty lam * ||v||_1 prices one unit of a component identically whatever
the initial rank (A and B start with unit rows / columns); that is what makes ARENA robust to over-ranking: a larger
r only offers more candidate components, it does not rescale the ones that survive.

Parameter naming: every adapted module keeps its original weights under ``<module>.base_layer.{weight,bias}`` and
holds three plain parameters ``<module>.arena_A``, ``<module>.arena_B`` and ``<module>.arena_v`` (no submodules,
for Linear and Conv3d alike). A and B have the shapes of PEFT LoRA's ``lora_A.weight`` / ``lora_B.weight`` for the
same layer (Linear: (r, n), (m, r); Conv3d: (r, in, k1, k2, k3), (m, r, 1, 1, 1)) so that an ARENA adapter can be
exported as a LoRA adapter; v has shape (r,).
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from arenaseg.optim.proximal import V_GRADIENTS  # direction of the proximal step on v

DEFAULT_TARGETS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.linear1|mlp\.linear2)"


@dataclass
class ArenaConfig:
    """Where ARENA goes and how it is regularised: the project's one global default, for every organ and k.

    The proximal step on v is v <- soft_threshold(v - rho*eta_t*d, rho*eta_t*lam) (``arenaseg.optim.proximal``).
    With the default direction d (``v_gradient="adam"``: Adam's normalised gradient, |d| <= ~1), a gate moves by at
    most rho*eta_t per step. rho = 1e-2, ten times the factors' lr: a component's magnitude is v alone (A rows and B
    columns are unit vectors), while a LoRA component b a^T grows through all m entries of b at once, about
    sqrt(m) (6 to 17 for the adapted layers here) times faster than one entry. With rho = lr = 1e-3, |v| stayed
    below ~0.06 in 100 steps and ARENA's logits equalled a linear probe's to two decimals
    (benchmarks/results/cell_logits.md); with rho = 1e-2 it departs from the probe (benchmarks/results/
    step_budget_arena.md, pretrain-split cases only). lam is scale-free: a component stays on only
    while its normalised pull |d| exceeds lam. lam = 0.3 sits just above the noise floor of |d| for a gradient of
    random sign, sqrt((1 - beta1) / (1 + beta1)) = 0.23 with beta1 = 0.9, so components driven by noise switch off
    and components with a persistent pull survive; chosen from this argument, not by looking at any result.
    With ``v_gradient="plain"`` (the exact step for L + lam*||v||_1), lam is in units of the loss gradient instead.
    ``freeze_pruned`` (default False): v entries that were active and then reached zero stay zero; by default the
    step is a true proximal step, so a pruned component comes back when its gradient is strong enough.
    """

    rank: int = 16
    alpha: float = 1.0
    target_modules: str | list[str] = DEFAULT_TARGETS
    lam: float = 0.3
    rho: float = 1e-2
    freeze_pruned: bool = False
    v_gradient: str = "adam"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field; re-run by ``apply_arena`` because dataclasses stay mutable."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"ArenaConfig.rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"ArenaConfig.alpha (the scaling s) must be > 0, got {self.alpha!r}")
        if not self.lam >= 0:
            raise ValueError(f"ArenaConfig.lam (l1 weight on v) must be >= 0, got {self.lam!r}")
        if not self.rho > 0:
            raise ValueError(f"ArenaConfig.rho (proximal step size on v) must be > 0, got {self.rho!r}")
        if self.v_gradient not in V_GRADIENTS:
            raise ValueError(f"ArenaConfig.v_gradient must be one of {V_GRADIENTS}, got {self.v_gradient!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"ArenaConfig.target_modules is not a valid regex ({err}): {targets!r}") from None
        elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
            raise ValueError(
                "ArenaConfig.target_modules must be a regex string or a non-empty list of module names, "
                f"got {targets!r}"
            )

    def matches(self, name: str) -> bool:
        """PEFT's rule: a regex is full-matched, a list entry matches the name itself or a ``.``-suffix of it."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ArenaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ArenaConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def is_arena_v(name: str) -> bool:
    """Whether a parameter name (from ``named_parameters``) is an ARENA gate, i.e. goes to the proximal step."""
    return name == "arena_v" or name.endswith(".arena_v")


class ArenaLayer(nn.Module, ABC):
    """A frozen ``base_layer`` plus s * B diag(v) A; subclasses say how A and B act and what merging builds."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.check_supported(base_layer)
        if not isinstance(self, LAYER_TYPES[type(base_layer)]):
            raise ValueError(f"{type(self).__name__} cannot wrap a {type(base_layer).__name__}; use apply_arena")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"ARENA rank must be an integer >= 1, got {rank!r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.initial_rank = rank
        self.scaling = alpha
        w = base_layer.weight
        m, kernel = w.shape[0], w.shape[2:]
        self.arena_A = nn.Parameter(torch.empty(rank, *w.shape[1:], device=w.device, dtype=w.dtype))
        self.arena_B = nn.Parameter(torch.empty(m, rank, *(1 for _ in kernel), device=w.device, dtype=w.dtype))
        self.arena_v = nn.Parameter(torch.zeros(rank, device=w.device, dtype=w.dtype))
        # v = 0 with orthonormal A rows / B columns (AdaLoRA's P Lambda Q with Lambda = 0): the layer computes
        # exactly the base function at init, yet v gets a gradient at step 0 (a LoRA-style B = 0 would leave v's
        # gradient zero), and A, B get theirs as soon as the first step has moved v.
        with torch.no_grad():
            nn.init.orthogonal_(self.arena_A.flatten(1))
            nn.init.orthogonal_(self.arena_B.flatten(1))

    @staticmethod
    def check_supported(module: nn.Module) -> None:
        """Raise ValueError unless ``module`` is a layer ARENA can wrap (``apply_arena`` calls it before any change)."""
        if isinstance(module, ArenaLayer) or type(module) not in LAYER_TYPES:
            raise ValueError(f"ARENA wraps plain nn.Linear and nn.Conv3d (groups=1) only, got {type(module).__name__}")
        if isinstance(module, nn.Conv3d) and module.groups != 1:
            raise ValueError(f"ARENA supports Conv3d with groups=1 only, got groups={module.groups}")

    def active_rank(self) -> int:
        return int(torch.count_nonzero(self.arena_v.detach()))

    @abstractmethod
    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        """B(v * A(x)) without materialising the dense delta."""

    @abstractmethod
    def _plain_layer(self) -> nn.Module:
        """A fresh layer of the base's type and configuration (weights to be filled by ``merged_module``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.arena_v.numel() == 0:
            return out
        return out + self.scaling * self._adapter(x)

    def delta_weight(self) -> torch.Tensor:
        """s * B diag(v) A in the base weight's shape (for merging and export, never used in forward)."""
        delta = (self.arena_B.flatten(1) * self.arena_v) @ self.arena_A.flatten(1)
        return self.scaling * delta.reshape(self.base_layer.weight.shape)

    @torch.no_grad()
    def prune_(self) -> None:
        """Drop the components whose gate is zero; the function is unchanged since they contributed nothing.

        The parameters are replaced, so an optimizer built before pruning no longer sees them: prune after training.
        """
        keep = torch.nonzero(self.arena_v).flatten()
        for name, dim in (("arena_A", 0), ("arena_B", 1), ("arena_v", 0)):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(old.index_select(dim, keep), requires_grad=old.requires_grad))

    @torch.no_grad()
    def merged_module(self) -> nn.Module:
        """A plain layer of the base's configuration holding W0 + delta and the base bias (no adapter cost)."""
        base = self.base_layer
        merged = self._plain_layer().to(device=base.weight.device, dtype=base.weight.dtype)
        merged.weight.copy_(base.weight + self.delta_weight())
        merged.weight.requires_grad_(base.weight.requires_grad)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
            merged.bias.requires_grad_(base.bias.requires_grad)
        return merged


class ArenaLinear(ArenaLayer):
    """ARENA on an nn.Linear: A (r, n), B (m, r); v scales the last (feature) dimension."""

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.arena_A) * self.arena_v, self.arena_B)

    def _plain_layer(self) -> nn.Linear:
        base = self.base_layer
        return nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)


class ArenaConv3d(ArenaLayer):
    """ARENA on an nn.Conv3d: A is a conv with the base's kernel/stride/padding/dilation and r output channels,
    B a 1x1x1 conv r -> m, v scales the channel dimension in between."""

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        # The base's own conv routine, so that A sees exactly the base's padding (padding_mode included).
        h = self.base_layer._conv_forward(x, self.arena_A, None)
        return F.conv3d(h * self.arena_v.view(-1, 1, 1, 1), self.arena_B)

    def _plain_layer(self) -> nn.Conv3d:
        base = self.base_layer
        return nn.Conv3d(
            base.in_channels,
            base.out_channels,
            base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            bias=base.bias is not None,
            padding_mode=base.padding_mode,
        )


LAYER_TYPES: dict[type[nn.Module], type[ArenaLayer]] = {nn.Linear: ArenaLinear, nn.Conv3d: ArenaConv3d}


def _candidates(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv3d))]


def apply_arena(model: nn.Module, config: ArenaConfig) -> list[str]:
    """Replace every targeted Linear/Conv3d in place by its ARENA layer (base frozen); return the adapted names.

    Only the wrapped base layers are frozen: which other parameters (e.g. the head) train is the caller's choice.
    Everything is checked before the first replacement, so a ValueError leaves the model untouched.
    """
    config.validate()
    matched = [(name, mod) for name, mod in model.named_modules() if name and config.matches(name)]
    if not matched:
        examples = _candidates(model)[:8]
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module of {type(model).__name__}; "
            f"its first Linear/Conv3d modules are {examples}"
        )
    for name, mod in matched:
        try:
            ArenaLayer.check_supported(mod)
        except ValueError as err:
            raise ValueError(f"cannot adapt {name!r}: {err}") from None
    for name, mod in matched:
        model.set_submodule(name, LAYER_TYPES[type(mod)](mod, config.rank, config.alpha), strict=True)
    return [name for name, _ in matched]


def arena_layers(model: nn.Module) -> dict[str, ArenaLayer]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, ArenaLayer)}


def prune_arena(model: nn.Module) -> None:
    """Shrink every ARENA layer to its active rank (call after training; the model's function is unchanged)."""
    for layer in arena_layers(model).values():
        layer.prune_()


def merge_arena(model: nn.Module) -> nn.Module:
    """Replace every ARENA layer in place by its merged plain layer: the base architecture and state_dict keys."""
    for name, layer in arena_layers(model).items():
        model.set_submodule(name, layer.merged_module(), strict=True)
    return model


def active_ranks(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (initial rank, active rank)."""
    return {name: (layer.initial_rank, layer.active_rank()) for name, layer in arena_layers(model).items()}
