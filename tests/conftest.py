"""Shared test set-up: the data directory and one local Ray instance for all Ray tests.

Tests that read the datasets directory (those that use the ``data_dir`` fixture, and those marked
``@pytest.mark.datasets``) are skipped, with the reason, when it does not exist: get the files with
``orderlab data fetch TASK --data-dir DIR`` and set ORDERLAB_DATA=DIR (CI has ../shared/data).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("ORDERLAB_DATA", str(SHARED_DATA))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that use ``data_dir`` ``datasets``; skip every ``datasets`` test when the
    directory is absent, saying why (``-m "not datasets"`` deselects them instead)."""
    data = Path(os.environ["ORDERLAB_DATA"])
    skip = pytest.mark.skip(
        reason=f"needs the datasets directory ORDERLAB_DATA={data}, which does not exist "
        "(orderlab data fetch TASK --data-dir DIR, then ORDERLAB_DATA=DIR)"
    )
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.datasets)
        if "datasets" in item.keywords and not data.is_dir():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real datasets (ORDERLAB_DATA, default ../shared/data)."""
    return Path(os.environ["ORDERLAB_DATA"])


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded local Ray for the whole test run (starting Ray costs ~6 s)."""
    import ray

    from orderlab.sweep import init_ray

    init_ray(None, verbose=False)
    yield ray
    ray.shutdown()
