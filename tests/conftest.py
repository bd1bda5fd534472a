"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real datasets live next to the repository (never inside it): ../shared/data.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (the real datasets), or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not found: the real datasets are only present on developer machines and CI")
    return SHARED_DATA
