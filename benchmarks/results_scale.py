"""Results at scale (issue 22): write time per row, and read time before and after compaction.

Synthetic sweeps of T trials × E epochs on a local root: 4 orderings × T/20 settings (lr) × 5 seeds,
train losses decaying with noise. For each size, the rows go through the real writer as a sweep
writes them (``write_trial``, ``write_epoch`` per epoch, ``write_trial`` and ``consolidate_trial``
at the trial's end); then the root is read in three states:

- row files: one file per (trial, epoch), as while trials run and as roots written before trial
  files existed (the state of the reading before consolidation: it is timed on a copy whose trials
  were not consolidated);
- trial files: one ``epochs.parquet`` per finished trial, as after the trials ended;
- compacted: one part per table (``results.compact``, as at the sweep's end).

In each state: ``connect()``, ``SELECT count(*) FROM epochs``, a grouped query (mean loss by
ordering, lr and epoch), and ``summary()``. With ``--old-reader``, the reader of another commit
(``git show REV:platform/orderlab/results.py``, default main) is timed on the row and trial files.

The largest size (``--large``, 10,000 × 100 by default) is not written through ``write_epoch``
(3 ms a row would be most of an hour): its trial files are written directly with pyarrow, its
trials rows through ``write_trial``, and its write time is extrapolated from the per-row time of
the largest written size.

    python benchmarks/results_scale.py                     # 100×20, 500×40, then 10,000×100 (~15 min)
    python benchmarks/results_scale.py --old-reader main   # and the reader of main
    python benchmarks/results_scale.py --quick             # 20×5 and 40×10, no large size (~20 s)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import fmt, machine_line, markdown_table

from orderlab import results

ORDERINGS = ("rr", "so", "grab", "cd-grab")
SEEDS = 5
GROUPED = (
    "SELECT t.ordering, t.lr, e.epoch, avg(e.train_loss) AS loss FROM epochs e "
    "JOIN trials t USING (sweep, trial_id) GROUP BY ALL"
)


def trial_rows(num_trials: int) -> list[dict[str, Any]]:
    """The trials rows of a synthetic sweep: 4 orderings × num_trials / 20 lrs × 5 seeds."""
    settings = max(1, num_trials // (len(ORDERINGS) * SEEDS))
    rows = []
    for i in range(num_trials):
        ordering, setting, seed = ORDERINGS[i % 4], (i // 4) % settings, i // (4 * settings)
        rows.append(
            {
                "trial_id": f"t{i:06d}", "sweep": "scale", "task": "synthetic", "ordering": ordering,
                "unit": "example", "num_workers": 4, "batch_size": 64, "optimizer": "sgd",
                "lr": 0.01 * (1 + setting), "lr_schedule": "constant", "momentum": 0.0,
                "weight_decay": 0.0, "seed": seed, "backend": "simulated", "status": "running",
            }
        )  # fmt: skip
    return rows


def epoch_rows(trial: dict[str, Any], num_epochs: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """One trial's epoch rows: a decaying loss with noise, timings, a digest."""
    rate = 0.05 + 0.01 * ORDERINGS.index(trial["ordering"])
    noise = rng.normal(0.0, 0.01, num_epochs)
    return [
        {
            "trial_id": trial["trial_id"], "sweep": "scale", "epoch": epoch,
            "train_loss": float(np.exp(-rate * epoch) + noise[epoch]), "val_loss": 1.0, "val_metric": 0.9,
            "val_metric_name": "accuracy", "lr": trial["lr"], "epoch_seconds": float(1.0 + rng.random()),
            "compute_seconds": 0.8, "allreduce_seconds": 0.1, "order_wait_seconds": 0.01,
            "send_wait_seconds": 0.0, "bytes_to_server": 1024, "herding": None, "order_digest": "0" * 64,
        }
        for epoch in range(num_epochs)
    ]  # fmt: skip


def write_through_writer(root: str, num_trials: int, num_epochs: int, consolidate: bool) -> dict[str, float]:
    """Write the sweep as ``run_trial`` does; seconds per epoch row and per trial consolidation."""
    rng = np.random.default_rng(0)
    writing = merging = 0.0
    for trial in trial_rows(num_trials):
        rows = epoch_rows(trial, num_epochs, rng)
        started = time.perf_counter()
        results.write_trial(root, trial)
        for row in rows:
            results.write_epoch(root, row)
        results.write_trial(root, {**trial, "status": "completed"})
        writing += time.perf_counter() - started
        if consolidate:
            started = time.perf_counter()
            results.consolidate_trial(root, "scale", trial["trial_id"])
            merging += time.perf_counter() - started
    return {
        "row_ms": writing / (num_trials * (num_epochs + 2)) * 1e3,
        "consolidate_ms": merging / num_trials * 1e3,
    }


