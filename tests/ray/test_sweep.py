"""Ray integration: a 2-trial sweep of 2-worker trials, and the CLI end to end, on one shared Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from ray import tune

import orderlab
from orderlab import results
from orderlab.errors import OrderlabError
from orderlab.messaging import message_transport
from orderlab.orderings import OrderingSpec
from orderlab.server import RemoteOrderServer
from orderlab.tasks import resolve_data_dir

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


SWEEP_OVERRIDES = {
    "train.epochs": 3,
    "sweep": {},
    "metrics.herding": True,
    "ordering.payload_dtype": "float16",
    "ordering.sketch_dim": 64,
}


@pytest.fixture(scope="module")
def two_trial_sweep(ray_cluster, tmp_path_factory):
    """rr and cd-grab; cd-grab's workers share the server's node, so they send through shared memory."""
    storage = tmp_path_factory.mktemp("sweep")
    outcome = orderlab.sweep(
        str(TINY),
        overrides={**SWEEP_OVERRIDES, "storage": str(storage), "ordering.transport": "shared_memory"},
        param_space={"ordering.name": tune.grid_search(["rr", "cd-grab"]), "seed": [0]},
    )
    return outcome, storage


def test_sweep_writes_one_row_per_trial_and_epoch(two_trial_sweep):
    outcome, storage = two_trial_sweep
    assert (outcome.num_trials, outcome.num_errors) == (2, 0)
    con = results.connect(str(storage))
    trials = con.sql(
        "SELECT ordering, status, num_workers, shard_size, num_dropped, test_metrics FROM trials ORDER BY ordering"
    ).df()
    assert trials["test_metrics"].isna().all()  # digits has no test set beyond validation
    assert trials["ordering"].tolist() == ["cd-grab", "rr"]
    assert set(trials["status"]) == {"completed"}
    # digits: 1437 train examples, 2 workers × 8 per step -> 89 steps × 8 = 712 per shard, 13 dropped
    assert trials["shard_size"].tolist() == [712, 712]
    assert trials["num_dropped"].tolist() == [13, 13]
    nodes = con.sql("SELECT worker_node_ids, server_node_id FROM trials").df()
    for worker_node_ids, server_node_id in zip(
        nodes["worker_node_ids"], nodes["server_node_id"], strict=True
    ):
        assert len(worker_node_ids) == 2 and all(worker_node_ids) and server_node_id
    counts = con.sql(
        "SELECT trial_id, count(*) AS n, count(DISTINCT epoch) AS d FROM epochs GROUP BY ALL"
    ).df()
    assert counts["n"].tolist() == [3, 3] and counts["d"].tolist() == [3, 3]


def test_training_learns_and_only_gradient_orderings_talk_to_the_server(two_trial_sweep):
    _, storage = two_trial_sweep
    rows = (
        results.connect(str(storage))
        .sql(
            "SELECT ordering, epoch, train_loss, val_metric, bytes_to_server, epoch_seconds, compute_seconds, "
            "allreduce_seconds, order_wait_seconds, send_wait_seconds FROM epochs JOIN trials USING (trial_id, sweep) ORDER BY ALL"
        )
        .df()
    )
    for _ordering, curve in rows.groupby("ordering"):
        losses = curve["train_loss"].tolist()
        assert losses[-1] < losses[0] < 2.31  # below log(10): it learns
        assert curve["val_metric"].iloc[-1] > 0.8
        parts = curve[
            ["compute_seconds", "allreduce_seconds", "order_wait_seconds", "send_wait_seconds"]
        ].sum(axis=1)
        assert (parts <= curve["epoch_seconds"] * 1.05 + 1e-3).all()
    herding = results.connect(str(storage)).sql("SELECT herding FROM epochs").df()["herding"]
    assert herding.notna().all() and (herding > 0).all()  # metrics.herding: measured every epoch
    sent = rows.groupby("ordering")["bytes_to_server"].max()
    # cd-grab: 2 workers × 356 pairs × a 64-dim sketch in float16 per epoch (exact float32: 650 × 4 B); rr nothing
    assert sent["cd-grab"] == 2 * 356 * 64 * 2
    assert sent["rr"] == 0


def test_ray_calls_and_shared_memory_give_the_same_trial(two_trial_sweep, tmp_path):
    _, storage = two_trial_sweep
    outcome = orderlab.sweep(
        str(TINY),
        overrides={
            **SWEEP_OVERRIDES,
            "storage": str(tmp_path),
            "train.epochs": 2,
            "ordering.name": "cd-grab",
            "ordering.transport": "ray",
        },
    )
    assert outcome.num_errors == 0
    query = (
        "SELECT epoch, order_digest, train_loss, bytes_to_server FROM epochs JOIN trials USING (trial_id, sweep) "
        "WHERE ordering = 'cd-grab' AND epoch < 2 ORDER BY epoch"
    )
    shared_memory = results.connect(str(storage)).sql(query).df()
    ray_calls = results.connect(str(tmp_path)).sql(query).df()
    assert shared_memory.to_dict("list") == ray_calls.to_dict("list")
    assert shared_memory["order_digest"].nunique() == 2


def test_transport_follows_the_node_and_the_device(ray_cluster):
    server = RemoteOrderServer.remote("cd-grab", OrderingSpec(num_workers=1, shard_size=4, dim=3))
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert message_transport("auto", server, cpu) == "shared_memory"  # this process shares its node
    assert message_transport("auto", server, gpu) == "ray"
    assert message_transport("ray", server, cpu) == "ray"
    with pytest.raises(OrderlabError, match="ordering.transport: shared_memory needs CPU workers"):
        message_transport("shared_memory", server, gpu)
    ray.kill(server)


def test_transport_off_linux_is_ray_calls(monkeypatch):
    """The rings are Linux's (posix_fallocate, MADV_POPULATE_WRITE, FIFOs opened read-write): elsewhere
    ``auto`` sends through Ray calls, and ``shared_memory`` is refused before any Ray call."""
    monkeypatch.setattr(sys, "platform", "darwin")
    cpu = torch.device("cpu")
    assert message_transport("auto", None, cpu) == "ray"
    with pytest.raises(OrderlabError, match="shared_memory needs Linux .*darwin.*use auto or ray"):
        message_transport("shared_memory", None, cpu)


def test_summary_compares_against_the_baseline(two_trial_sweep):
    outcome, _ = two_trial_sweep
    summary = outcome.summary.set_index("ordering")
    assert set(summary.index) == {"rr", "cd-grab"}
    assert summary.loc["rr", "epochs_to_baseline"] == 3  # the baseline reaches its own final loss at the end
    assert summary.loc["rr", "num_seeds"] == 1


def test_cli_run_end_to_end_and_sql(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address}
    storage = "cli"  # relative to the command's directory, as a user writes it; trials run elsewhere
    cli = [sys.executable, "-m", "orderlab"]
    run = subprocess.run(
        [
            *cli,
            "run",
            str(TINY),
            "--set",
            f"storage={storage}",
            "--set",  # relative paths too: trials run in their own directories
            f"task.data_dir={os.path.relpath(resolve_data_dir(None), tmp_path)}",
            "--set",
            "ordering.name=grab",
            "--set",
            "train.epochs=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "grab" in run.stdout and "final train loss" in run.stdout
    query = subprocess.run(
        [
            *cli,
            "results",
            str(tmp_path / storage),
            "--sql",
            "SELECT ordering, count(*) AS n FROM epochs JOIN trials USING (trial_id) GROUP BY ALL",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert query.returncode == 0, query.stderr
    assert query.stdout.split() == ["ordering", "n", "grab", "2"]


def test_more_workers_than_the_cluster_can_hold_is_a_clean_error(ray_cluster, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "-m", "orderlab", "run", str(TINY), "--set", f"storage={tmp_path}",
         "--set", "train.num_workers=8", "--set", "train.batch_size=64"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "train.num_workers=8" in done.stderr and "cluster has" in done.stderr


def test_dashboard_listens_on_loopback_only(ray_cluster):
    from ray._private import worker

    webui = worker.global_worker.node.address_info.get("webui_url") or ""
    assert webui.startswith("127.0.0.1:"), webui
