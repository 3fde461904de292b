"""Protocol v2: the base and novel tracks, the zero-shot and scratch rows, and what makes two cells the same cell."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from arenaseg import pipeline
from arenaseg.adapters import AdaptOptions, adapt_model
from arenaseg.adapters.config import NEW_HEAD_DECODER
from arenaseg.bench.grid import plan_cells, result_row
from arenaseg.bench.runner import cell_job, signature_mismatch
from arenaseg.models.foundation import load_foundation
from arenaseg.models.swin_unetr import HEAD_NAME
from arenaseg.train.loop import TrainSettings
from arenaseg.utils.errors import UserError

TESTS = ["phantom_0006"]


def job(phantoms: Path, model: Path, out: Path, **fields) -> pipeline.AdaptJob:
    settings = TrainSettings(steps=2, patches_per_step=1, checkpoint_every=1)
    fields = {"organ": "liver", "shots": 1, "seed": 0, "method": "lp", "train": settings, **fields}
    return pipeline.AdaptJob(data=str(phantoms), out=str(out), model=str(model), test_cases=TESTS, **fields)


def test_zero_shot_row_evaluates_the_model_s_own_class_without_training(phantoms, tiny_foundation, tmp_path):
    zero_shot = job(phantoms, tiny_foundation, tmp_path / "zs", method="zero-shot", shots=0, track="base")
    record = pipeline.run_adapt(zero_shot)

    assert (record.track, record.steps_done, record.trainable_params, record.support_cases) == ("base", 0, 0, [])
    assert record.final_loss is None and record.mean_dice is not None
    # The run's head is the foundation model's liver row against background, untouched.
    base, _ = load_foundation(tiny_foundation)
    full = base.get_submodule(HEAD_NAME)
    adapted, _ = pipeline.load_run(tmp_path / "zs")
    head = adapted.network.get_submodule(HEAD_NAME)
    assert torch.equal(head.weight[0], full.weight[1] - full.weight[0])
    assert torch.equal(head.bias[0], full.bias[1] - full.bias[0])
    # Training settings and method options cannot shape an untrained row: it stays the same cell under others.
    other = dataclasses.replace(zero_shot, train=TrainSettings(steps=250), options=AdaptOptions(lam=0.5))
    assert signature_mismatch(other, record) is None
    other_precision = dataclasses.replace(zero_shot, train=TrainSettings(precision="bf16"))
    assert "train.precision" in signature_mismatch(other_precision, record)


def test_zero_shot_needs_k_0_and_an_organ_of_the_model(phantoms, tiny_foundation, tmp_path):
    with pytest.raises(UserError, match="0 for zero-shot"):
        pipeline.run_adapt(job(phantoms, tiny_foundation, tmp_path / "a", method="zero-shot", shots=1))
    with pytest.raises(UserError, match="0 for zero-shot"):
        pipeline.run_adapt(job(phantoms, tiny_foundation, tmp_path / "b", shots=0))
    with pytest.raises(UserError, match=r"pancreas is not a class of .* \(its classes: .*liver"):
        pipeline.run_adapt(job(phantoms, tiny_foundation, tmp_path / "c", organ="pancreas", track="base"))
    assert not any(tmp_path.iterdir())  # refused before any folder was made


def test_tracks_decide_how_the_head_starts(tiny_foundation):
    options = AdaptOptions()
    _, base, _, row = pipeline.build_adapted(str(tiny_foundation), "liver", "lp", options, 0, "base")
    _, novel, _, no_row = pipeline.build_adapted(str(tiny_foundation), "liver", "lp", options, 0, "novel")
    _, auto, _, auto_row = pipeline.build_adapted(str(tiny_foundation), "liver", "lp", options, 0)
    assert row == auto_row == (1, 0) and no_row is None
    weights = [m.network.get_submodule(HEAD_NAME).weight for m in (base, novel, auto)]
    assert torch.equal(weights[0], weights[2])
    assert weights[1].abs().max() < 0.1 < weights[0].abs().max()  # a new head starts near 0 (std 1e-2)


def test_scratch_trains_every_weight_of_a_re_initialised_network(tiny_foundation):
    base, _ = load_foundation(tiny_foundation)
    _, scratch, _, row = pipeline.build_adapted(str(tiny_foundation), "liver", "scratch", AdaptOptions(), 0)
    assert row is None  # a random trunk has no class to start from: always a new head
    assert scratch.trainable_params == scratch.total_params
    pretrained = {n: p for n, p in base.named_parameters() if p.dim() >= 2 and not n.startswith(HEAD_NAME)}
    trained = dict(scratch.network.named_parameters())
    assert pretrained and not [n for n, p in pretrained.items() if torch.equal(trained[n], p)]


def test_cells_carry_track_decoder_and_protocol_into_the_job(phantoms, tmp_path):
    cells = plan_cells("btcv-fs", ["arena-r4", "lp"], ["pancreas"], [1], [0], phantoms, test_cases=TESTS)
    assert [(c.track, c.name, c.decoder) for c in cells] == [
        ("novel", "arena-r4", cells[0].decoder),
        ("novel", "lp", "frozen"),
    ]
    arena = cell_job(cells[0], tmp_path, {"model": "m.safetensors"})
    assert (arena.track, arena.protocol, arena.options.rank, arena.options.decoder) == (
        "novel",
        "btcv-fs-v2",
        4,
        cells[0].decoder,
    )


def test_grid_wide_choices_reach_every_cell_but_the_base_decoder_stays_frozen(phantoms, tmp_path):
    """`arenaseg bench --novel-decoder/--lam`: the probe's global choices given on the command line."""
    cells = plan_cells(
        "btcv-fs",
        ["lora-r4", "fft", "adalora-r16"],
        ["right_kidney", "pancreas"],
        [1],
        [0],
        phantoms,
        test_cases=TESTS,
        novel_decoder="lowrank",
    )
    assert [(c.track, c.name, c.decoder) for c in cells] == [
        ("base", "fft", "frozen"),
        ("base", "lora-r4", "frozen"),
        ("base", "adalora-r16", "frozen"),
        ("novel", "fft", "frozen"),
        ("novel", "lora-r4", "lowrank"),
        ("novel", "adalora-r16", "full"),  # PEFT's AdaLoRA cannot wrap a Conv3d: the decoder trains in full
    ]
    jobs = [cell_job(c, tmp_path, {"options": {"lam": 0.05, "decoder": "full"}}) for c in cells[:2] + cells[3:5]]
    assert [(j.options.lam, j.options.rank, j.options.decoder) for j in jobs] == [
        (0.05, AdaptOptions().rank, "frozen"),  # the cell's decoder policy wins over the grid's options
        (0.05, 4, "frozen"),
        (0.05, AdaptOptions().rank, "frozen"),
        (0.05, 4, "lowrank"),
    ]


