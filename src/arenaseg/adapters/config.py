"""The adaptation methods' configuration, PEFT-style: dataclasses that import no adapter code (only utils and optim).

One name per concept, each defined once here (the other classes reuse its field, default and rule):

- ``rank`` r: the initial rank of every low-rank method;
- ``alpha``: LoRA's ``lora_alpha`` for every low-rank method, ARENA included; None means alpha = r. The update is
  scaled by alpha / r fixed at the initial rank: LoRA, DoRA, PiSSA and AdaLoRA as PEFT does, ARENA by
  s = alpha / r (``ArenaConfig.scaling``), which it keeps while pruning (see ``arena.py``). So every method starts
  from the same effective scale (1 by default);
- ``lam``, ``rho``, ``v_gradient``, ``freeze_pruned``, ``freeze_tail``: ARENA's proximal step on its gates
  (``ArenaConfig``);
- ``lr``, ``weight_decay``, ``head_lr_scale``: the optimizer's (``OptimizerSettings``; the training loop's
  ``TrainSettings`` takes its defaults from there).

Each field declares its default, rule and command-line help once (``arenaseg.utils.settings``); ``validate`` adds
the rules that tie fields together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from arenaseg.optim.proximal import V_GRADIENTS  # the optimizer owns the directions of its step on v
from arenaseg.utils.settings import Config, choice, flag, integer, is_int, is_number, number, rule, same_as

DEFAULT_TARGETS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.linear1|mlp\.linear2)"
DECODER_POLICIES = ("frozen", "full", "lowrank")
# The low-rank methods' decoder policy for a new head, chosen on the pretrain-split probe (docs/benchmark.md,
# criterion 2). A head that starts from the model's own class keeps the decoder frozen.
NEW_HEAD_DECODER = "lowrank"
# ARENA's proximal step on its gates: options that no other method reads
GATE_OPTIONS = ("lam", "rho", "freeze_pruned", "freeze_tail", "v_gradient")


def _is_targets(value: object) -> bool:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error:
            return False
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(t, str) and t for t in value)


def targets(default: str) -> Any:
    """PEFT's ``target_modules``: a regex full-matched against module names, or a list of names (an entry also
    matches as a ``.``-suffix)."""
    return rule(default, "a valid regex or a non-empty list of module names", _is_targets)


class _Scaled:
    """``rank`` and ``alpha`` read the same way by every low-rank method."""

    rank: int
    alpha: float | None

    @property
    def lora_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else float(self.alpha)

    @property
    def scaling(self) -> float:
        """alpha / r at the initial rank: LoRA's scaling, and ARENA's s (fixed while it prunes)."""
        return self.lora_alpha / self.rank


@dataclass
class ArenaConfig(_Scaled, Config):
    """Where ARENA goes and how it is regularised: the project's one global default, for every organ and k.

    The proximal step on v is v <- soft_threshold(v - rho*eta_t*d, rho*eta_t*lam) (``arenaseg.optim.proximal``).
    With the default direction d (``v_gradient="adam"``: Adam's normalised gradient, |d| <= ~1), a gate moves by at
    most rho*eta_t per step. rho = 1e-2, ten times the factors' lr: a component's magnitude is v alone (A rows and B
    columns are unit vectors), while a LoRA component b a^T grows through all m entries of b at once, about
    sqrt(m) (6 to 17 for the adapted layers here) times faster than one entry. With rho = lr = 1e-3, |v| stayed
    below ~0.06 in 100 steps and ARENA's logits equalled a linear probe's to two decimals
    (benchmarks/results/cell_logits.md); with rho = 1e-2 it departs from the probe (benchmarks/results/
    step_budget_arena.md, pretrain-split cases only). lam is scale-free: a component stays on only
    while its normalised pull |d| exceeds lam. A gradient of random sign gives |d| about
    sqrt((1 - beta1) / (1 + beta1)) = 0.23 with beta1 = 0.9, so a lam well above that switches noise-driven
    components off, and one near 1 switches off everything but the steadiest pulls. The default is the probe's
    choice by criterion 6 of docs/benchmark.md (the sparsest lam within noise of the best held-in Dice; evidence in
    benchmarks/results/probe/README.md).
    With ``v_gradient="plain"`` (the exact step for L + lam*||v||_1), lam is in units of the loss gradient instead.
    ``freeze_pruned`` (default False): v entries that were active and then reached zero stay zero; by default the
    step is a true proximal step, so a pruned component comes back when its gradient is strong enough.
    ``freeze_tail``: over that last fraction of the steps no gate at zero comes back, so the active set settles on
    the components that stay on through the tail (None: no tail). Without it, a gate at zero comes back for a step
    or two whenever one batch pulls hard enough, and the saved adapter keeps whatever the last batch switched on,
    with values too small to matter. The default is the probe's choice by criterion 6 of docs/benchmark.md (the same
    held-in Dice, a fraction of the gates). The tail is a fraction of the schedule, so it needs the options'
    ``total_steps``.
    Mutable like PEFT's configs, so ``apply_arena`` validates it again.
    """

    rank: int = integer(16, 1, help="initial rank of low-rank methods")
    alpha: float | None = number(None, 0.0, above=True, optional=True)
    target_modules: str | list[str] = targets(DEFAULT_TARGETS)
    lam: float = number(0.7, 0.0, help="ARENA's l1 weight λ on its gates: larger switches more rank-1 components off")
    rho: float = number(1e-2, 0.0, above=True)
    freeze_pruned: bool = flag(False)
    freeze_tail: float | None = rule(
        0.1,
        "None or a fraction > 0 and < 1 and finite",
        lambda v: v is None or (is_number(v) and 0 < v < 1),
        "ARENA: over this last fraction of the steps no switched-off component comes back, so the kept rank "
        "settles (None: no tail)",
        parse=float,
    )
    v_gradient: str = choice("adam", V_GRADIENTS)

    def matches(self, name: str) -> bool:
        """PEFT's rule: a regex is full-matched, a list entry matches the name itself or a ``.``-suffix of it."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)


