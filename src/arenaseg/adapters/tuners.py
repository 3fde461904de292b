"""One hook object per method family, the way PEFT's LoraModel and AdaLoraModel share BaseTuner: what building,
training, saving and reporting need from an adapted model, without branching on the method's name.

- ``PlainParameters``: lp, bitfit, affine-ln, and ``FullFineTuning`` (fft): base parameters trained as they are;
- ``Arena``: ARENA layers, trained by ``ProximalOptimizer``, pruned to their active rank when finalized;
- ``PeftLowRank``: PEFT's LoRA, DoRA and PiSSA;
- ``AdaLora``: PEFT's AdaLoRA, with its orthogonality term and its rank allocator (state outside the optimizer).

Building runs in two phases so that a bad input leaves the model untouched: ``check_target`` and ``configure``
only look (``adapt_model`` runs them first), ``inject`` changes the network.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn

from arenaseg.adapters import peft_baselines, report
from arenaseg.adapters.arena import ArenaLayer, active_ranks, apply_arena, arena_layers, is_arena_v, prune_arena
from arenaseg.adapters.config import AdaptOptions, ArenaConfig, OptimizerSettings
from arenaseg.models.swin_unetr import HEAD_NAME
from arenaseg.optim.proximal import ProximalOptimizer

ENCODER_PREFIX = "swinViT."


class AdaptedModel:
    """A network adapted in place by one method, with what training, saving and reporting need to know about it.

    ``model`` is what to call (images -> logits): the network itself, or PEFT's ``PeftModel`` around it.
    ``network`` is the caller's module (PEFT or ARENA layers injected); its parameter names key the adapter state.
    ``config`` is what ``configure`` built (ARENA's or PEFT's config; None for the plain methods).
    """

    low_rank: ClassVar[bool] = False  # whether the family wraps target layers (and so has a decoder policy)

    def __init__(
        self,
        *,
        model: nn.Module,
        network: nn.Module,
        method: str,
        options: AdaptOptions,
        targets: list[str],
        base_shapes: dict[str, tuple[int, ...]],
        config: Any = None,
    ) -> None:
        self.model = model
        self.network = network
        self.method = method
        self.options = options
        self.targets = targets
        self.base_shapes = base_shapes
        self.config = config

    # -- building (class level: nothing exists yet) --

    @classmethod
    def check_target(cls, method: str, name: str, module: nn.Module) -> None:
        """ValueError unless the family can wrap ``module`` (called for the low-rank families only)."""

    @classmethod
    def trainables(cls, network: nn.Module, method: str) -> list[nn.Parameter]:
        """Base parameters the method trains as they are, besides the head."""
        return []

    @classmethod
    def configure(cls, method: str, options: AdaptOptions, targets: list[str]) -> Any:
        """The family's config, built (and so checked) before the model is touched."""
        return None

    @classmethod
    def inject(cls, network: nn.Module, method: str, config: Any) -> nn.Module:
        """Wrap ``network`` in place; return the module to call."""
        return network

    # -- training --

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
        """The family's optimizer on the trainable parameters, in learning-rate groups (``param_groups``).

        Arguments left None take ``OptimizerSettings``' global defaults, the training loop's, so that the Python
        API trains like the CLI.
        """
        given = {"lr": lr, "weight_decay": weight_decay, "head_lr_scale": head_lr_scale}
        settings = OptimizerSettings(**{k: v for k, v in given.items() if v is not None})
        return self._optimizer(self.param_groups(settings.lr, settings.head_lr_scale), settings)

    def param_groups(self, lr: float, head_lr_scale: float) -> list[dict]:
        """The trainable parameters but ``gates()``, by learning rate: the rest at lr; the decoder at
        ``decoder_lr_scale`` times lr when the decoder policy trains it in full; the new head at ``head_lr_scale``
        times lr (it starts from random weights and is the only layer that must move far, while AdamW moves each
        weight by about lr per step whatever its gradient). Empty groups are left out."""
        head = {id(p) for p in self.network.get_submodule(HEAD_NAME).parameters() if p.requires_grad}
        gates = {id(p) for p in self.gates()}
        named = [(n, p) for n, p in self.network.named_parameters() if p.requires_grad and id(p) not in gates]
        decoder = set()
        if self.options.decoder == "full":
            decoder = {id(p) for n, p in named if not n.startswith(ENCODER_PREFIX) and id(p) not in head}
        groups = [
            {"params": [p for _, p in named if id(p) not in head and id(p) not in decoder], "lr": lr},
            {"params": [p for _, p in named if id(p) in decoder], "lr": lr * self.options.decoder_lr_scale},
            {"params": [p for _, p in named if id(p) in head], "lr": lr * head_lr_scale},
        ]
        return [g for g in groups if g["params"]]

    def gates(self) -> list[nn.Parameter]:
        """Trainable parameters that the family's optimizer steps apart from the learning-rate groups."""
        return []

    def _optimizer(self, groups: list[dict], settings: OptimizerSettings) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: peft_baselines.LossFn) -> torch.Tensor:
        """The method's training objective: ``loss_fn(logits, labels)`` (plus the family's own terms)."""
        return loss_fn(self.model(images), labels)

    def after_step(self, step: int) -> None:
        """Per-step bookkeeping after ``optimizer.step()`` and before ``zero_grad()``."""

    def extra_state(self) -> dict:
        """State outside the parameters and the optimizer that a resumed run needs to continue exactly."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore ``extra_state()`` (after the parameters and the optimizer)."""

    def progress(self) -> dict:
        """Fields for the training progress bar."""
        return {}

    # -- after training: saving and reporting --

    def finalize(self) -> None:
        """Bring the trained model to the form it is saved and evaluated in (its function unchanged)."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors by ``network`` parameter name."""
        return {n: p.detach() for n, p in self.network.named_parameters() if p.requires_grad}

    def rank_report(self) -> dict:
        return report.rank_report(self.network, self._budgets())

    def _budgets(self) -> dict[str, int] | None:
        return None

    def allocation(self) -> dict:
        """The rank allocation that the tensors' shapes alone do not restore; empty for most families."""
        return {}

    def restore_allocation(self, allocation: dict) -> None:
        """Re-impose a saved ``allocation()`` on a freshly adapted model, before its tensors are loaded."""
        if allocation:
            raise ValueError(f"{self.method} has no rank allocation to restore, got {list(allocation)[:4]}")


