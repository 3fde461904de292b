"""The PEFT-library baselines (LoRA, AdaLoRA, DoRA, PiSSA) on a plain nn.Module such as MONAI's SwinUNETR.

Everything low-rank here is built by PEFT 0.21 itself (``get_peft_model``); this module only chooses configs and
bridges two gaps between PEFT's transformers-shaped API and a segmentation network:

- ``get_peft_model`` on a model without a ``task_type`` returns a plain ``PeftModel`` whose forward calls the
  network directly (images -> logits), which is what we want for inference and for LoRA, DoRA and PiSSA.
- AdaLoRA's orthogonality regulariser lives in ``AdaLoraModel.forward`` (``peft_model.base_model``), which adds
  ``orth_reg_weight * regu_loss`` only to an output that has a ``.loss``; ``PeftModel.forward`` bypasses it. So the
  AdaLoRA network is wrapped in ``WithLossOutput``, and ``tuners.AdaLora.training_loss`` calls the tuner with the
  labels and loss function, letting PEFT add its own regulariser to our loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel
from peft.tuners.adalora import AdaLoraLayer
from torch import nn

from arenaseg.adapters.config import AdaptOptions
from arenaseg.adapters.report import PEFT_ADAPTER

# What PEFT 0.21.2 can wrap among the layers of a 3D network: LoRA and DoRA have Conv3d variants; AdaLoRA has
# SVDLinear/SVDConv2d only, and PiSSA's SVD initialisation is implemented for Linear weights only (on a Conv3d PEFT
# raises "Unknown initialization init_lora_weights='pissa'").
SUPPORTED_LAYERS: dict[str, tuple[type[nn.Module], ...]] = {
    "lora": (nn.Linear, nn.Conv3d),
    "dora": (nn.Linear, nn.Conv3d),
    "adalora": (nn.Linear,),
    "pissa": (nn.Linear,),
}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossOutput:
    """The transformers-style output AdaLoraModel.forward looks for (it adds its regulariser to ``loss`` in place)."""

    logits: torch.Tensor
    loss: torch.Tensor


class WithLossOutput(nn.Module):
    """``net(images)`` as logits, or with labels and a loss function a ``LossOutput`` carrying the loss."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, loss_fn: LossFn | None = None
    ) -> torch.Tensor | LossOutput:
        logits = self.net(images)
        if loss_fn is None:
            return logits
        # PEFT adds its term in place (``outputs.loss += ...``): give it a copy, so that the tensor loss_fn returned
        # (which its last op may have saved for backward, or the caller may hold) is never modified.
        return LossOutput(logits=logits, loss=loss_fn(logits, labels).clone())


def _common(options: AdaptOptions, targets: Sequence[str]) -> dict:
    """What every PEFT config here shares. ``targets`` are full module names (PEFT matches a list entry against the
    name or a ``.``-suffix of it, so the names also match inside the AdaLoRA wrapper, with its ``net.`` prefix)."""
    return {"lora_alpha": options.lora_alpha, "target_modules": list(targets), "lora_dropout": 0.0}


LORA_VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"}}


def lora_config(method: str, options: AdaptOptions, targets: Sequence[str]) -> LoraConfig:
    """LoRA's, DoRA's or PiSSA's config, built before the model is touched so that PEFT's own checks run first."""
    return LoraConfig(r=options.rank, **_common(options, targets), **LORA_VARIANTS[method])


def adalora_config(options: AdaptOptions, targets: Sequence[str]) -> AdaLoraConfig:
    if options.total_steps is None:
        raise ValueError("adalora needs AdaptOptions.total_steps: its rank budget schedule is set by it")
    return AdaLoraConfig(
        init_r=options.rank,
        target_r=options.adalora_target_rank,
        total_step=options.total_steps,
        tinit=options.adalora_tinit,
        tfinal=options.adalora_tfinal,
        deltaT=options.adalora_delta_t,
        orth_reg_weight=options.orth_reg_weight,
        **_common(options, targets),
    )


def adalora_budgets(peft_model: PeftModel, network: nn.Module) -> dict[str, int]:
    """Module name in ``network`` -> AdaLoRA's currently budgeted rank (empty before its first allocation).

    PEFT keeps the allocation as a boolean mask per ``lora_E`` parameter name of the wrapped model in
    ``peft_config.rank_pattern``; parameters are matched by identity, so the wrapper's name prefix does not matter.
    """
    tuner = peft_model.base_model
    pattern = tuner.peft_config[PEFT_ADAPTER].rank_pattern
    if not pattern:
        return {}
    kept = {id(p): int(sum(pattern[n])) for n, p in tuner.model.named_parameters() if n in pattern}
    return {
        name: kept[id(module.lora_E[PEFT_ADAPTER])]
        for name, module in network.named_modules()
        if isinstance(module, AdaLoraLayer) and id(module.lora_E[PEFT_ADAPTER]) in kept
    }
