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


@pytest.fixture(scope="session")
def deployment(tmp_path_factory):
    """One real deployment on 127.0.0.1 (coordinator + 3 sites) shared by every test that needs processes."""
    from tests.deployment_helpers import SKIP_REASON, start_deployment

    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    dep = start_deployment(tmp_path_factory)
    try:
        yield dep
    finally:
        dep.close()
