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
- scaling: ``alpha`` is LoRA's ``lora_alpha`` for every low-rank method and defaults to ``rank``: each update is
  scaled by alpha / r at the initial rank (1 by default), ARENA's s included, which stays fixed while it prunes
  (``config.py``).

What each family does during training and after it lives in its hook object (``tuners.py``); this module only
chooses the family, checks everything and then changes the model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from arenaseg.adapters import peft_baselines
from arenaseg.adapters.arena import ArenaLayer
from arenaseg.adapters.config import AdaptOptions
from arenaseg.adapters.tuners import ENCODER_PREFIX, FAMILIES, AdaptedModel
from arenaseg.models.swin_unetr import HEAD_NAME

METHODS = ("arena", "lora", "adalora", "dora", "pissa", "fft", "lp", "bitfit", "affine-ln")
LOW_RANK_METHODS = tuple(m for m in METHODS if FAMILIES[m].low_rank)
# The decoder's 3x3x3 / 1x1x1 convolutions (MONAI SwinUNETR's encoder1-10 skip blocks and decoder1-5 up blocks).
DECODER_CONVS = r"(encoder\d+|decoder\d+)\..*conv\d\.conv"
# The low-rank methods whose adapters can wrap a Conv3d, and so follow the lowrank decoder policy.
CONV3D_METHODS = ("arena", *(m for m, layers in peft_baselines.SUPPORTED_LAYERS.items() if nn.Conv3d in layers))


def decoder_for(method: str, policy: str) -> str:
    """The decoder policy ``method`` runs under where ``policy`` is asked of every method (a grid's track, or the
    default for a new head): frozen for the methods without adapters, and full instead of lowrank for those whose
    adapters cannot wrap a Conv3d (PEFT's AdaLoRA and PiSSA), the decoder's trained form closest to it."""
    if method not in LOW_RANK_METHODS:
        return "frozen"
    return "full" if policy == "lowrank" and method not in CONV3D_METHODS else policy


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


def target_names(model: nn.Module, options: AdaptOptions) -> list[str]:
    """The modules a low-rank method adapts: ``target_modules``, and the decoder's convolutions too under the
    ``lowrank`` decoder policy."""
    targets = resolve_targets(model, options.target_modules)
    if options.decoder == "lowrank":
        targets += [t for t in resolve_targets(model, DECODER_CONVS) if t not in targets]
    return targets


def _output_head(model: nn.Module) -> nn.Module:
    try:
        return model.get_submodule(HEAD_NAME)
    except AttributeError:
        raise ValueError(
            f"{type(model).__name__} has no output head at {HEAD_NAME!r} (a Swin-UNETR with its head replaced)"
        ) from None


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
    family = FAMILIES[method]
    if options.decoder == "auto":
        raise ValueError(
            "decoder='auto' depends on how the head starts, which adapt_model cannot tell; pass frozen, full or "
            "lowrank (arenaseg.pipeline.build_adapted resolves auto)"
        )
    if options.decoder != "frozen" and not family.low_rank:
        raise ValueError(f"the decoder policy applies to the low-rank methods; {method} needs decoder='frozen'")
    base_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    targets: list[str] = []
    if family.low_rank:
        targets = target_names(model, options)
        for name in targets:
            if name == HEAD_NAME or name.startswith(HEAD_NAME + "."):
                raise ValueError(f"target_modules select the output head {HEAD_NAME!r}, which is trained in full")
            family.check_target(method, name, model.get_submodule(name))
    plain = family.trainables(model, method)
    config = family.configure(method, options, targets)
    if options.decoder == "full":
        plain += [p for n, p in model.named_parameters() if not n.startswith(ENCODER_PREFIX)]

    # From here on the model changes; nothing below is expected to raise.
    model.requires_grad_(False)
    runnable = family.inject(model, method, config)
    for p in plain:  # after PEFT's wrapping, which marks only its adapters trainable
        p.requires_grad_(True)
    head.requires_grad_(options.train_head)
    return family(
        model=runnable,
        network=model,
        method=method,
        options=options,
        targets=targets,
        base_shapes=base_shapes,
        config=config,
    )
