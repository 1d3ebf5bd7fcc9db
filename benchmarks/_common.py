"""Helpers shared by the benchmark scripts: the machine line, medians, markdown tables, the plain rule.

Each script runs standalone (``python benchmarks/<name>.py``); Python puts the script's folder on
``sys.path``, so they import this module as ``_common``.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def machine_line() -> str:
    """One line naming the machine: CPU model, cores, memory, load, Python and torch/numpy versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import numpy
    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, load average {load:.1f} at start; "
        f"Python {platform.python_version()}, numpy {numpy.__version__}, torch {torch.__version__}; "
        f"orderlab at {git_state()}"
    )


def git_state() -> str:
    """The checkout's commit, with ``+changes`` when files differ from it (or 'unknown')."""
    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(
        ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{commit or 'unknown'}{' +changes' if dirty else ''}"


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (nan when empty)."""
    return statistics.median(values) if values else float("nan")


def timed(function: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``function``."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def fmt(value: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, thousands separated when large; '-' for nan."""
    if value != value:  # nan
        return "-"
    if abs(value) >= 10**digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_sizes(text: str) -> list[int]:
    """``"1e4,1e5"`` -> ``[10000, 100000]``."""
    return [int(float(part)) for part in text.split(",") if part.strip()]


def plain_balance(
    running_sum: np.ndarray, arrays: Sequence[np.ndarray], signs: np.ndarray | None = None
) -> None:
    """The plain per-vector rule the benchmarks compare against, on float32 numpy arrays: row j of every
    array in turn, ``if r @ v < 0: r += v else: r -= v``; ε = +1 goes to ``signs[j, a]`` when given."""
    for j in range(len(arrays[0])):
        for a, array in enumerate(arrays):
            vector = array[j]
            positive = running_sum @ vector < 0
            if positive:
                running_sum += vector
            else:
                running_sum -= vector
            if signs is not None:
                signs[j, a] = positive
