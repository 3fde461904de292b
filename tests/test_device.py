"""Device choice: `auto` falls back to the CPU, an absent GPU is an error (never a silent CPU run)."""

from __future__ import annotations

import pytest
import torch

from arenaseg.cli import main
from arenaseg.utils.device import device_kind, resolve_device
from arenaseg.utils.provenance import device_name


def test_auto_and_cpu_resolve_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA GPU here"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="sees no CUDA GPU here"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("bad", ["gpu", "tpu", "mps", "cuda:x"])
def test_unknown_devices_are_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(bad)


def test_device_kind_reads_names_and_devices():
    assert device_kind(device_name(torch.device("cpu"))) == "cpu"
    assert device_kind(torch.device("cpu")) == "cpu"
    assert device_kind(torch.device("cuda")) == "gpu"
    assert device_kind("NVIDIA H100 80GB HBM3") == "gpu"
    assert device_kind(None) == device_kind("") == "unknown"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_adapt_on_a_missing_gpu_fails_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["adapt", "--data", str(tmp_path), "--organ", "liver", "--shots", "1", "--method", "lp", "--out", str(out)]
    assert main([*argv, "--device", "cuda"]) == 2
    assert "device 'cuda' asked for, but torch sees no CUDA GPU here" in capsys.readouterr().err
    assert not out.exists()
