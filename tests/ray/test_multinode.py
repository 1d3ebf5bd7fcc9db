"""A real two-node Ray cluster on this machine (cluster/local.sh): a sweep submitted to it as a Ray Job
with `orderlab submit`, and the proof that one trial's workers ran on both nodes; and a Ray Train
sweep whose driver joins the cluster with `orderlab sweep --address`, with ASHA stopping a trial.

The client side runs in subprocesses, so this test process never connects to the second cluster
(the session's shared Ray of tests/conftest.py may be active at the same time). Teardown stops only
the nodes local.sh started (never `ray stop`, which would stop every Ray instance on the machine).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from orderlab import results
from orderlab.source import source_commit

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
LOCAL_SH = ROOT / "cluster" / "local.sh"
TINY = ROOT / "configs" / "tiny.yaml"


@dataclass(frozen=True)
class LocalCluster:
    address: str  # the Jobs API
    gcs_address: str  # what a driver joins (`orderlab sweep --address`)
    env: dict[str, str]  # for clients: no RAY_ADDRESS pointing elsewhere, token authentication on


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def local_cluster():
    """Head (1 CPU) + one node (1 CPU), each its own `ray start` with its own ports and temp dir."""
    # Not tmp_path: Ray's socket paths live under the state dir and must stay under 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="olmn-", dir="/tmp" if Path("/tmp").is_dir() else None))
    dashboard_port, ray_port = unused_port(), unused_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    env.update(
        ORDERLAB_CLUSTER_DIR=str(state),
        ORDERLAB_RAY_PORT=str(ray_port),
        ORDERLAB_DASHBOARD_PORT=str(dashboard_port),
        ORDERLAB_HEAD_CPUS="1",
        ORDERLAB_NODE_CPUS="1",
        RAY_AUTH_MODE="token",  # local.sh turns it on for the nodes; a joining driver needs it too
    )
    try:
        up = subprocess.run([str(LOCAL_SH), "up", "1"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        yield LocalCluster(
            address=f"http://127.0.0.1:{dashboard_port}", gcs_address=f"127.0.0.1:{ray_port}", env=env
        )
    finally:
        subprocess.run([str(LOCAL_SH), "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def orderlab_cli(cluster: LocalCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orderlab", *args],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submitted_sweep_spreads_each_trial_over_both_nodes(local_cluster, tmp_path):
    storage = tmp_path / "results"  # one directory both nodes see: they share this machine
    # Two trials at once fit: per node at most one worker of each trial (2 × 0.45 CPU) plus the
    # trial functions (2 × 0.05); STRICT_SPREAD puts a trial's two workers on different nodes.
    submitted = orderlab_cli(
        local_cluster,
        "submit", str(TINY), "--address", local_cluster.address,
        "--set", f"storage={storage}",
        "--set", "resources.placement_strategy=STRICT_SPREAD",
        "--set", "resources.cpus_per_worker=0.45",
        "--set", "resources.trial_cpus=0.05",
        timeout=600,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    job_id = re.search(r"^job (\S+) submitted to ", submitted.stdout, re.MULTILINE).group(1)
    assert f"job {job_id} SUCCEEDED" in submitted.stdout

    status = orderlab_cli(local_cluster, "submit", "--status", job_id, "--address", local_cluster.address)
    assert (status.returncode, status.stdout.strip()) == (0, "SUCCEEDED"), status.stderr
    logs = orderlab_cli(local_cluster, "submit", "--logs", job_id, "--address", local_cluster.address)
    assert logs.returncode == 0 and "sweep tiny: 2 trials, 0 errors" in logs.stdout, logs.stderr

    trials = (
        results.connect(str(storage))
        .sql(
            "SELECT ordering, status, worker_node_ids, server_node_id, git_commit FROM trials ORDER BY ordering"
        )
        .df()
    )
    assert trials["ordering"].tolist() == ["cd-grab", "rr"]
    assert set(trials["status"]) == {"completed"}
    assert set(trials["git_commit"]) == {source_commit()}  # the staged copy's, though it is no checkout
    all_nodes: set[str] = set()
    for worker_node_ids, server_node_id in zip(
        trials["worker_node_ids"], trials["server_node_id"], strict=True
    ):
        assert len(worker_node_ids) == 2 and len(set(worker_node_ids)) == 2, worker_node_ids
        all_nodes |= set(worker_node_ids)
        assert server_node_id in worker_node_ids  # an order server lives on one of the two nodes
    assert len(all_nodes) == 2

    epochs = results.connect(str(storage)).sql("SELECT trial_id, count(*) AS n FROM epochs GROUP BY ALL").df()
    assert epochs["n"].tolist() == [2, 2]
    assert (storage / "_tune" / "tiny").is_dir()  # Tune's experiment state
    assert len(list((storage / "_train" / "tiny").rglob("checkpoint.pt"))) >= 2  # Train's checkpoints


def test_status_of_an_unknown_job_names_it_and_the_fix(local_cluster):
    result = orderlab_cli(
        local_cluster, "submit", "--status", "no-such-job", "--address", local_cluster.address
    )
    assert result.returncode == 2
    assert "no-such-job" in result.stderr and local_cluster.address in result.stderr
    assert "ray job list" in result.stderr and "Traceback" not in result.stderr


def test_sweep_joined_with_address_runs_ray_train_trials_that_asha_stops(local_cluster, tmp_path):
    storage = tmp_path / "results"
    # One trial at a time, in grid order: lr 0.5 reaches ASHA's rung (epoch 1 of 2) first and sets
    # the cutoff; lr 1e-4 has barely moved from its initial loss there, so ASHA stops it.
    swept = orderlab_cli(
        local_cluster,
        "sweep", str(TINY), "--address", local_cluster.gcs_address, "--quiet",
        "--set", f"storage={storage}",
        "--set", "sweep={ordering.name: [cd-grab], train.lr: [0.5, 1.0e-4]}",
        "--set", "sweep.scheduler={name: asha, grace_period: 1, reduction_factor: 2}",
        "--set", "tracking=[tensorboard]",
        "--set", "resources.max_concurrent_trials=1",
        "--set", "resources.placement_strategy=STRICT_SPREAD",  # only the two-node cluster has room
        "--set", "resources.cpus_per_worker=0.45",
        "--set", "resources.trial_cpus=0.05",
        timeout=600,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stdout[-4000:] + swept.stderr[-4000:]
    assert "sweep tiny: 2 trials, 0 errors, 1 stopped early" in swept.stdout

    trials = results.trials(str(storage), sweep="tiny").sort_values("lr", ascending=False)
    assert trials["backend"].tolist() == ["ray-train", "ray-train"]
    assert len(set(trials["worker_node_ids"].iloc[0])) == 2  # the completed trial ran on the cluster
    assert trials["status"].tolist() == ["completed", "stopped"]
    assert trials["stopped_epoch"].tolist()[1] == 0
    assert trials["error"].tolist()[1].startswith("stopped by the asha scheduler after epoch 0: train_loss=")
    epochs = results.epochs(str(storage), sweep="tiny")
    rows = epochs.groupby("trial_id")["epoch"].apply(sorted).to_dict()
    completed, stopped = (rows[t] for t in trials["trial_id"])
    assert completed == [0, 1]
    # the stopped trial's epoch-0 row stays; its Ray Train workers may have trained epoch 1 while
    # Tune decided (StoppedTrials keeps the row 'stopped' either way)
    assert stopped in ([0], [0, 1])
    assert len(list(storage.rglob("events.out.tfevents.*"))) >= 2  # one TensorBoard run per trial
