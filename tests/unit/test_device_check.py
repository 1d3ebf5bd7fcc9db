"""benchmarks/device_check.py --quick on this machine: the CUDA parts skipped with the reason, the
rest measured, and what it writes readable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "device_check.py"


@pytest.mark.datasets  # the LeNet trial reads Fashion-MNIST
def test_the_quick_device_check_writes_its_tables_and_numbers(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "device_check.json").read_text())
    sections = report["sections"]
    failed = {
        name: entry.get("traceback", entry["status"])
        for name, entry in sections.items()
        if entry["status"] != "ok"
    }
    assert not failed
    assert list(sections) == ["cuda_tests", "equal_orders", "throughput", "lenet_trial", "server_capacity"]
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in sections["cuda_tests"]["results"]["skipped"]
    orders = sections["equal_orders"]["results"]
    assert {(row["ordering"], row["payload"]) for row in orders} == {
        (name, payload)
        for name in ("grab", "pair-balance", "cd-grab")
        for payload in ("torch.float32", "torch.bfloat16")
    }
    assert all(row["equal_orders"] and row["max_sum_difference"] == 0.0 for row in orders)
    rates = sections["throughput"]["results"]
    assert "numpy loop" in rates and "CPU kernel, 1 thread" in rates
    assert all(rate > 0 for by_dim in rates.values() for rate in by_dim.values())
    trial = sections["lenet_trial"]["results"]["cpu"]
    assert (
        trial["status"] == "completed" and len(trial["train_loss"]) == 1 and 0 < trial["train_loss"][0] < 10
    )
    assert all(
        rate > 0
        for by_threads in sections["server_capacity"]["results"].values()
        for rate in by_threads.values()
    )
    markdown = (tmp_path / "device_check.md").read_text()
    for title in (
        "Tests marked cuda",
        "Orders: GPU against CPU",
        "Balancing throughput",
        "LeNet",
        "order server",
    ):
        assert title in markdown
    assert "| numpy loop |" in markdown