class PlainParameters(AdaptedModel):
    """fft, lp, bitfit, affine-ln: base parameters (``trainables``) trained as they are, no layer wrapped."""

    @classmethod
    def trainables(cls, network: nn.Module, method: str) -> list[nn.Parameter]:
        """ValueError when bitfit or affine-ln finds nothing to train."""
        select = {
            "fft": lambda: list(network.parameters()),
            "lp": lambda: [],
            "bitfit": lambda: [p for n, p in network.named_parameters() if n == "bias" or n.endswith(".bias")],
            "affine-ln": lambda: [
                p for m in network.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)
            ],
        }
        params = select[method]()
        if not params and method != "lp":
            raise ValueError(
                f"{method} has nothing to train in {type(network).__name__} (no biases / affine LayerNorms)"
            )
        return params


class FullFineTuning(PlainParameters):
    """fft: every parameter trains, so the adapter is the whole state dict (buffers included)."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.network.state_dict().items()}


class Arena(AdaptedModel):
    """ARENA layers; the gates v go to the proximal step of ``ProximalOptimizer``, everything else to AdamW."""

    low_rank = True
    config: ArenaConfig

    @classmethod
    def check_target(cls, method: str, name: str, module: nn.Module) -> None:
        try:
            ArenaLayer.check_supported(module)
        except ValueError as err:
            raise ValueError(f"cannot adapt {name!r}: {err}") from None

    @classmethod
    def configure(cls, method: str, options: AdaptOptions, targets: list[str]) -> ArenaConfig:
        return options.arena_config(targets)

    @classmethod
    def inject(cls, network: nn.Module, method: str, config: ArenaConfig) -> nn.Module:
        apply_arena(network, config)
        return network

    def gates(self) -> list[nn.Parameter]:
        return [p for n, p in self.network.named_parameters() if p.requires_grad and is_arena_v(n)]

    def _optimizer(self, groups: list[dict], settings: OptimizerSettings) -> torch.optim.Optimizer:
        return ProximalOptimizer(
            groups,
            self.gates(),
            lam=self.config.lam,
            rho=self.config.rho,
            lr=settings.lr,
            freeze_pruned=self.config.freeze_pruned,
            settle_from=self._settle_from(),
            v_gradient=self.config.v_gradient,
            inner=functools.partial(torch.optim.AdamW, weight_decay=settings.weight_decay),
        )

    def _settle_from(self) -> int | None:
        """The first step of ``freeze_tail``'s last fraction of the schedule (steps count from 1), None when off."""
        tail, total = self.config.freeze_tail, self.options.total_steps
        if tail is None:
            return None
        if total is None:
            raise ValueError(
                f"ARENA's freeze_tail ({tail:g}) is a fraction of the schedule: set AdaptOptions.total_steps to the "
                "number of training steps, or freeze_tail=None"
            )
        return total - round(tail * total) + 1

    def progress(self) -> dict:
        return {"rank": sum(active for _, active in active_ranks(self.network).values())}

    def finalize(self) -> None:
        """Prune every layer to its active rank (the function is unchanged; the adapter file shrinks)."""
        prune_arena(self.network)

    def allocation(self) -> dict:
        """The current (pruned) rank per layer."""
        return {name: layer.arena_v.numel() for name, layer in arena_layers(self.network).items()}

    def restore_allocation(self, allocation: dict) -> None:
        layers = arena_layers(self.network)
        if set(allocation) != set(layers):
            raise ValueError(
                f"saved ARENA ranks name layers {sorted(set(allocation) ^ set(layers))[:4]} that do not match "
                "the adapted model"
            )
        with torch.no_grad():
            for name, rank in allocation.items():
                layer = layers[name]
                if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= layer.initial_rank:
                    raise ValueError(f"saved rank {rank!r} of {name!r} is outside [0, {layer.initial_rank}]")
                # prune_ keeps exactly the components with a non-zero gate: open the first `rank` of them.
                layer.arena_v.zero_()
                layer.arena_v[:rank] = 1.0
        prune_arena(self.network)


