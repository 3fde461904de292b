"""Shared fixtures: where the read-only real data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$ARENASEG_SHARED_DATA`` (default ``<repo>/../shared/data``); skips the test when it is absent."""
    path = Path(os.environ.get("ARENASEG_SHARED_DATA", DEFAULT_SHARED_DATA))
    if not path.is_dir():
        pytest.skip(f"real data not found at {path}: set ARENASEG_SHARED_DATA to the folder holding btcv30/")
    return path


@pytest.fixture(scope="session")
def tiny_foundation(tmp_path_factory) -> Path:
    """A tiny random Swin-UNETR saved as our foundation file, with liver and spleen classes (fast pipeline tests)."""
    import torch

    from arenaseg.models.foundation import save_foundation
    from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr

    torch.manual_seed(0)
    config = ModelConfig.tiny(out_channels=3, class_names=("background", "liver", "spleen"))
    return save_foundation(tmp_path_factory.mktemp("model") / "tiny", build_swin_unetr(config), config)


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """Six small phantom cases in the nnU-Net layout."""
    from arenaseg.data.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("data") / "phantoms", n_cases=6, seed=3, shape=(64, 64, 64))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch) -> None:
    """Tests never write into the user's cache (or beside the read-only shared data)."""
    monkeypatch.setenv("ARENASEG_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One thread: bit-for-bit reproducible CPU kernels (resume tests compare exact tensors), and faster on the
    2-core CI machine than two threads fighting over it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
