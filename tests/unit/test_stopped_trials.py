"""sweep.StoppedTrials: a scheduler's stop is the trials row's record, whichever write comes last.

A Ray Train trial's workers go on training while Tune decides to stop it, so the trial's own final
write ('completed' or 'error') can land before or after the stop; these replay both orders on a real
results root. The trial objects stand in for Tune's ``Trial`` (its id, config and last result).
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from orderlab import results
from orderlab.sweep import StoppedTrials

EPOCHS = 4
STARTED = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def write_row(root: str, trial_id: str, status: str) -> None:
    results.write_trial(
        root,
        {"trial_id": trial_id, "sweep": "s", "ordering": "cd-grab", "status": status, "started_at": STARTED},
    )


def tune_trial(trial_id: str, epochs_done: int | None) -> SimpleNamespace:
    last = (
        {}
        if epochs_done is None
        else {"epoch": epochs_done - 1, "epochs_done": epochs_done, "train_loss": 2.5}
    )
    return SimpleNamespace(trial_id=trial_id, config={"train.lr": 1e-4}, last_result=last)


@pytest.fixture
def callback(tmp_path) -> StoppedTrials:
    return StoppedTrials(str(tmp_path), "s", "asha", "train_loss", lambda point: EPOCHS)


@pytest.mark.parametrize("status", ["running", "error", "completed"])
def test_a_stop_after_epoch_0_rewrites_the_trials_own_status(callback, status):
    write_row(callback.root, "t", status)
    callback.on_trial_complete(1, [], tune_trial("t", epochs_done=1))
    row = results.read_trial(callback.root, "s", "t")
    assert row["status"] == "stopped" and row["stopped_epoch"] == 0
    assert row["error"] == "stopped by the asha scheduler after epoch 0: train_loss=2.5"
    assert row["wall_seconds"] == (row["finished_at"] - STARTED).total_seconds() > 0


def test_the_trials_last_write_crossing_the_stop_is_undone_at_the_sweeps_end(callback):
    write_row(callback.root, "t", "running")
    callback.on_trial_complete(1, [], tune_trial("t", epochs_done=2))
    stop = results.read_trial(callback.root, "s", "t")
    write_row(callback.root, "t", "completed")  # its workers finished while the stop was written
    callback.on_experiment_end([])
    row = results.read_trial(callback.root, "s", "t")
    assert (row["status"], row["stopped_epoch"], row["error"]) == ("stopped", 1, stop["error"])
    assert row["finished_at"] == stop["finished_at"]


@pytest.mark.parametrize(
    ("status", "epochs_done"),
    [("completed", EPOCHS), ("diverged", 2), ("completed", None), ("error", EPOCHS)],
    ids=["ran-every-epoch", "diverged", "never-reported", "failed-in-its-last-report"],
)
def test_trials_that_ended_on_their_own_keep_their_row(callback, status, epochs_done):
    write_row(callback.root, "t", status)
    before = results.read_trial(callback.root, "s", "t")
    callback.on_trial_complete(1, [], tune_trial("t", epochs_done))
    callback.on_experiment_end([])
    assert results.read_trial(callback.root, "s", "t") == before
