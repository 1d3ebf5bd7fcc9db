"""examples/ray_train_loop.py on the shared local Ray: 2 CPU workers, 300 digits examples, 2 epochs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.datasets]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ray_train_loop.py"


@pytest.fixture
def example(ray_cluster, monkeypatch):
    """The example as a module; examples/ is not importable on the workers, so the loop's module
    goes to them by value (cloudpickle wants it in sys.modules for that)."""
    spec = importlib.util.spec_from_file_location("ray_train_loop_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    ray_cluster.cloudpickle.register_pickle_by_value(module)
    yield module
    ray_cluster.cloudpickle.unregister_pickle_by_value(module)


def test_ray_train_example_keeps_the_sampler_and_prints_both_losses(example, data_dir, tmp_path, capsys):
    argv = ["--num-examples", "300", "--epochs", "2", "--num-workers", "2"]
    losses = example.main([*argv, "--data-dir", str(data_dir), "--storage-path", str(tmp_path)])
    assert list(losses) == ["cd-grab", "random reshuffling"]
    assert all(0 < loss < 1.5 for loss in losses.values()), losses
    assert "final train loss, cd-grab:" in capsys.readouterr().out
