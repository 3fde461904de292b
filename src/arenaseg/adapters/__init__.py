"""Adaptation methods (ARENA and the PEFT baselines): their configs, one entry point, hook objects per method
family, adapter files and rank reports."""

from arenaseg.adapters.arena import (
    ArenaConv3d,
    ArenaLayer,
    ArenaLinear,
    active_ranks,
    apply_arena,
    arena_layers,
    is_arena_v,
    merge_arena,
    prune_arena,
)
from arenaseg.adapters.config import DEFAULT_TARGETS, AdaptOptions, ArenaConfig, OptimizerSettings
from arenaseg.adapters.factory import METHODS, adapt_model
from arenaseg.adapters.io import export_peft_lora, load_adapter, read_adapter_config, save_adapter
from arenaseg.adapters.report import format_rank_table, rank_report
from arenaseg.adapters.tuners import AdaptedModel

__all__ = [
    "DEFAULT_TARGETS",
    "METHODS",
    "AdaptOptions",
    "AdaptedModel",
    "ArenaConfig",
    "ArenaConv3d",
    "ArenaLayer",
    "ArenaLinear",
    "OptimizerSettings",
    "active_ranks",
    "adapt_model",
    "apply_arena",
    "arena_layers",
    "export_peft_lora",
    "format_rank_table",
    "is_arena_v",
    "load_adapter",
    "merge_arena",
    "prune_arena",
    "rank_report",
    "read_adapter_config",
    "save_adapter",
]
