"""--precision: autocast on the forward (and the loss), float32 weights and optimizer states, fp16's loss scaler
checkpointed for an exact resume, a resume under another precision refused, and the record's precision column."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from arenaseg.adapters import AdaptOptions, adapt_model
from arenaseg.bench.grid import result_row
from arenaseg.bench.results import COLUMNS
from arenaseg.data.preprocess import PreprocessSettings
from arenaseg.evaluate.inference import predict_volume
from arenaseg.run_record import RunRecord
from arenaseg.train.loop import TrainSettings, train_adapter
from arenaseg.utils import precision
from arenaseg.utils.errors import UserError


class TinySegmenter(nn.Module):
    """A voxel-wise network with a Swin block's adaptable linear (``blocks.0.attn.qkv``) and the output head at
    ``out.conv.conv``: what adapt_model needs, and fast in fp16 on a CPU (the tiny Swin-UNETR takes ~20 s there)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].attn = nn.Module()
        self.blocks[0].attn.qkv = nn.Linear(1, 8)
        self.out = nn.Module()
        self.out.conv = nn.Module()
        self.out.conv.conv = nn.Conv3d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0].attn.qkv(x.movedim(1, -1)).movedim(-1, 1)
        return self.out.conv.conv(torch.relu(h))


class Killed(Exception):
    pass


class Patches:
    """PatchSampler's interface: a batch that depends only on the step; ``die_at`` simulates a kill."""

    def __init__(self, die_at: int | None = None) -> None:
        self.die_at = die_at

    def batch(self, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if step == self.die_at:
            raise Killed("simulated kill")
        g = torch.Generator().manual_seed(step)
        images = torch.randn(2, 1, 8, 8, 8, generator=g)
        return images, (images > 0.5).float()


def adapted_toy():
    return adapt_model(TinySegmenter(), "arena", AdaptOptions(rank=4, total_steps=4))  # the longest run here


def settings(precision_: str, steps: int = 3) -> TrainSettings:
    return TrainSettings(steps=steps, patches_per_step=2, warmup_steps=1, checkpoint_every=1, precision=precision_)


def output_dtypes(model: nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    model.register_forward_hook(lambda _module, _inputs, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize(("name", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_forward_runs_in_the_precision_and_weights_and_states_stay_float32(tmp_path, name, dtype) -> None:
    adapted = adapted_toy()
    before = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if p.requires_grad}
    seen = output_dtypes(adapted.model)
    result = train_adapter(adapted, Patches(), settings(name), tmp_path / "checkpoint.pt")
    assert seen == [dtype] * 3 and np.isfinite(result.final_loss)
    trained = {n: p for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in adapted.model.parameters())
    assert all(not torch.equal(p, before[n]) for n, p in trained.items()), "a trainable tensor did not move"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    moments = [t for m, u in state["optimizer"]["moments"] for t in (m, u)]
    inner = [t for s in state["optimizer"]["inner"]["state"].values() for t in s.values() if t.numel() > 1]
    assert moments and inner and all(t.dtype == torch.float32 for t in moments + inner)
    assert state["identity"]["train"]["precision"] == name
    assert state["grad_scaler"] == {}  # no loss scaling outside fp16


def test_fp16_trains_with_a_loss_scaler_that_the_checkpoint_keeps_for_an_exact_resume(tmp_path) -> None:
    """fp16 autocast works on this CPU (slowly for real models: see arenaseg.utils.precision), so it is supported:
    its GradScaler's scale is saved, and a killed run resumes to the tensors of an uninterrupted one."""
    precision.check_precision("fp16", torch.device("cpu"))
    full = adapted_toy()
    seen = output_dtypes(full.model)
    train_adapter(full, Patches(), settings("fp16", steps=4), tmp_path / "full.pt")
    assert seen == [torch.float16] * 4
    saved = torch.load(tmp_path / "full.pt", weights_only=True)["grad_scaler"]
    assert saved["scale"] >= 2.0**10  # scaled (initial 2^16, halved only on overflow)

    killed = adapted_toy()
    with pytest.raises(Killed):
        train_adapter(killed, Patches(die_at=2), settings("fp16", steps=4), tmp_path / "killed.pt")
    resumed = adapted_toy()
    train_adapter(resumed, Patches(), settings("fp16", steps=4), tmp_path / "killed.pt")
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert torch.load(tmp_path / "killed.pt", weights_only=True)["grad_scaler"] == saved


def test_a_resume_under_another_precision_is_refused_and_an_older_checkpoint_counts_as_fp32(tmp_path) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(Killed):
        train_adapter(adapted_toy(), Patches(die_at=2), settings("fp32"), checkpoint)
    for other in ("bf16", "fp16"):
        with pytest.raises(UserError, match=f"train.precision is 'fp32' there, '{other}' now"):
            train_adapter(adapted_toy(), Patches(), settings(other), checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    identity = state.pop("identity")  # as a checkpoint written before the identity and --precision existed
    state["settings"], state["options"] = identity["train"], identity["options"]
    del state["settings"]["precision"], state["grad_scaler"]
    torch.save(state, checkpoint)
    assert train_adapter(adapted_toy(), Patches(), settings("fp32"), checkpoint).steps_done == 3


def test_unknown_or_unsupported_precisions_are_user_errors(monkeypatch) -> None:
    with pytest.raises(UserError, match="precision must be one of fp32, bf16, fp16"):
        replace(TrainSettings(), precision="fp8")
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(UserError, match="cannot autocast to bf16 on cpu; use fp32"):
        precision.check_precision("bf16", torch.device("cpu"))
    precision.check_precision("fp32", torch.device("cpu"))  # fp32 needs no autocast


def test_prediction_runs_the_forward_in_the_precision(phantoms) -> None:
    model = TinySegmenter()
    seen = output_dtypes(model)
    image = sorted((phantoms / "imagesTr").glob("*.nii.gz"))[0]
    labels = predict_volume(model, image, PreprocessSettings(), precision="bf16")
    assert seen and set(seen) == {torch.bfloat16}
    reference = predict_volume(model, image, PreprocessSettings())
    assert labels.shape == reference.shape and set(seen[-1:]) == {torch.float32}


def test_results_csv_records_the_precision() -> None:
    train = {"steps": 100, "precision": "bf16"}
    record = RunRecord("arena", "pancreas", 5, 0, "btcv-fs", {"train": train, "preprocess": {}})
    assert "precision" in COLUMNS
    assert result_row(record).precision == "bf16"
    del train["precision"]  # a cell recorded before --precision existed ran in fp32
    assert result_row(record).precision == "fp32"
