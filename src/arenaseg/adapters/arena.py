"""ARENA adapter layers: W = W0 + s * B diag(v) A, with an l1 penalty on v that switches whole rank components off.

Scaling convention: s = alpha / r with alpha = LoRA's ``lora_alpha`` and r the *initial* rank
(``ArenaConfig.scaling``, defined with every other option in ``config.py``), so ARENA starts from LoRA's effective
scale; s then stays fixed while components are pruned. The gate v carries each component's magnitude, so the
penalty lam * ||v||_1 prices one unit of a component identically whatever the rank it keeps (A and B start with unit
rows / columns): pruning never rescales the components that survive.

Parameter naming: every adapted module keeps its original weights under ``<module>.base_layer.{weight,bias}`` and
holds three plain parameters ``<module>.arena_A``, ``<module>.arena_B`` and ``<module>.arena_v`` (no submodules,
for Linear and Conv3d alike). A and B have the shapes of PEFT LoRA's ``lora_A.weight`` / ``lora_B.weight`` for the
same layer (Linear: (r, n), (m, r); Conv3d: (r, in, k1, k2, k3), (m, r, 1, 1, 1)) so that an ARENA adapter can be
exported as a LoRA adapter; v has shape (r,).

Evaluation order: each call computes either the base layer plus the factored adapter or one base-type layer with the
merged weight W0 + s * B diag(v) A, whichever costs fewer multiply-adds for the call's shapes
(``ArenaLayer.merged_is_cheaper``); both are the same function with the same gradients.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.nn import functional as F

from arenaseg.adapters.config import ArenaConfig


def is_arena_v(name: str) -> bool:
    """Whether a parameter name (from ``named_parameters``) is an ARENA gate, i.e. goes to the proximal step."""
    return name == "arena_v" or name.endswith(".arena_v")


class ArenaLayer(nn.Module, ABC):
    """A frozen ``base_layer`` plus s * B diag(v) A; subclasses say how A and B act and what merging builds."""

    def __init__(self, base_layer: nn.Module, rank: int, scaling: float) -> None:
        super().__init__()
        self.check_supported(base_layer)
        if not isinstance(self, LAYER_TYPES[type(base_layer)]):
            raise ValueError(f"{type(self).__name__} cannot wrap a {type(base_layer).__name__}; use apply_arena")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"ARENA rank must be an integer >= 1, got {rank!r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.initial_rank = rank
        self.scaling = scaling
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
    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation (its bias, stride, padding) with ``weight`` in place of its own."""

    @abstractmethod
    def _positions(self, x: torch.Tensor) -> int:
        """How many output positions (tokens, voxels) the layer computes from ``x``."""

    @abstractmethod
    def _plain_layer(self) -> nn.Module:
        """A fresh layer of the base's type and configuration (weights to be filled by ``merged_module``)."""

    def merged_is_cheaper(self, x: torch.Tensor) -> bool:
        """Whether the merged weight costs fewer multiply-adds than the factored adapter for this call.

        With n = in features x kernel volume, m = out features, r = allocated rank and P output positions: the
        factored path adds r(n + m) per position to the base's forward, and twice that to the backward (weight and
        input gradients of A and B). The merged path adds nothing per position to the forward, but its backward
        needs the full weight gradient (nm per position, which the frozen base skips), plus the product
        B diag(v) A once per call (mrn) and its backward (twice that). The input gradient costs nm on either path.
        Without autograd only the forward terms count. So a rank that is large next to the layer's narrower side
        favours the merged weight, a small rank on a wide layer the factored adapter.
        """
        n, m, r = self.arena_A.shape[1:].numel(), self.arena_B.shape[0], self.arena_v.numel()
        positions = self._positions(x)
        if torch.is_grad_enabled():
            factored, merged = 3 * positions * r * (n + m), positions * n * m + 3 * m * r * n
        else:
            factored, merged = positions * r * (n + m), m * r * n
        return merged < factored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arena_v.numel() == 0:
            return self.base_layer(x)
        if self.merged_is_cheaper(x):
            # W0 is frozen, so autograd reaches only the delta, and through it A, B and v.
            return self._with_weight(x, self.base_layer.weight + self.delta_weight())
        return self.base_layer(x) + self.scaling * self._adapter(x)

    def delta_weight(self) -> torch.Tensor:
        """s * B diag(v) A in the base weight's shape (the merged path of forward, merging and export)."""
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

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base_layer.bias)

    def _positions(self, x: torch.Tensor) -> int:
        return x.numel() // self.base_layer.in_features

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

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)

    def _positions(self, x: torch.Tensor) -> int:
        """The input's voxels over the stride's volume: close enough to the output's count for a cost rule."""
        base = self.base_layer
        return x.numel() // base.in_channels // math.prod(base.stride)

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
        model.set_submodule(name, LAYER_TYPES[type(mod)](mod, config.rank, config.scaling), strict=True)
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
