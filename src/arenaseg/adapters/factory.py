"""One entry point for every adaptation method: which parameters train, through what, and with which optimizer.

Methods (``METHODS``):

- ``arena``: ARENA adapters (``arenaseg.adapters.arena``) trained by ``ProximalOptimizer`` (AdamW + l1 prox on v);
- ``lora``, ``adalora``, ``dora``, ``pissa``: the PEFT library's own implementations (``peft_baselines``);
- ``fft``: full fine-tuning; ``lp``: linear probing (the head only); ``bitfit``: every bias; ``affine-ln``: the
  LayerNorm scales and shifts.

Policies shared by all methods, so that comparisons differ only in the method:

- the output head (``HEAD_NAME``, replaced by the caller with the task's head beforehand) is trained by every
  method unless ``train_head=False`` (which ``lp`` forbids); adapters may not target it;
- the low-rank methods adapt ``target_modules`` (default: the Swin blocks' qkv/proj/mlp linears); what happens to
  the convolutional decoder (every module outside ``swinViT`` but the head) is the ``decoder`` policy: ``frozen``
  (the default, the base track's), ``full`` (trained in full at ``decoder_lr_scale`` times the lr, FSEFT's
  novel-organ recipe) or ``lowrank`` (the method's own adapters on the decoder's Conv3d layers too);
- scaling: ``alpha`` is LoRA's ``lora_alpha`` and defaults to ``rank`` (LoRA/DoRA/PiSSA/AdaLoRA scaling
  lora_alpha / r = 1). ARENA's scaling s is not divided by the rank (see ``arena.py``), so it gets
  s = alpha / rank: both start from the same effective scale, and ARENA's stays fixed while it prunes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from arenaseg.adapters import peft_baselines, report
from arenaseg.adapters.arena import (
    DEFAULT_TARGETS,
    ArenaConfig,
    ArenaLayer,
    apply_arena,
    arena_layers,
    is_arena_v,
    prune_arena,
)
from arenaseg.models.swin_unetr import HEAD_NAME
from arenaseg.optim import proximal
from arenaseg.train.loop import TrainSettings

METHODS = ("arena", "lora", "adalora", "dora", "pissa", "fft", "lp", "bitfit", "affine-ln")
LOW_RANK_METHODS = ("arena", *peft_baselines.PEFT_METHODS)
DECODER_POLICIES = ("frozen", "full", "lowrank")
ENCODER_PREFIX = "swinViT."
# The decoder's 3x3x3 / 1x1x1 convolutions (MONAI SwinUNETR's encoder1-10 skip blocks and decoder1-5 up blocks).
DECODER_CONVS = r"(encoder\d+|decoder\d+)\..*conv\d\.conv"


@dataclass(frozen=True)
class AdaptOptions:
    """Hyper-parameters of every method (each reads the ones it needs); validated on construction.

    ``target_modules`` follows PEFT: a regex full-matched against module names, or a list of names (an entry also
    matches as a ``.``-suffix). ``total_steps`` is required by ``adalora`` (its budget schedule). The AdaLoRA fields
    map to PEFT's ``AdaLoraConfig`` (``adalora_target_rank`` defaults to rank // 2).
    """

    rank: int = 16
    alpha: float | None = None
    target_modules: str | tuple[str, ...] = DEFAULT_TARGETS
    lam: float = ArenaConfig.lam
    rho: float = ArenaConfig.rho
    freeze_pruned: bool = ArenaConfig.freeze_pruned
    v_gradient: str = ArenaConfig.v_gradient
    # make_optimizer()'s defaults: the training loop's global ones, so that the Python API trains like the CLI
    lr: float = TrainSettings.lr
    weight_decay: float = TrainSettings.weight_decay
    head_lr_scale: float = TrainSettings.head_lr_scale
    total_steps: int | None = None
    adalora_target_rank: int | None = None
    adalora_tinit: int = 0
    adalora_tfinal: int = 0
    adalora_delta_t: int = 1
    orth_reg_weight: float = 0.5
    train_head: bool = True
    decoder: str = "frozen"
    decoder_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.adalora_target_rank is None and _is_int(self.rank, 1):
            object.__setattr__(self, "adalora_target_rank", max(1, self.rank // 2))
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, need: str) -> ValueError:
            return ValueError(f"AdaptOptions.{field} must be {need}, got {getattr(self, field)!r}")

        if not _is_int(self.rank, 1):
            raise bad("rank", "an integer >= 1")
        if self.alpha is not None and not self.alpha > 0:
            raise bad("alpha", "> 0 (or None for alpha = rank)")
        if not self.lam >= 0:
            raise bad("lam", ">= 0 (the l1 weight on ARENA's gates)")
        if not self.rho > 0:
            raise bad("rho", "> 0 (ARENA's proximal step size)")
        if not self.lr > 0:
            raise bad("lr", "> 0")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", ">= 0")
        if not self.head_lr_scale > 0:
            raise bad("head_lr_scale", "> 0")
        if self.total_steps is not None and not _is_int(self.total_steps, 1):
            raise bad("total_steps", "an integer >= 1 or None")
        if not _is_int(self.adalora_target_rank, 1) or self.adalora_target_rank > self.rank:
            raise bad("adalora_target_rank", f"an integer in [1, rank={self.rank}]")
        for field in ("adalora_tinit", "adalora_tfinal"):
            if not _is_int(getattr(self, field), 0):
                raise bad(field, "an integer >= 0")
        if not _is_int(self.adalora_delta_t, 1):
            raise bad("adalora_delta_t", "an integer >= 1")
        if not self.orth_reg_weight >= 0:
            raise bad("orth_reg_weight", ">= 0")
        if self.decoder not in DECODER_POLICIES:
            raise bad("decoder", f"one of {', '.join(DECODER_POLICIES)}")
        if not self.decoder_lr_scale > 0:
            raise bad("decoder_lr_scale", "> 0")
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"AdaptOptions.target_modules is not a valid regex ({err}): {targets!r}") from None
        elif not (targets and all(isinstance(t, str) and t for t in targets)):
            raise bad("target_modules", "a regex or a non-empty list of module names")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else float(self.alpha)

    @property
    def arena_alpha(self) -> float:
        """ARENA's s, equal to LoRA's effective scaling lora_alpha / r at the initial rank."""
        return self.lora_alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdaptOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown AdaptOptions keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class AdaptedModel:
    """A network adapted in place by one method, with what training, saving and reporting need to know about it.

    ``model`` is what to call (images -> logits): the network itself, or PEFT's ``PeftModel`` around it.
    ``network`` is the caller's module (PEFT or ARENA layers injected); its parameter names key the adapter state.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        network: nn.Module,
        method: str,
        options: AdaptOptions,
        targets: list[str],
        base_shapes: dict[str, tuple[int, ...]],
        arena_config: ArenaConfig | None = None,
    ) -> None:
        self.model = model
        self.network = network
        self.method = method
        self.options = options
        self.targets = targets
        self.base_shapes = base_shapes
        self._arena_config = arena_config

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.network.parameters() if p.requires_grad)

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    def summary(self) -> str:
        share = 100.0 * self.trainable_params / self.total_params
        return f"{self.method}: {self.trainable_params:,} of {self.total_params:,} parameters trainable ({share:.3f}%)"

    def make_optimizer(
        self, lr: float | None = None, weight_decay: float | None = None, head_lr_scale: float | None = None
    ) -> torch.optim.Optimizer:
        """AdamW on the trainable parameters; for ARENA a ProximalOptimizer (AdamW on A, B, head; prox on v).

        The new head gets ``head_lr_scale`` times the lr: it starts from random weights and is the only layer that
        must move far, while AdamW moves each weight by about lr per step whatever its gradient. Arguments left
        None come from the options (by default the global `TrainSettings` values).
        """
        lr = self.options.lr if lr is None else lr
        weight_decay = self.options.weight_decay if weight_decay is None else weight_decay
        head_lr_scale = self.options.head_lr_scale if head_lr_scale is None else head_lr_scale
        if not head_lr_scale > 0:
            raise ValueError(f"head_lr_scale must be > 0, got {head_lr_scale!r}")
        head = {id(p) for p in _output_head(self.network).parameters() if p.requires_grad}
        named = [(n, p) for n, p in self.network.named_parameters() if p.requires_grad]
        if self.method == "arena":
            named = [(n, p) for n, p in named if not is_arena_v(n)]
        decoder = set()
        if self.options.decoder == "full":
            decoder = {id(p) for n, p in named if not n.startswith(ENCODER_PREFIX) and id(p) not in head}
        groups = [
            {"params": [p for _, p in named if id(p) not in head and id(p) not in decoder], "lr": lr},
            {"params": [p for _, p in named if id(p) in decoder], "lr": lr * self.options.decoder_lr_scale},
            {"params": [p for _, p in named if id(p) in head], "lr": lr * head_lr_scale},
        ]
        groups = [g for g in groups if g["params"]]
        if self.method == "arena":
            inner = functools.partial(torch.optim.AdamW, weight_decay=weight_decay)
            config = self._arena_config
            return proximal.ProximalOptimizer(
                groups,
                [p for n, p in self.network.named_parameters() if p.requires_grad and is_arena_v(n)],
                lam=config.lam,
                rho=config.rho,
                lr=lr,
                freeze_pruned=config.freeze_pruned,
                v_gradient=config.v_gradient,
                inner=inner,
            )
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: peft_baselines.LossFn) -> torch.Tensor:
        """The method's training objective: ``loss_fn(logits, labels)``, plus for AdaLoRA PEFT's orthogonality term.

        ARENA's lam * ||v||_1 is not added here: the proximal step of its optimizer handles it exactly.
        """
        if isinstance(self.model, PeftModel):
            return peft_baselines.peft_training_loss(self.model, self.method, images, labels, loss_fn)
        return loss_fn(self.model(images), labels)

    def after_optimizer_step(self, step: int) -> None:
        """Per-step bookkeeping after ``optimizer.step()`` and before ``zero_grad()`` (AdaLoRA reads the gradients
        to update its importance scores and rank budget); a no-op for the other methods."""
        if self.method == "adalora":
            self.model.base_model.update_and_allocate(step)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors by ``network`` parameter name; for ``fft`` the whole state dict."""
        if self.method == "fft":
            return {k: v.detach() for k, v in self.network.state_dict().items()}
        return {n: p.detach() for n, p in self.network.named_parameters() if p.requires_grad}

    def rank_report(self) -> dict:
        budgets = peft_baselines.adalora_budgets(self.model, self.network) if self.method == "adalora" else None
        return report.rank_report(self.network, budgets)

    def optimizer_side_state(self) -> dict:
        """State outside the parameters and the optimizer that a resumed run needs to continue exactly:
        AdaLoRA's importance scores (PEFT's RankAllocator) and its current rank pattern; empty otherwise."""
        if self.method != "adalora":
            return {}
        allocator = self.model.base_model.rankallocator
        return {
            "rank_pattern": self.allocation(),
            **{key: dict(getattr(allocator, key)) for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")},
        }

    def load_optimizer_side_state(self, state: dict) -> None:
        if self.method != "adalora":
            return
        allocator = self.model.base_model.rankallocator
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, dict(state[key]))
        # the masked tensors themselves come back with the checkpoint; the pattern drives the next allocation
        self.model.base_model.peft_config[report.PEFT_ADAPTER].rank_pattern = state["rank_pattern"] or None

    def allocation(self) -> dict:
        """The rank allocation that the tensors' shapes alone do not restore: ARENA's current (pruned) rank per
        layer, AdaLoRA's budget masks (PEFT's ``rank_pattern``); empty for the other methods."""
        if self.method == "arena":
            return {name: layer.arena_v.numel() for name, layer in arena_layers(self.network).items()}
        if self.method == "adalora":
            pattern = self.model.base_model.peft_config[report.PEFT_ADAPTER].rank_pattern
            return {k: [bool(x) for x in v] for k, v in (pattern or {}).items()}
        return {}

    def restore_allocation(self, allocation: dict) -> None:
        """Re-impose a saved ``allocation()`` on a freshly adapted model, before its tensors are loaded."""
        if self.method == "arena":
            layers = arena_layers(self.network)
            if set(allocation) != set(layers):
                raise ValueError(
                    f"saved ARENA ranks name layers {sorted(set(allocation) ^ set(layers))[:4]} that do not match "
                    "the adapted model"
                )
            with torch.no_grad():
                for name, rank in allocation.items():
                    layer = layers[name]
                    if not _is_int(rank, 0) or rank > layer.initial_rank:
                        raise ValueError(f"saved rank {rank!r} of {name!r} is outside [0, {layer.initial_rank}]")
                    # prune_ keeps exactly the components with a non-zero gate: open the first `rank` of them.
                    layer.arena_v.zero_()
                    layer.arena_v[:rank] = 1.0
            prune_arena(self.network)
        elif self.method == "adalora":
            self.model.base_model.peft_config[report.PEFT_ADAPTER].rank_pattern = allocation or None
        elif allocation:
            raise ValueError(f"{self.method} has no rank allocation to restore, got {list(allocation)[:4]}")


def resolve_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Module names that ``target_modules`` selects, by PEFT's rule; ValueError when it selects none."""
    if isinstance(target_modules, str):
        names = [n for n, _ in model.named_modules() if n and re.fullmatch(target_modules, n)]
    else:
        names = [
            n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in target_modules)
        ]
    if not names:
        examples = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv3d))][:8]
        raise ValueError(
            f"target_modules {target_modules!r} matched no module of {type(model).__name__}; "
            f"its first Linear/Conv3d modules are {examples}"
        )
    return names


