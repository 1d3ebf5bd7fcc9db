"""benchmarks/results_scale.py --quick: every state read back with the same row count, and summaries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "results_scale.py"


def test_quick_results_scale_reads_every_state(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reads = done.stdout.split("All reads:")[1]
    rows = [line.split("|")[1:-1] for line in reads.splitlines() if line.startswith("| 20 ×")]
    assert [(r[1].strip(), r[-1].strip()) for r in rows] == [
        ("row files", "100"),
        ("trial files", "100"),
        ("compacted", "100"),
    ]
    assert [int(r[3]) for r in rows] == [20 * 5 + 20, 20 + 20, 2]  # files in each state