class PeftLowRank(AdaptedModel):
    """LoRA, DoRA and PiSSA, built by PEFT itself (``peft_baselines``)."""

    low_rank = True

    @classmethod
    def check_target(cls, method: str, name: str, module: nn.Module) -> None:
        allowed = peft_baselines.SUPPORTED_LAYERS[method]
        if not isinstance(module, allowed):
            raise ValueError(
                f"cannot adapt {name!r} with {method}: it is a {type(module).__name__}, and PEFT's {method} supports "
                f"{[t.__name__ for t in allowed]} here"
            )

    @classmethod
    def configure(cls, method: str, options: AdaptOptions, targets: Sequence[str]) -> LoraConfig:
        return peft_baselines.lora_config(method, options, targets)

    @classmethod
    def inject(cls, network: nn.Module, method: str, config: LoraConfig) -> PeftModel:
        """PEFT's model around ``network``, its adapters injected in place (callable: images -> logits)."""
        return get_peft_model(network, config)


class AdaLora(PeftLowRank):
    """AdaLoRA: PEFT's orthogonality term in the loss, and its rank allocator updated after every step."""

    _ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    @classmethod
    def configure(cls, method: str, options: AdaptOptions, targets: Sequence[str]) -> AdaLoraConfig:
        return peft_baselines.adalora_config(options, targets)

    @classmethod
    def inject(cls, network: nn.Module, method: str, config: AdaLoraConfig) -> PeftModel:
        """As PEFT's other methods, with the network wrapped so that PEFT can add its term to our loss."""
        return get_peft_model(peft_baselines.WithLossOutput(network), config)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: peft_baselines.LossFn) -> torch.Tensor:
        return self.model.base_model(images, labels=labels, loss_fn=loss_fn).loss

    def after_step(self, step: int) -> None:
        """AdaLoRA reads the gradients to update its importance scores and rank budget."""
        self.model.base_model.update_and_allocate(step)

    def extra_state(self) -> dict:
        """The importance scores of PEFT's RankAllocator and the current rank pattern."""
        allocator = self.model.base_model.rankallocator
        return {
            "rank_pattern": self.allocation(),
            **{key: dict(getattr(allocator, key)) for key in self._ALLOCATOR_STATE},
        }

    def load_extra_state(self, state: dict) -> None:
        allocator = self.model.base_model.rankallocator
        for key in self._ALLOCATOR_STATE:
            setattr(allocator, key, dict(state[key]))
        # the masked tensors themselves come back with the checkpoint; the pattern drives the next allocation
        self.restore_allocation(state["rank_pattern"])

    def _budgets(self) -> dict[str, int]:
        return peft_baselines.adalora_budgets(self.model, self.network)

    def allocation(self) -> dict:
        """AdaLoRA's budget masks (PEFT's ``rank_pattern``)."""
        pattern = self.model.base_model.peft_config[report.PEFT_ADAPTER].rank_pattern
        return {k: [bool(x) for x in v] for k, v in (pattern or {}).items()}

    def restore_allocation(self, allocation: dict) -> None:
        self.model.base_model.peft_config[report.PEFT_ADAPTER].rank_pattern = allocation or None


FAMILIES: dict[str, type[AdaptedModel]] = {
    "arena": Arena,
    "lora": PeftLowRank,
    "dora": PeftLowRank,
    "pissa": PeftLowRank,
    "adalora": AdaLora,
    "fft": FullFineTuning,
    "lp": PlainParameters,
    "bitfit": PlainParameters,
    "affine-ln": PlainParameters,
}