def _check_targets(model: nn.Module, method: str, targets: list[str]) -> None:
    """Every target must be a layer the method can wrap, and not the head (which every method trains in full)."""
    for name in targets:
        if name == HEAD_NAME or name.startswith(HEAD_NAME + "."):
            raise ValueError(f"target_modules select the output head {HEAD_NAME!r}, which is trained in full")
        module = model.get_submodule(name)
        if method == "arena":
            try:
                ArenaLayer.check_supported(module)
            except ValueError as err:
                raise ValueError(f"cannot adapt {name!r}: {err}") from None
            continue
        allowed = peft_baselines.SUPPORTED_LAYERS[method]
        if not isinstance(module, allowed):
            raise ValueError(
                f"cannot adapt {name!r} with {method}: it is a {type(module).__name__}, and PEFT's {method} supports "
                f"{[t.__name__ for t in allowed]} here"
            )


def _output_head(model: nn.Module) -> nn.Module:
    try:
        return model.get_submodule(HEAD_NAME)
    except AttributeError:
        raise ValueError(
            f"{type(model).__name__} has no output head at {HEAD_NAME!r} (a Swin-UNETR with its head replaced)"
        ) from None


def _plain_trainables(model: nn.Module, method: str) -> list[nn.Parameter]:
    """The base parameters that fft, bitfit and affine-ln train (besides the head)."""
    if method == "fft":
        return list(model.parameters())
    if method == "bitfit":
        params = [p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    elif method == "affine-ln":
        params = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)]
    else:
        return []
    if not params:
        raise ValueError(f"{method} has nothing to train in {type(model).__name__} (no biases / affine LayerNorms)")
    return params


