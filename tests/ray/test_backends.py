"""The simulated backend against Ray Train: the same configs under both, on one shared Ray.

Every trial runs 3 epochs. Every epoch's orders must be the same: gradient-free orderings' at any W;
gradient orderings' with W = 2, where the all-reduce is a two-term sum (the same in either order),
and also with W = 4 on these configs, where gloo's 4-way sum of float32 gradients may round the last
bit differently from the simulated backend's sum in rank order (usually it does not, and the signs
never flipped on it). So gradient orderings, whose per-unit gradients the simulated backend takes per
worker, train bit-identical weights at W = 2 (equal train losses); gradient-free orderings take one
backward over every worker's examples (the sum of the workers' mean losses), whose weight gradients
round differently in the last bit. Losses must agree within rtol 1e-5."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import orderlab
from orderlab import results

pytestmark = [pytest.mark.ray, pytest.mark.datasets]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BOTH = ["ray-train", "simulated"]


def run(storage: Path, name: str, config: str, overrides: dict, param_space: dict) -> pd.DataFrame:
    outcome = orderlab.sweep(
        str(CONFIGS / config),
        overrides={"name": name, "storage": str(storage), "sweep": {}, "train.epochs": 3, **overrides},
        param_space={"train.backend": BOTH, **param_space},
    )
    assert outcome.num_errors == 0
    return (
        results.connect(str(storage))
        .sql(
            "SELECT backend, ordering, num_workers, unit, epoch, train_loss, val_loss, val_metric, order_digest, "
            f"status FROM epochs JOIN trials USING (trial_id, sweep) WHERE sweep = '{name}' ORDER BY ALL"
        )
        .df()
    )


def by_backend(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The Ray Train rows and the simulated rows, aligned by (ordering, num_workers, unit, epoch)."""
    keys = ["ordering", "num_workers", "unit", "epoch"]
    ray_rows = rows[rows["backend"] == "ray-train"].sort_values(keys).reset_index(drop=True)
    simulated = rows[rows["backend"] == "simulated"].sort_values(keys).reset_index(drop=True)
    assert len(ray_rows) == len(simulated) > 0
    assert ray_rows[keys].equals(simulated[keys])
    return ray_rows, simulated


@pytest.fixture(scope="module")
def example_units(ray_cluster, tmp_path_factory) -> pd.DataFrame:
    """digits-logreg, example units, rr and cd-grab, W = 2 and 4 (global batch 16)."""
    return run(
        tmp_path_factory.mktemp("backends"),
        "backends-example",
        "tiny.yaml",
        {"train.unit": "example"},
        {"ordering.name": ["rr", "cd-grab"], "train.num_workers": [2, 4]},
    )


@pytest.fixture(scope="module")
def microbatch_units(ray_cluster, tmp_path_factory) -> pd.DataFrame:
    """digits-logreg with microbatch units (8 examples each, W = 2) and the LSTM carrying its hidden
    state across chunks (a 5,000-token corpus prefix, W = 2, cd-grab with fp16 sketched payloads)."""
    storage = tmp_path_factory.mktemp("backends-microbatch")
    digits = run(
        storage,
        "backends-microbatch",
        "tiny.yaml",
        {"train.unit": "microbatch"},
        {"ordering.name": ["rr", "cd-grab"]},
    )
    lstm = run(
        storage,
        "backends-lstm",
        "cdgrab-lstm-wikitext2-small.yaml",
        {
            "task.options.train_tokens": 5000,
            "task.options.eval_tokens": 2000,
            "train.num_workers": 2,
            "train.batch_size": 4,
            "ordering.name": "cd-grab",
        },
        {},
    )
    return pd.concat([digits, lstm], ignore_index=True)


def test_both_backends_complete_every_epoch(example_units, microbatch_units):
    for rows in (example_units, microbatch_units):
        assert set(rows["status"]) == {"completed"}
        assert (rows.groupby(["backend", "ordering", "num_workers", "unit"])["epoch"].nunique() == 3).all()


def test_the_same_orders_every_epoch(example_units, microbatch_units):
    for rows in (example_units, microbatch_units):
        ray_rows, simulated = by_backend(rows)
        assert ray_rows["order_digest"].tolist() == simulated["order_digest"].tolist()
        assert ray_rows["order_digest"].nunique() > len(ray_rows) // 2  # the orders change by epoch


def test_the_same_losses(example_units, microbatch_units):
    """Averaging over workers, not summing, and the same optimizer steps: losses within rtol 1e-5,
    and bit-identical train losses where the gradients are taken per worker and W = 2 (a two-term
    all-reduce is the same sum in any order; gloo's 4-way sum need not round as the rank-order sum)."""
    for rows in (example_units, microbatch_units):
        ray_rows, simulated = by_backend(rows)
        per_worker = ((ray_rows["ordering"] == "cd-grab") & (ray_rows["num_workers"] == 2)).to_numpy()
        assert per_worker.any()
        exact = ray_rows.loc[per_worker, "train_loss"].tolist()
        assert exact == simulated.loc[per_worker, "train_loss"].tolist()
        for column in ("train_loss", "val_loss", "val_metric"):
            pd.testing.assert_series_equal(ray_rows[column], simulated[column], rtol=1e-5, check_exact=False)
        assert ray_rows["train_loss"].nunique() > 3  # the trials differ from each other and learn


def test_a_simulated_trial_whose_process_dies_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    """A worker's exit kills the simulated trial's whole process; Tune retries the trial
    (train.max_failures) from its last checkpoint, and every epoch equals the uninterrupted run's."""
    outcome = orderlab.sweep(
        str(CONFIGS / "tiny.yaml"),
        overrides={
            "name": "backends-fault",
            "storage": str(tmp_path),
            "sweep": {},
            "train.epochs": 3,
            "train.backend": "simulated",
            "train.max_failures": 1,
            "ordering.name": "cd-grab",
        },
        param_space={"faults.exit_worker": [None, {"epoch": 1, "step": 20, "rank": 1}]},
    )
    assert (outcome.num_trials, outcome.num_errors) == (2, 0)
    con = results.connect(str(tmp_path))
    assert set(con.sql("SELECT status FROM trials").df()["status"]) == {"completed"}
    rows = con.sql(
        "SELECT json_extract_string(config_json, '$.faults.exit_worker') IS NULL AS clean, epoch, train_loss, "
        "order_digest FROM epochs JOIN trials USING (trial_id, sweep) ORDER BY clean, epoch"
    ).df()
    faulted, clean = rows[~rows["clean"]].reset_index(drop=True), rows[rows["clean"]].reset_index(drop=True)
    assert faulted["epoch"].tolist() == clean["epoch"].tolist() == [0, 1, 2]
    assert faulted["order_digest"].tolist() == clean["order_digest"].tolist()
    assert faulted["train_loss"].tolist() == clean["train_loss"].tolist()
    markers = list((tmp_path / "_faults").rglob("exit_worker"))
    assert len(markers) == 1  # the fault fired, once
