"""Atomic results: a writer killed mid-write leaves only whole Parquet files behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from orderlab import results

WRITER = textwrap.dedent(
    """
    import sys
    from orderlab import results
    root = sys.argv[1]
    epoch = 0
    while True:
        for trial in range(4):  # several "trials" write side by side, each its own files
            results.write_epoch(root, {"trial_id": f"t{trial}", "sweep": "s", "epoch": epoch,
                                       "train_loss": 1.0 / (epoch + 1), "order_digest": "x" * 64})
        epoch += 1
    """
)


def test_killed_writer_leaves_a_readable_table(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(tmp_path.rglob("*.parquet"))) < 40:
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    whole = list(tmp_path.rglob("*.parquet"))
    assert len(whole) >= 40
    rows = results.epochs(str(tmp_path))  # reads every file: none may be partial
    assert len(rows) == len(whole)
    assert rows.groupby(["trial_id", "epoch"]).size().max() == 1
    for trial_id, run in rows.groupby("trial_id"):
        epochs = sorted(run["epoch"])
        assert epochs == list(range(len(epochs))), trial_id  # each trial's files are contiguous
        assert run.set_index("epoch")["train_loss"].to_dict() == {e: 1.0 / (e + 1) for e in epochs}


COMPACTOR = "import sys; from orderlab import results; print(flush=True); results.compact(sys.argv[1])"


def test_killed_compaction_leaves_every_row_once(tmp_path):
    root = str(tmp_path)
    for trial in range(30):
        results.write_trial(root, {"trial_id": f"t{trial:02d}", "sweep": "s", "status": "completed"})
        for epoch in range(20):
            results.write_epoch(root, {"trial_id": f"t{trial:02d}", "sweep": "s", "epoch": epoch,
                                       "train_loss": trial + epoch / 100})  # fmt: skip
        if trial % 2:
            results.consolidate_trial(root, "s", f"t{trial:02d}")
    expected = results.epochs(root)
    assert len(expected) == 600
    states = set()
    # Kills while reading (after a delay) and right after a new part appears (while removing inputs).
    for delay in (0.05, None, 0.3, None):
        compactor = subprocess.Popen([sys.executable, "-c", COMPACTOR, root], stdout=subprocess.PIPE)
        compactor.stdout.readline()  # imported, about to compact
        parts = set(tmp_path.glob("compacted/epochs/s/*.parquet"))
        if delay is None:
            deadline = time.monotonic() + 60
            while (
                not set(tmp_path.glob("compacted/epochs/s/*.parquet")) - parts and time.monotonic() < deadline
            ):
                time.sleep(0.001)
        else:
            time.sleep(delay)
        compactor.send_signal(signal.SIGKILL)
        compactor.wait()
        has_parts = any(tmp_path.glob("compacted/epochs/s/*.parquet"))
        states.add((has_parts, any(tmp_path.glob("epochs/s/*/*.parquet"))))
        assert results.epochs(root).equals(expected)
        assert len(results.trials(root)) == 30
    assert (True, True) in states  # at least one kill between writing a part and removing its inputs
    results.compact(root)
    assert results.epochs(root).equals(expected)
    assert [p.parent.name for p in tmp_path.rglob("*.parquet")] == ["s", "s"]  # one part per table