def adapt_model(model: nn.Module, method: str, options: AdaptOptions | None = None) -> AdaptedModel:
    """Adapt ``model`` in place for ``method``: freeze, wrap and unfreeze as the method says.

    Every check (method, options, targets, layer types, PEFT's own config checks) runs before the first change, so
    a ValueError leaves the model exactly as it was.
    """
    if method not in METHODS:
        raise ValueError(f"unknown adaptation method {method!r}; valid methods: {', '.join(METHODS)}")
    options = AdaptOptions() if options is None else options
    if not isinstance(options, AdaptOptions):
        raise TypeError(f"options must be an AdaptOptions, got {type(options).__name__}")
    adapted_already = [n for n, m in model.named_modules() if isinstance(m, (ArenaLayer, BaseTunerLayer))]
    if adapted_already:
        raise ValueError(f"the model is adapted already (e.g. at {adapted_already[0]!r}); start from a fresh base")
    head = _output_head(model)
    if method == "lp" and not options.train_head:
        raise ValueError("lp trains the head only, so it needs train_head=True")
    if options.decoder != "frozen" and method not in LOW_RANK_METHODS:
        raise ValueError(f"the decoder policy applies to the low-rank methods; {method} needs decoder='frozen'")
    base_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    targets: list[str] = []
    arena_config = peft_config = None
    if method in LOW_RANK_METHODS:
        targets = resolve_targets(model, options.target_modules)
        if options.decoder == "lowrank":
            targets += [t for t in resolve_targets(model, DECODER_CONVS) if t not in targets]
        _check_targets(model, method, targets)
        if method == "arena":
            arena_config = ArenaConfig(
                rank=options.rank,
                alpha=options.arena_alpha,
                target_modules=targets,
                lam=options.lam,
                rho=options.rho,
                freeze_pruned=options.freeze_pruned,
                v_gradient=options.v_gradient,
            )
        else:
            peft_config = peft_baselines.peft_config(method, options, targets)
    plain = _plain_trainables(model, method)
    if options.decoder == "full":
        plain += [p for n, p in model.named_parameters() if not n.startswith(ENCODER_PREFIX)]

    # From here on the model changes; nothing below is expected to raise.
    model.requires_grad_(False)
    runnable: nn.Module = model
    if arena_config is not None:
        apply_arena(model, arena_config)
    elif peft_config is not None:
        runnable = peft_baselines.wrap_with_peft(model, method, peft_config)
    for p in plain:  # after PEFT's wrapping, which marks only its adapters trainable
        p.requires_grad_(True)
    head.requires_grad_(options.train_head)
    return AdaptedModel(
        model=runnable,
        network=model,
        method=method,
        options=options,
        targets=targets,
        base_shapes=base_shapes,
        arena_config=arena_config,
    )
