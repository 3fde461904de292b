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
