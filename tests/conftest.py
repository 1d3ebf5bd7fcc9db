"""Shared test set-up: the data directory and one local Ray instance for all Ray tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("ORDERLAB_DATA", str(SHARED_DATA))


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
