"""Per-layer rank report of an adapted network: what each method spends, in ranks and in parameters.

Every low-rank method is reported in the same terms so that tables compare like with like:

- ``initial_rank``: the rank the layer was built with;
- ``allocated_rank``: the rank its tensors have now (ARENA shrinks it when pruned; the others keep it);
- ``active_rank``: the components that change the layer's function (ARENA: gates v != 0; AdaLoRA: its budgeted,
  unmasked triplets; LoRA, DoRA, PiSSA: the fixed rank);
- ``full_rank``: min(in, out) of the layer's update, the most independent components any rank can give it (a
  small layer adapted at a large rank holds redundant components, active or not);
- ``params``: the adapter parameters that the active components need (DoRA adds its magnitude vector);
- ``masked_params``: the trainable parameters of allocated but inactive components (ARENA before it is pruned,
  AdaLoRA's masked triplets): they change nothing, so the parameters a method keeps are its trainable ones minus these.

The totals add ``usable_rank``, the sum over layers of min(active_rank, full_rank).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from peft.tuners.adalora import AdaLoraLayer
from peft.tuners.lora import LoraLayer
from torch import nn

from arenaseg.adapters.arena import ArenaLayer

PEFT_ADAPTER = "default"


def _per_component(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """Parameters of one rank component: one row of A plus one column of B."""
    return math.prod(a_shape[1:]) + b_shape[0]


def _full_rank(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """min(in, out) of an update B A: a row of A spans the layer's input (times a kernel), a column of B its output."""
    return min(math.prod(a_shape[1:]), b_shape[0])


def _arena_entry(layer: ArenaLayer) -> dict:
    active = layer.active_rank()
    shapes = tuple(layer.arena_A.shape), tuple(layer.arena_B.shape)
    return {
        "kind": "arena",
        "initial_rank": layer.initial_rank,
        "allocated_rank": layer.arena_v.numel(),
        "active_rank": active,
        "full_rank": _full_rank(*shapes),
        "params": active * (_per_component(*shapes) + 1),  # + its gate v
        "masked_params": (layer.arena_v.numel() - active) * (_per_component(*shapes) + 1),
    }


def _adalora_entry(layer: AdaLoraLayer, budget: int | None) -> dict:
    rank = layer.r[PEFT_ADAPTER]
    active = rank if budget is None else budget
    a, b = layer.lora_A[PEFT_ADAPTER], layer.lora_B[PEFT_ADAPTER]
    per = _per_component(tuple(a.shape), tuple(b.shape)) + 1  # + its singular value E
    return {
        "kind": "adalora",
        "initial_rank": rank,
        "allocated_rank": rank,
        "active_rank": active,
        "full_rank": _full_rank(tuple(a.shape), tuple(b.shape)),
        "params": active * per,
        "masked_params": (rank - active) * per,
    }


def _lora_entry(layer: LoraLayer) -> dict:
    rank = layer.r[PEFT_ADAPTER]
    a, b = layer.lora_A[PEFT_ADAPTER].weight, layer.lora_B[PEFT_ADAPTER].weight
    params = a.numel() + b.numel()
    dora = PEFT_ADAPTER in layer.lora_magnitude_vector
    if dora:
        params += layer.lora_magnitude_vector[PEFT_ADAPTER].weight.numel()
    return {
        "kind": "dora" if dora else "lora",
        "initial_rank": rank,
        "allocated_rank": rank,
        "active_rank": rank,
        "full_rank": _full_rank(tuple(a.shape), tuple(b.shape)),
        "params": params,
        "masked_params": 0,
    }


def rank_report(model: nn.Module, budgets: Mapping[str, int] | None = None) -> dict:
    """``{"layers": {module name: entry}, "totals": sums}`` for every ARENA or PEFT LoRA-family layer in ``model``.

    ``budgets`` overrides the active rank per module name: AdaLoRA keeps its rank allocation in the tuner, not in
    the layers (see ``AdaptedModel.rank_report``).
    """
    budgets = budgets or {}
    layers: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, ArenaLayer):
            layers[name] = _arena_entry(module)
        elif isinstance(module, AdaLoraLayer):  # before LoraLayer: AdaLoraLayer subclasses it
            layers[name] = _adalora_entry(module, budgets.get(name))
        elif isinstance(module, LoraLayer):
            layers[name] = _lora_entry(module)
    keys = ("initial_rank", "allocated_rank", "active_rank", "full_rank", "params", "masked_params")
    totals = {key: sum(entry[key] for entry in layers.values()) for key in keys}
    totals["usable_rank"] = sum(min(e["active_rank"], e["full_rank"]) for e in layers.values())
    return {"layers": layers, "totals": {"layers": len(layers), **totals}}


def format_rank_table(report: dict) -> str:
    """A fixed-width table of ``rank_report``'s output, one line per layer plus the totals."""
    keys = ("initial_rank", "active_rank", "full_rank", "params")
    rows = [(name, e["kind"], *(e[k] for k in keys)) for name, e in report["layers"].items()]
    totals = report["totals"]
    rows.append((f"total ({totals['layers']} layers)", "", *(totals[k] for k in keys)))
    width = max([len("layer"), *(len(r[0]) for r in rows)])
    header = f"{'layer':<{width}}  {'kind':<7}  {'initial':>7}  {'active':>6}  {'full':>6}  {'params':>10}"
    lines = [header, "-" * len(header)]
    for i, (name, kind, initial, active, full, params) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(header))
        lines.append(f"{name:<{width}}  {kind:<7}  {initial:>7}  {active:>6}  {full:>6}  {params:>10,}")
    if totals["usable_rank"] < totals["active_rank"]:
        lines.append(
            f"full = min(in, out): of the {totals['active_rank']} active components, at most "
            f"{totals['usable_rank']} can be independent; the rest repeat directions of layers narrower than the rank"
        )
    return "\n".join(lines)
