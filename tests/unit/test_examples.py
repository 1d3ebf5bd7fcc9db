"""examples/plain_loop.py and examples/ddp_torchrun.py run as a user runs them, on a prefix of digits.

examples/ray_train_loop.py is a Ray test: tests/ray/test_examples_ray.py.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = ["--num-examples", "300", "--epochs", "2"]
pytestmark = pytest.mark.datasets


def final_losses(output: str) -> dict[str, float]:
    """``final train loss, NAME: LOSS`` lines as {NAME: LOSS}."""
    return {name: float(loss) for name, loss in re.findall(r"final train loss, (.+): ([0-9.]+)", output)}


def run(command: list[str], data_dir: Path) -> str:
    env = {**os.environ, "ORDERLAB_DATA": str(data_dir), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("ordering", ["pair-balance", "grab"])
def test_plain_loop_prints_both_final_losses(data_dir, ordering):
    output = run([sys.executable, str(EXAMPLES / "plain_loop.py"), "--ordering", ordering, *SMALL], data_dir)
    losses = final_losses(output)
    assert list(losses) == [ordering, "random reshuffling"]
    # from 2.3 (ten classes at random) to below 1 in two epochs of 300 examples, either order
    assert all(0 < loss < 1.0 for loss in losses.values()), losses


def test_ddp_example_under_torchrun_with_two_gloo_processes(data_dir):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), str(EXAMPLES / "ddp_torchrun.py"), *SMALL]
    output = run(command, data_dir)
    losses = final_losses(output)
    assert list(losses) == ["cd-grab", "random reshuffling"], output
    assert all(0 < loss < 1.5 for loss in losses.values()), losses
    # 300 examples, 2 ranks, 16 per step: 144 per rank in 9 steps, 12 examples dropped; the ranks
    # exchanged 72 pair differences of 650 float32 per epoch (rank 0 sends its half)
    assert "examples no rank visits (cd-grab): 12" in output
    assert f"{2 * 72 * 650 * 4} bytes sent by rank 0" in output
