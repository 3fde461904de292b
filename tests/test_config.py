"""The configuration dataclasses: one rule per field, finite numbers only, one meaning of alpha, old files read."""

from __future__ import annotations

import dataclasses

import pytest

from arenaseg.adapters.config import AdaptOptions, ArenaConfig, OptimizerSettings
from arenaseg.train.loop import TrainSettings
from arenaseg.train.pretrain import PretrainSettings
from arenaseg.utils.errors import UserError

CONFIGS = (AdaptOptions, ArenaConfig, OptimizerSettings, TrainSettings, PretrainSettings)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_float_field_refuses_non_finite_numbers(config: type, bad: float) -> None:
    floats = [f.name for f in dataclasses.fields(config) if isinstance(f.default, float)]
    assert floats  # every config has numbers to check
    for name in floats:
        with pytest.raises(ValueError, match=rf"{config.__name__}\.{name} must be .*finite, got {bad}"):
            config(**{name: bad})


def test_settings_from_the_command_line_raise_user_errors() -> None:
    with pytest.raises(UserError, match=r"TrainSettings\.steps must be an integer >= 1, got 0"):
        TrainSettings(steps=0)
    with pytest.raises(UserError, match=r"PretrainSettings\.sampling must be one of class-balanced, pos-neg"):
        PretrainSettings(sampling="uniform")
    with pytest.raises(ValueError, match=r"AdaptOptions\.decoder must be one of auto, frozen, full, lowrank") as err:
        AdaptOptions(decoder="half")
    assert type(err.value) is ValueError  # the Python API's configs: the caller decides whose mistake it was


def test_shared_concepts_have_one_default() -> None:
    """AdaptOptions' ARENA fields and the loop's optimizer numbers are the configs' own, not copies."""
    arena, options = ArenaConfig(), AdaptOptions()
    for name in ("rank", "alpha", "target_modules", "lam", "rho", "freeze_pruned", "v_gradient"):
        assert getattr(options, name) == getattr(arena, name)
    train, optimizer = TrainSettings(), OptimizerSettings()
    assert (train.lr, train.weight_decay, train.head_lr_scale) == (
        optimizer.lr,
        optimizer.weight_decay,
        optimizer.head_lr_scale,
    )


def test_alpha_is_lora_alpha_everywhere() -> None:
    """The scaling is alpha / r at the initial rank for ARENA as for LoRA; alpha None means alpha = r."""
    for config in (AdaptOptions, ArenaConfig):
        assert config(rank=8).scaling == 1.0 and config(rank=8).lora_alpha == 8.0
        assert config(rank=8, alpha=24).scaling == 3.0
    arena = AdaptOptions(rank=8, alpha=24, lam=0.2).arena_config(["qkv"])
    assert (arena.rank, arena.alpha, arena.scaling, arena.lam, arena.target_modules) == (8, 24, 3.0, 0.2, ["qkv"])


def test_options_round_trip_and_read_files_written_before_the_optimizer_moved_out() -> None:
    options = AdaptOptions(rank=4, target_modules=["qkv"], decoder="full", decoder_lr_scale=0.5)
    assert AdaptOptions.from_dict(options.to_dict()) == options
    old = {**options.to_dict(), "lr": 1e-3, "weight_decay": 1e-4, "head_lr_scale": 10.0}
    assert AdaptOptions.from_dict(old) == options
    with pytest.raises(ValueError, match=r"unknown AdaptOptions keys \['dropout'\]"):
        AdaptOptions.from_dict({**options.to_dict(), "dropout": 0.1})
