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


def pytest_configure(config) -> None:
    # the marker pytest-xdist's --dist loadgroup reads; registered here too so a plain `pytest` never warns
    config.addinivalue_line("markers", "xdist_group(name): run on the same pytest-xdist worker as its group")


def pytest_collection_modifyitems(items) -> None:
    """Keep each test file on one worker under `pytest -n 2 --dist loadgroup` (its module fixtures are built once),
    and every test that uses the real deployment on the same worker (it is started once per worker: ~40 s)."""
    for item in items:
        group = "deployment" if "deployment" in getattr(item, "fixturenames", ()) else item.path.stem
        item.add_marker(pytest.mark.xdist_group(group))