@dataclass(frozen=True)
class OptimizerSettings(Config):
    """The optimizer's global defaults, for every method, organ and k (BENCHMARK.md forbids per-task tuning)."""

    lr: float = number(1e-3, 0.0, above=True, help="AdamW peak learning rate")
    weight_decay: float = number(1e-4, 0.0, help="AdamW weight decay")
    # the new head starts from random weights: benchmarks/results/step_budget_lp.md
    head_lr_scale: float = number(
        10.0,
        0.0,
        above=True,
        help="the new output head's lr as a multiple of --lr: it starts from random weights and must move further "
        "than the adapters",
    )


@dataclass(frozen=True)
class AdaptOptions(_Scaled, Config):
    """What ``adapt_model`` builds (each method reads the fields it needs); validated on construction.

    ``total_steps`` is required by ``adalora`` (its budget schedule). The AdaLoRA fields map to PEFT's
    ``AdaLoraConfig`` (``adalora_target_rank`` defaults to rank // 2). ``decoder`` is what happens to the
    convolutional decoder (every module outside ``swinViT`` but the head) under a low-rank method: ``frozen``,
    ``full`` (trained in full at ``decoder_lr_scale`` times the lr, FSEFT's novel-organ recipe), ``lowrank``
    (the method's own adapters on the decoder's Conv3d layers too), or ``auto``, which only
    ``pipeline.build_adapted`` resolves, since it depends on how the head starts.
    """

    rank: int = same_as(ArenaConfig, "rank")
    alpha: float | None = same_as(ArenaConfig, "alpha")
    target_modules: str | tuple[str, ...] = same_as(ArenaConfig, "target_modules")
    lam: float = same_as(ArenaConfig, "lam")
    rho: float = same_as(ArenaConfig, "rho")
    freeze_pruned: bool = same_as(ArenaConfig, "freeze_pruned")
    freeze_tail: float | None = same_as(ArenaConfig, "freeze_tail")
    v_gradient: str = same_as(ArenaConfig, "v_gradient")
    total_steps: int | None = integer(None, 1, optional=True)
    adalora_target_rank: int | None = integer(None, 1, optional=True)
    adalora_tinit: int = integer(0, 0)
    adalora_tfinal: int = integer(0, 0)
    adalora_delta_t: int = integer(1, 1)
    orth_reg_weight: float = number(0.5, 0.0)
    train_head: bool = flag(True)
    decoder: str = choice(
        "frozen",
        ("auto", *DECODER_POLICIES),
        help="what the low-rank methods do with the convolutional decoder: frozen, full (trained in full), lowrank "
        f"(the method's adapters on its Conv3d layers too), or auto: {NEW_HEAD_DECODER} for a new head (novel "
        "track; full for adalora and pissa, whose adapters cannot wrap a Conv3d), frozen when the head starts from "
        "the model's class (base track); the benchmark's probe chose this (docs/benchmark.md)",
    )
    decoder_lr_scale: float = number(1.0, 0.0, above=True)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.adalora_target_rank is None and is_int(self.rank, 1):
            object.__setattr__(self, "adalora_target_rank", max(1, self.rank // 2))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.adalora_target_rank > self.rank:
            raise self.error(f"AdaptOptions.adalora_target_rank must be an integer in [1, rank={self.rank}]")

    @classmethod
    def from_dict(cls, d: dict) -> AdaptOptions:
        """Also reads options written before 2026-12-02, which held lr, weight_decay and head_lr_scale: those were
        ``make_optimizer()``'s defaults, not necessarily the run's (its ``settings.train`` holds the numbers used)."""
        return super().from_dict({k: v for k, v in d.items() if k not in ("lr", "weight_decay", "head_lr_scale")})

    def arena_config(self, target_modules: list[str]) -> ArenaConfig:
        """ARENA's layer config for these options on the resolved ``target_modules``."""
        names = ("rank", "alpha", *GATE_OPTIONS)
        return ArenaConfig(target_modules=target_modules, **{n: getattr(self, n) for n in names})
