"""Adapter files: round trip for every method, nothing of the frozen base inside, a base that does not fit is named
and left untouched, and an ARENA adapter exported as PEFT LoRA loads in PEFT with the same outputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from arenaseg.adapters import (
    METHODS,
    AdaptOptions,
    adapt_model,
    arena_layers,
    export_peft_lora,
    load_adapter,
    prune_arena,
    read_adapter_config,
    save_adapter,
)
from arenaseg.adapters.io import ADAPTER_WEIGHTS, PEFT_CONFIG, base_fingerprint
from arenaseg.models.swin_unetr import HEAD_NAME, ModelConfig, build_swin_unetr, replace_with_binary_head

RANK = 4
SHAPE = (1, 1, 64, 32, 32)  # the smallest input the tiny Swin-UNETR takes (see test_factory)


def fresh_model(binary_head: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = build_swin_unetr(ModelConfig.tiny())
    if binary_head:
        replace_with_binary_head(model)
    return model.eval()


def images() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def outputs(model: nn.Module) -> torch.Tensor:
    return model(images())


@torch.no_grad()
def perturb_trained(adapted) -> None:
    """Move every trained tensor away from its initial value (as training would); ARENA gets some gates at zero,
    one layer entirely, and is pruned."""
    gen = torch.Generator().manual_seed(2)
    for p in adapted.network.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    layers = list(arena_layers(adapted.network).values())
    for i, layer in enumerate(layers):
        layer.arena_v[: i % RANK] = 0.0
    if layers:
        layers[-1].arena_v.zero_()
        prune_arena(adapted.network)


def adapt_and_train(method: str, **options: object) -> object:
    adapted = adapt_model(fresh_model(), method, AdaptOptions(rank=RANK, total_steps=10, **options))
    perturb_trained(adapted)
    if method == "adalora":
        # A real allocation (step 1 of 10 masks to PEFT's budget) that the round trip must preserve.
        labels = (torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)) > 0.7).float()
        adapted.training_loss(images(), labels, F.binary_cross_entropy_with_logits).backward()
        adapted.after_step(1)
        assert adapted.rank_report()["totals"]["active_rank"] < RANK * len(adapted.targets)
    return adapted


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_restores_the_outputs_from_the_trained_tensors_alone(method: str, tmp_path: Path) -> None:
    adapted = adapt_and_train(method)
    expected = outputs(adapted.model)
    assert not torch.allclose(expected, outputs(fresh_model()), atol=1e-4), "the adapter must matter"
    save_adapter(adapted, tmp_path)

    with safe_open(str(tmp_path / ADAPTER_WEIGHTS), framework="pt") as f:
        stored = set(f.keys())
    trained = {n for n, p in adapted.network.named_parameters() if p.requires_grad}
    if method == "fft":
        assert stored == set(adapted.network.state_dict())
    else:
        assert stored == trained
        assert not any(".base_layer." in n for n in stored)

    config = read_adapter_config(tmp_path)
    assert config["method"] == method and config["targets"] == adapted.targets
    assert config["base"]["fingerprint"] == base_fingerprint(adapted.base_shapes)

    loaded = load_adapter(fresh_model(), tmp_path)
    loaded.model.eval()
    torch.testing.assert_close(outputs(loaded.model), expected, atol=1e-6, rtol=0)
    assert loaded.trainable_params == adapted.trainable_params
    assert loaded.rank_report() == adapted.rank_report()


def test_adapter_file_holds_no_frozen_base_weight_and_is_small(tmp_path: Path) -> None:
    adapted = adapt_and_train("arena")
    base_bytes = sum(t.numel() * t.element_size() for t in fresh_model().state_dict().values())
    save_adapter(adapted, tmp_path)
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS), framework="pt") as f:
        stored = set(f.keys())
    frozen_base = set(fresh_model().state_dict()) - {f"{HEAD_NAME}.weight", f"{HEAD_NAME}.bias"}
    assert not stored & frozen_base
    assert all(n.startswith(HEAD_NAME) or n.rsplit(".", 1)[-1] in ("arena_A", "arena_B", "arena_v") for n in stored)
    assert (tmp_path / ADAPTER_WEIGHTS).stat().st_size < 0.02 * base_bytes
    # The saved ARENA ranks are the pruned ones: the last layer was switched off entirely.
    ranks = read_adapter_config(tmp_path)["ranks"]
    assert ranks[adapted.targets[-1]] == {"initial_rank": RANK, "allocated_rank": 0, "active_rank": 0}


def snapshot(model: nn.Module) -> tuple:
    return list(model.state_dict()), {n: p.requires_grad for n, p in model.named_parameters()}


def test_a_base_that_does_not_fit_is_named_and_left_untouched(tmp_path: Path) -> None:
    save_adapter(adapt_and_train("lora"), tmp_path)
    other = fresh_model(binary_head=False)  # still the 3-class head
    before = snapshot(other)
    message = (
        r"first mismatching tensor 'out\.conv\.conv\.weight': expected shape \(1, 12, 1, 1, 1\), "
        r"found \(3, 12, 1, 1, 1\)"
    )
    with pytest.raises(ValueError, match=message):
        load_adapter(other, tmp_path)
    assert snapshot(other) == before
    assert not any(isinstance(m, BaseTunerLayer) for m in other.modules())


def test_a_folder_without_an_adapter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(fresh_model(), tmp_path)


def test_arena_exports_as_a_peft_lora_adapter_with_the_same_outputs(tmp_path: Path) -> None:
    adapted = adapt_and_train("arena", alpha=3.0 * RANK)  # ARENA's scaling s = 3 must be folded into B too
    adapted.model.eval()
    assert all(layer.scaling == 3.0 for layer in arena_layers(adapted.network).values())
    ranks = {n: layer.active_rank() for n, layer in arena_layers(adapted.network).items()}
    assert ranks[adapted.targets[-1]] == 0 and len(set(ranks.values())) > 2
    export_peft_lora(adapted.network, tmp_path, base_model_name_or_path="tiny-test-base")

    config = json.loads((tmp_path / PEFT_CONFIG).read_text())
    kept = {n: r for n, r in ranks.items() if r > 0}
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-test-base"
    assert set(config["target_modules"]) == set(kept)
    assert config["rank_pattern"] == kept and config["alpha_pattern"] == kept
    assert config["modules_to_save"] == [HEAD_NAME]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns about missing or unexpected adapter keys
        peft_model = PeftModel.from_pretrained(fresh_model(), str(tmp_path))
    peft_model.eval()
    torch.testing.assert_close(outputs(peft_model), outputs(adapted.model), atol=1e-5, rtol=0)


def test_export_refuses_a_model_with_nothing_left(tmp_path: Path) -> None:
    adapted = adapt_model(fresh_model(), "arena", AdaptOptions(rank=RANK))  # gates start at zero
    with pytest.raises(ValueError, match="pruned to rank 0"):
        export_peft_lora(adapted.network, tmp_path)
    with pytest.raises(ValueError, match="no ARENA layers"):
        export_peft_lora(fresh_model(), tmp_path)