def write_trial_files(root: str, num_trials: int, num_epochs: int) -> None:
    """The large size: trials rows through ``write_trial``, each trial's epochs as its trial file."""
    rng = np.random.default_rng(0)
    for trial in trial_rows(num_trials):
        results.write_trial(root, {**trial, "status": "completed"})
        rows = epoch_rows(trial, num_epochs, rng)
        directory = Path(root) / "epochs" / "scale" / trial["trial_id"]
        directory.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows, schema=results.EPOCHS_SCHEMA)
        pq.write_table(table, directory / results.TRIAL_EPOCHS_FILE)


def timed(function: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def read_times(reader: ModuleType, root: str) -> list[str]:
    """connect, count(*), the grouped query and summary() in seconds, and the row count."""
    connect_s, con = timed(lambda: reader.connect(root))
    count_s, count = timed(lambda: con.sql("SELECT count(*) FROM epochs").fetchall()[0][0])
    grouped_s, _ = timed(lambda: con.sql(GROUPED).fetchall())
    summary_s, summary = timed(lambda: reader.summary(root))
    assert len(summary) == 4 * max(1, len(reader.trials(root)) // 20)
    return [
        fmt(connect_s),
        fmt(count_s),
        fmt(connect_s + count_s),
        fmt(grouped_s),
        fmt(summary_s),
        str(count),
    ]


def old_reader(revision: str) -> ModuleType | None:
    """The results module of ``revision`` (another commit), or None when git cannot show it."""
    here = Path(__file__).resolve().parents[1]
    shown = subprocess.run(
        ["git", "-C", str(here), "show", f"{revision}:platform/orderlab/results.py"],
        capture_output=True,
        text=True,
        check=False,
    )
    if shown.returncode != 0:
        return None
    path = Path(tempfile.mkdtemp()) / "results_old.py"
    path.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("results_old", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count_files(root: str) -> int:
    return sum(1 for _ in Path(root).rglob("*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100x20,500x40", help="written sizes, TRIALSxEPOCHS,...")
    parser.add_argument("--large", default="10000x100", help="trial files written directly ('' for none)")
    parser.add_argument("--old-reader", default=None, metavar="REV", help="also time the reader of REV")
    parser.add_argument("--quick", action="store_true", help="20x5 and 40x10, no large size")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.large = "20x5,40x10", ""
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="results-scale-"))
    old = old_reader(args.old_reader) if args.old_reader else None
    print(f"machine: {machine_line()}")
    header = ["trials × epochs", "state", "reader", "files", "connect s", "count s", "connect + count s"]
    header += ["grouped s", "summary s", "rows"]
    table, writes = [], []
    for num_trials, num_epochs in sizes:
        label = f"{num_trials} × {num_epochs}"
        rows_root, root = str(scratch / f"{label}-rows"), str(scratch / f"{label}-trials")
        write_through_writer(rows_root, num_trials, num_epochs, consolidate=False)
        cost = write_through_writer(root, num_trials, num_epochs, consolidate=True)
        writes.append([label, fmt(cost["row_ms"]), fmt(cost["consolidate_ms"])])
        states = [("row files", rows_root), ("trial files", root)]
        for state, where in states:
            for name, reader in [("this", results), *([("old", old)] if old else [])]:
                table.append([label, state, name, str(count_files(where)), *read_times(reader, where)])
        compact_s, _ = timed(lambda root=root: results.compact(root))
        writes[-1].append(fmt(compact_s))
        table.append([label, "compacted", "this", str(count_files(root)), *read_times(results, root)])
        print(markdown_table(header, table[-3 - 2 * bool(old) :]), flush=True)
    if args.large:
        num_trials, num_epochs = (int(v) for v in args.large.split("x"))
        label, root = f"{num_trials} × {num_epochs}", str(scratch / "large")
        write_s, _ = timed(lambda: write_trial_files(root, num_trials, num_epochs))
        table.append([label, "trial files", "this", str(count_files(root)), *read_times(results, root)])
        compact_s, _ = timed(lambda: results.compact(root))
        table.append([label, "compacted", "this", str(count_files(root)), *read_times(results, root)])
        row_ms = float(writes[-1][1]) if writes else float("nan")
        extrapolated = row_ms * num_trials * (num_epochs + 2) / 1e3
        writes.append([f"{label} (trial files written directly: {write_s:.0f} s)", "-", "-", fmt(compact_s)])
        print(f"\n{label}: writing through write_epoch at {row_ms:.2f} ms a row would take about "
              f"{extrapolated / 60:.0f} min (extrapolated from the largest written size)")  # fmt: skip
    print(
        "\nWrites (ms per row: write_epoch, with the trial's two write_trial calls spread over its rows):\n"
    )
    print(markdown_table(["trials × epochs", "ms per row", "consolidate ms per trial", "compact s"], writes))
    print(f"\nAll reads:\n\n{markdown_table(header, table)}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