@pytest.mark.parametrize(
    ("organ", "method", "decoder"),
    [
        ("liver", "lora", "frozen"),  # the model's own class: the head starts from it, the decoder stays frozen
        ("pancreas", "lora", NEW_HEAD_DECODER),  # a new head: the probe's choice
        ("pancreas", "adalora", "full"),  # whose adapters cannot follow it onto the Conv3d layers
        ("pancreas", "lp", "frozen"),
    ],
)
def test_decoder_auto_follows_the_head_s_start(tiny_foundation, organ, method, decoder):
    options = AdaptOptions(rank=4, decoder="auto", total_steps=10)
    _, adapted, resolved, _ = pipeline.build_adapted(str(tiny_foundation), organ, method, options, 0)
    assert resolved.decoder == decoder
    decoder_trains = [n for n, p in adapted.network.named_parameters() if p.requires_grad and "decoder1." in n]
    assert bool(decoder_trains) == (decoder != "frozen")
    with pytest.raises(ValueError, match="decoder='auto' depends on how the head starts"):
        adapt_model(load_foundation(tiny_foundation)[0], method, options)


def test_a_cell_counts_only_when_every_option_protocol_and_track_match(phantoms, tiny_foundation, tmp_path):
    """A finished run's record against the bench's job: any method option (rho, v_gradient, alpha, freeze_pruned,
    decoder, ...), the protocol or the track differing makes it another cell."""
    cells = plan_cells("btcv-fs", ["arena-r4"], ["pancreas"], [1], [0], phantoms, test_cases=TESTS)
    overrides = {"model": str(tiny_foundation), "train": TrainSettings(steps=2, patches_per_step=1)}
    this = cell_job(cells[0], tmp_path, overrides)
    record = pipeline.run_adapt(this)
    row = result_row(record)
    assert (row.track, row.protocol, row.decoder) == ("novel", "btcv-fs-v2", this.options.decoder)
    assert signature_mismatch(this, record) is None
    for change in ({"rho": 0.5}, {"v_gradient": "plain"}, {"alpha": 2.0}, {"freeze_pruned": True}, {"lam": 0.25}):
        other = dataclasses.replace(this, options=dataclasses.replace(this.options, **change))
        (key,) = change
        assert signature_mismatch(other, record) == (
            f"options.{key} is {getattr(this.options, key)!r} there, {change[key]!r} in this bench"
        )
    assert "protocol" in signature_mismatch(dataclasses.replace(this, protocol="btcv-fs-v3"), record)
    assert "track" in signature_mismatch(dataclasses.replace(this, track="base"), record)


def test_resume_under_other_method_options_is_refused(phantoms, tiny_foundation, tmp_path, monkeypatch):
    """A killed ARENA run resumed with another lambda must not continue under the saved one while run.json shows
    the new one: it is refused, naming the option, and the checkpoint is kept."""
    out = tmp_path / "run"
    first = job(phantoms, tiny_foundation, out, method="arena", organ="spleen", options=AdaptOptions(rank=2))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(pipeline, "evaluate_cases", killed)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_adapt(first)
    assert (out / pipeline.CHECKPOINT_FILE).is_file()
    changed = dataclasses.replace(first, options=AdaptOptions(rank=2, lam=0.05), resume=True)
    with pytest.raises(UserError, match="lam"):
        pipeline.run_adapt(changed)
    assert (out / pipeline.CHECKPOINT_FILE).is_file()
    record = pipeline.run_adapt(dataclasses.replace(first, resume=True))
    assert record.options["lam"] == first.options.lam
    assert json.loads((out / pipeline.RUN_FILE).read_text())["steps_done"] == 2
