"""Faults injected for real (no mocks of Ray): worker exit, order-server kill, divergence, driver SIGKILL.

Each guarantee is checked against an uninterrupted run of the same seed: the per-epoch orders must be
identical (sha256 digests of all workers' orders) and the losses equal to float tolerance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import orderlab
from orderlab import results

pytestmark = pytest.mark.ray
TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
EXIT_WORKER = {"epoch": 1, "step": 20, "rank": 1}
KILL_SERVER = {"epoch": 1, "step": 40, "rank": 0}


@pytest.fixture(scope="module")
def recovered(ray_cluster, tmp_path_factory):
    """clean / worker exit / server kill / both, with train.max_failures=2, four trials side by side."""
    storage = tmp_path_factory.mktemp("faults")
    outcome = orderlab.sweep(
        TINY,
        overrides={
            "name": "faults",
            "storage": str(storage),
            "sweep": {},
            "ordering.name": "cd-grab",
            "train.epochs": 3,
            "train.max_failures": 2,  # the trial with both faults fails twice
            "resources.cpus_per_worker": 0.2,
        },
        param_space={
            "faults.exit_worker": [None, EXIT_WORKER],
            "faults.kill_order_server": [None, KILL_SERVER],
        },
    )
    return outcome, storage


def _fault_columns(con):
    return con.sql(
        "SELECT trial_id, json_extract(config_json, '$.faults.exit_worker') IS NOT NULL "
        "AND json_extract(config_json, '$.faults.exit_worker') != 'null' AS worker_exit, "
        "json_extract(config_json, '$.faults.kill_order_server') != 'null' AS server_kill, status FROM trials"
    ).df()


def test_recovered_trials_equal_the_uninterrupted_run(recovered):
    outcome, storage = recovered
    assert (outcome.num_trials, outcome.num_errors) == (4, 0)
    con = results.connect(str(storage))
    trials = _fault_columns(con).set_index("trial_id")
    assert set(trials["status"]) == {"completed"}
    assert sorted(zip(trials["worker_exit"], trials["server_kill"], strict=True)) == [
        (False, False), (False, True), (True, False), (True, True)
    ]  # fmt: skip
    epochs = con.sql(
        "SELECT trial_id, epoch, train_loss, val_loss, order_digest FROM epochs ORDER BY ALL"
    ).df()
    assert len(epochs) == 4 * 3  # one row per (trial, epoch), even after restarts
    clean = trials.index[(~trials["worker_exit"]) & (~trials["server_kill"])][0]
    reference = epochs[epochs["trial_id"] == clean].set_index("epoch")
    for trial_id, run in epochs.groupby("trial_id"):
        run = run.set_index("epoch")
        assert run["order_digest"].tolist() == reference["order_digest"].tolist(), trial_id
        assert run["train_loss"].to_numpy() == pytest.approx(reference["train_loss"].to_numpy(), rel=1e-6)
        assert run["val_loss"].to_numpy() == pytest.approx(reference["val_loss"].to_numpy(), rel=1e-6)
    assert reference["order_digest"].nunique() == 3  # orders really change between epochs


def test_the_faults_really_fired(recovered):
    _, storage = recovered
    trials = _fault_columns(results.connect(str(storage))).set_index("trial_id")
    for trial_id, row in trials.iterrows():
        assert (storage / "_faults" / trial_id / "exit_worker").exists() == row["worker_exit"]
        assert (storage / "_faults" / trial_id / "kill_order_server").exists() == row["server_kill"]


def test_server_death_without_retries_and_divergence_are_recorded_and_the_sweep_goes_on(
    ray_cluster, tmp_path
):
    outcome = orderlab.sweep(
        TINY,
        overrides={
            "name": "fragile",
            "storage": str(tmp_path),
            "sweep": {},
            "ordering.name": "cd-grab",
            "train.epochs": 3,
            "faults.kill_order_server": KILL_SERVER,
        },
        param_space={"train.lr": [0.1, 1.0e38]},  # 1e38: the first step's logits overflow float32
    )
    assert (outcome.num_trials, outcome.num_errors) == (2, 1)
    trials = (
        results.connect(str(tmp_path))
        .sql("SELECT lr, status, error, diverged_epoch FROM trials ORDER BY lr")
        .df()
    )
    killed, diverged = trials.iloc[0], trials.iloc[1]
    assert killed["status"] == "error"
    assert "order server" in killed["error"] and "max_failures" in killed["error"]
    assert diverged["status"] == "diverged" and diverged["diverged_epoch"] == 0
    assert "non-finite" in diverged["error"]
    rows = results.epochs(str(tmp_path))
    assert len(rows) == 1 + 1  # killed: epoch 0 written before the kill; diverged: its one epoch


def test_resume_after_driver_sigkill_keeps_finished_trials(ray_cluster, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    args = [
        sys.executable, "-m", "orderlab", "sweep", TINY, "--set", f"storage={tmp_path}", "--set", "name=resumed",
        "--set", "train.epochs=4", "--set", "sweep.ordering.name=[rr,so,cd-grab]", "--set", "sweep.seed=[0]",
    ]  # fmt: skip
    driver = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    finished = None
    while time.monotonic() < deadline and driver.poll() is None:
        time.sleep(1.0)
        done = results.trials(str(tmp_path), status="completed")
        if len(done):
            finished = done.iloc[0]
            break
    assert finished is not None, "no trial finished before the deadline"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert len(results.trials(str(tmp_path), status="completed")) < 3  # killed mid-sweep

    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    con = results.connect(str(tmp_path))
    trials = con.sql("SELECT trial_id, ordering, status, finished_at FROM trials ORDER BY ordering").df()
    assert trials["ordering"].tolist() == ["cd-grab", "rr", "so"]
    assert set(trials["status"]) == {"completed"}
    kept = trials.set_index("trial_id").loc[finished["trial_id"]]
    assert kept["finished_at"] == finished["finished_at"]  # not rerun
    counts = con.execute(
        "SELECT count(*) AS n, count(DISTINCT (trial_id, epoch)) AS d FROM epochs"
    ).fetchone()
    assert counts == (12, 12)
    parts = sorted(p.parent.parent.name for p in tmp_path.glob("compacted/*/resumed/*.parquet"))
    assert parts == ["epochs", "trials"]  # the resumed sweep's end compacted it


def test_resume_without_a_previous_sweep_is_a_clean_error(ray_cluster, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "orderlab", "sweep", TINY, "--set", f"storage={tmp_path}", "--resume"],
        env={**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--resume" in done.stderr and "without --resume" in done.stderr
