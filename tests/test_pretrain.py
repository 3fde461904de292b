"""Pretraining: two torchrun processes stay in lock-step and write once; resume; misconfiguration."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from arenaseg.cli import main
from arenaseg.models.foundation import load_foundation
from arenaseg.train.distributed import init_distributed
from arenaseg.utils.errors import UserError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_identical_weights_saved_once(phantoms, tmp_path):
    out, digests = tmp_path / "model", tmp_path / "digests"
    digests.mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(Path(__file__).with_name("ddp_worker.py")), str(phantoms), str(out), str(digests),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = (digests / "rank0.txt").read_text().split()
    rank1 = (digests / "rank1.txt").read_text().split()
    assert rank0[0] == rank1[0], "DDP ranks ended with different weights"
    assert rank0[1] == str(out.with_suffix(".safetensors")) and rank1[1] == "None"  # only rank 0 writes
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model")) == [
        "model.json",
        "model.md",
        "model.safetensors",
    ]
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["processes"] == 2 and card["classes"] == ["background", "liver", "spleen"]
    model, config = load_foundation(out.with_suffix(".safetensors"))
    assert config.class_names == ("background", "liver", "spleen")


def test_resume_continues_to_the_same_weights(phantoms, tmp_path, monkeypatch):
    common = ["pretrain", "--data", str(phantoms), "--cases", "phantom_0001,phantom_0002", "--organs", "liver",
              "--steps", "3", "--warmup", "1", "--patches-per-step", "1", "--checkpoint-every", "1"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "full")]) == 0

    from arenaseg.data.sampling import PatchSampler

    real = PatchSampler.batch

    def dying(self, step, rank=0):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step, rank)

    monkeypatch.setattr(PatchSampler, "batch", dying)
    assert main([*common, "--out", str(tmp_path / "killed")]) == 130  # Ctrl-C: one line, the state kept
    monkeypatch.setattr(PatchSampler, "batch", real)
    assert not (tmp_path / "killed.safetensors").exists() and (tmp_path / "killed.state.pt").exists()
    assert main([*common, "--out", str(tmp_path / "killed")]) == 2  # refuses to restart silently
    assert main([*common, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "killed.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_of_a_finished_run_is_refused_and_keeps_the_model(phantoms, tmp_path, capsys):
    """A finished run has its weights and no state file: --resume would retrain it from step 0 and overwrite it."""
    args = ["pretrain", "--data", str(phantoms), "--cases", "phantom_0001", "--organs", "liver", "--steps", "1",
            "--warmup", "0", "--patches-per-step", "1", "--out", str(tmp_path / "m")]  # fmt: skip
    assert main(args) == 0
    finished = {p.name: p.read_bytes() for p in tmp_path.glob("m.*")}
    assert "m.safetensors" in finished and "m.state.pt" not in finished
    assert main([*args, "--resume"]) == 2
    assert "m.safetensors is a finished run, there is nothing to resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.glob("m.*")} == finished


def test_bad_pretrain_input(phantoms, tmp_path, capsys):
    base = ["pretrain", "--data", str(phantoms), "--out", str(tmp_path / "m"), "--steps", "1"]
    assert main([*base, "--cases", "phantom_0001", "--organs", "liver,brain"]) == 2
    assert "valid: spleen" in capsys.readouterr().err
    assert main([*base, "--organs", "liver", "--cases", "phantom_0001,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_world_size_without_rendezvous_is_explained(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="torchrun"):
        init_distributed()


def test_init_continues_from_a_previous_model(phantoms, tmp_path, capsys):
    common = ["pretrain", "--data", str(phantoms), "--cases", "phantom_0001,phantom_0002", "--organs", "liver",
              "--steps", "1", "--warmup", "0", "--patches-per-step", "1"]  # fmt: skip
    first = tmp_path / "first"
    assert main([*common, "--out", str(first)]) == 0
    # With a vanishing learning rate, a continued run must end where its init ended, a fresh one where seed 0 began.
    assert (
        main([*common, "--out", str(tmp_path / "continued"), "--init", str(first) + ".safetensors", "--lr", "1e-12"])
        == 0
    )
    assert main([*common, "--out", str(tmp_path / "fresh"), "--lr", "1e-12"]) == 0
    a, b, c = (load_file(tmp_path / f"{n}.safetensors") for n in ("first", "continued", "fresh"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-8
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-5
    card = json.loads((tmp_path / "continued.json").read_text())
    from arenaseg.data.preprocess import file_digest

    assert card["init"]["sha256"] == file_digest(first.with_suffix(".safetensors"))
    assert card["settings"]["init"] == str(first) + ".safetensors"

    other = [*common[:6], "liver,spleen", *common[7:]]
    assert main([*other, "--out", str(tmp_path / "bad"), "--init", str(first) + ".safetensors"]) == 2
    assert "differ from this run's" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_class_balanced_sampling_reaches_small_organs():
    """A 2-voxel organ next to a huge one: class-balanced centres land on it in ~1/4 of patches, pos-neg rarely."""
    import numpy as np

    from arenaseg.data.preprocess import PreprocessSettings, class_balanced_patch_transform
    from arenaseg.data.sampling import PatchSampler

    label = np.zeros((1, 32, 32, 32), dtype=np.float32)
    label[:, :, :, :16] = 1
    label[:, 24:26, 24, 24] = 2
    volume = {"image": np.random.default_rng(0).random(label.shape, dtype=np.float32), "label": label}
    settings = PreprocessSettings(patch_size=(4, 4, 4))

    def small_organ_share(crop) -> float:
        sampler = PatchSampler([volume], settings, 1, seed=0, crop=crop)
        return float(np.mean([(sampler.batch(step)[1] == 2).any().item() for step in range(200)]))

    balanced, pos_neg = small_organ_share(class_balanced_patch_transform(settings, 3)), small_organ_share(None)
    assert 0.15 < balanced < 0.4 and pos_neg < 0.05
