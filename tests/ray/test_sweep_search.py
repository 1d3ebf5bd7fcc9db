"""Ray integration of sweep search: an Optuna search per ordering with ASHA stopping trials early,
MLflow and TensorBoard runs read back with their own readers, --resume of the finished sweep, a
sampled seed, the median-stopping rule, and HyperBand pausing trials and resuming them."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pandas as pd
import pytest
from ray.tune.search.optuna import OptunaSearch

import orderlab
from orderlab import results
from orderlab.search import GridPointSearch, tune_space

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
EPOCHS, SAMPLES = 3, 4
OVERRIDES = {
    "name": "search",
    "train.backend": "simulated",
    "train.epochs": EPOCHS,
    "sweep": {
        "ordering.name": ["rr", "cd-grab"],
        "train.lr": {"loguniform": [1.0e-3, 1.0]},
        "search": {"algorithm": "optuna", "num_samples": SAMPLES, "seed": 0},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    },
    "tracking": ["mlflow", "tensorboard"],
}


@pytest.fixture(scope="module")
def searched(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("search")
    outcome = orderlab.sweep(str(TINY), overrides={**OVERRIDES, "storage": str(storage)})
    return outcome, str(storage)


def test_each_ordering_gets_its_own_seeded_search_and_asha_stops_trials(searched):
    outcome, root = searched
    trials = results.trials(root, sweep="search")
    assert (outcome.num_trials, outcome.num_errors, len(trials)) == (2 * SAMPLES, 0, 2 * SAMPLES)
    assert trials.groupby("ordering").size().to_dict() == {"cd-grab": SAMPLES, "rr": SAMPLES}
    # one Optuna study per ordering, both copies of the seed-0 searcher: the first suggestions are its
    # seeded random start-up trials, so both orderings try the same learning rates
    study = GridPointSearch(
        OptunaSearch(seed=0),
        [{}],
        {"train.lr": tune_space({"loguniform": [1.0e-3, 1.0]})},
        SAMPLES,
        "train_loss",
        "min",
    )
    expected = sorted(study.suggest(f"t{i}")["train.lr"] for i in range(SAMPLES))
    for ordering in ("rr", "cd-grab"):
        lrs = sorted(trials.loc[trials["ordering"] == ordering, "lr"])
        assert lrs == pytest.approx(expected, rel=1e-12)
    assert set(trials["status"]) <= {"completed", "stopped"}
    stopped = trials[trials["status"] == "stopped"]
    assert len(stopped) >= 1 and outcome.num_stopped == len(stopped)
    epochs = results.epochs(root, sweep="search")
    last_epoch = epochs.groupby("trial_id")["epoch"].max()
    for row in stopped.itertuples():
        # stopped at a rung before the last epoch; its epoch rows up to there stay, none after
        assert row.stopped_epoch < EPOCHS - 1 and last_epoch[row.trial_id] == row.stopped_epoch
        assert sorted(epochs.loc[epochs["trial_id"] == row.trial_id, "epoch"]) == list(
            range(row.stopped_epoch + 1)
        )
        assert row.error.startswith(
            f"stopped by the asha scheduler after epoch {row.stopped_epoch}: train_loss="
        )
        assert row.finished_at is not None and row.wall_seconds > 0
    for row in trials[trials["status"] == "completed"].itertuples():
        assert last_epoch[row.trial_id] == EPOCHS - 1 and pd.isna(row.stopped_epoch)
    # the summary averages completed trials only and counts the stopped ones
    summary = outcome.summary
    assert summary["num_stopped"].sum() == len(stopped)
    assert summary["num_seeds"].sum() == SAMPLES * 2 - len(stopped)


def test_the_best_trial_of_each_ordering_is_reported(searched):
    outcome, root = searched
    best = outcome.best
    assert best["ordering.name"].tolist() == ["cd-grab", "rr"]
    assert best["num_trials"].tolist() == [SAMPLES, SAMPLES]
    assert best.equals(results.best_trials(root, sweep="search"))  # what the report shows too
    completed = results.trials(root, sweep="search", status="completed")
    finals = results.epochs(root, sweep="search", epoch=EPOCHS - 1).set_index("trial_id")["train_loss"]
    for row in best.to_dict("records"):
        mine = completed.loc[completed["ordering"] == row["ordering.name"], "trial_id"]
        assert row["trial_id"] in set(mine) and row["epochs_done"] == EPOCHS
        assert row["train_loss"] == finals[mine].min()
        assert row["train.lr"] == completed.set_index("trial_id").loc[row["trial_id"], "lr"]


def test_mlflow_runs_hold_the_epochs_tables_metrics(searched):
    from mlflow.tracking import MlflowClient

    _, root = searched
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("search")
    runs = client.search_runs([experiment.experiment_id])
    epochs = results.epochs(root, sweep="search")
    trials = results.trials(root, sweep="search").set_index("trial_id")
    assert len(runs) == len(trials)
    for run in runs:
        trial_id = run.info.run_name.rsplit("_", 1)[1]
        history = client.get_metric_history(run.info.run_id, "train_loss")
        mine = epochs[epochs["trial_id"] == trial_id]
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == mine["train_loss"].tolist()
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == (mine["epoch"] + 1).tolist()
        params = run.data.params
        assert params["ordering.name"] == trials.loc[trial_id, "ordering"]
        assert float(params["train.lr"]) == trials.loc[trial_id, "lr"]
        assert (params["task.name"], params["train.num_workers"], params["seed"]) == (
            "digits-logreg",
            "2",
            "0",
        )


def test_tensorboard_events_hold_the_epochs_tables_metrics(searched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, root = searched
    epochs = results.epochs(root, sweep="search")
    files = glob.glob(f"{root}/_tune/search/run_trial_*/events.out.tfevents.*")
    assert len(files) == 2 * SAMPLES
    for file in files:
        trial_id = Path(file).parent.name.split("_")[2]
        events = EventAccumulator(file)
        events.Reload()
        scalars = events.Scalars("ray/tune/train_loss")
        mine = epochs[epochs["trial_id"] == trial_id]
        assert [e.step for e in scalars] == (mine["epoch"] + 1).tolist()
        assert [e.value for e in scalars] == pytest.approx(mine["train_loss"].tolist(), rel=1e-6)  # float32


def test_resume_keeps_the_stopped_and_completed_trials(searched):
    outcome, root = searched
    before = results.trials(root, sweep="search").drop(columns=["config_json"])
    epochs_before = results.epochs(root, sweep="search")
    again = orderlab.sweep(str(TINY), overrides={**OVERRIDES, "storage": root}, resume=True, quiet=True)
    assert (again.num_trials, again.num_errors, again.num_stopped) == (2 * SAMPLES, 0, outcome.num_stopped)
    after = results.trials(root, sweep="search").drop(columns=["config_json"])
    assert after.equals(before)
    assert results.epochs(root, sweep="search").equals(epochs_before)


def test_sampled_seeds_and_sizes_between_the_validated_ends_run_and_are_recorded(ray_cluster, tmp_path):
    """Sampled values between the ends the sweep was validated with: seeds (which size nothing) and
    batch sizes (which size each task's layout: the trial gets their task facts itself); each trial
    records its grid point and draws."""
    overrides = {
        "name": "seeds",
        "storage": str(tmp_path),
        "train.backend": "simulated",
        "train.epochs": 1,
        "train.num_workers": 1,
        "sweep": {
            "ordering.name": ["rr"],
            "seed": {"randint": [0, 1000]},
            "train.batch_size": {"randint": [8, 33]},
            "search": {"num_samples": 2},
        },
    }
    outcome = orderlab.sweep(str(TINY), overrides=overrides, quiet=True)
    trials = results.trials(str(tmp_path), sweep="seeds")
    assert (outcome.num_errors, trials["status"].tolist()) == (0, ["completed", "completed"])
    assert set(trials["grid_point_json"]) == {'{"ordering.name": "rr"}'}
    assert [json.loads(text) for text in trials["searched_json"]] == [
        {"seed": seed, "train.batch_size": batch_size}
        for seed, batch_size in zip(trials["seed"], trials["batch_size"], strict=True)
    ]
    assert not set(trials["seed"]) & {0, 999}  # search seed 0 draws seeds between the validated ends
    assert not set(trials["batch_size"]) & {8, 32}  # and batch sizes
    assert outcome.best["num_trials"].tolist() == [2]


def test_median_stopping_stops_the_trial_below_the_median_of_the_others(ray_cluster, tmp_path):
    """One trial at a time in grid order: after three finished trials, lr 1e-4's loss at epoch 1 is
    far above their running averages there, so Tune's MedianStoppingRule stops it."""
    overrides = {
        "name": "median",
        "storage": str(tmp_path),
        "train.backend": "simulated",
        "train.epochs": 3,
        "resources.max_concurrent_trials": 1,
        "sweep": {
            "ordering.name": ["rr"],
            "train.lr": [0.5, 0.3, 0.2, 1.0e-4],
            "scheduler": {"name": "median-stopping", "grace_period": 1, "min_samples_required": 3},
        },
    }
    outcome = orderlab.sweep(str(TINY), overrides=overrides, quiet=True)
    trials = results.trials(str(tmp_path), sweep="median").sort_values("lr", ascending=False)
    assert (outcome.num_errors, outcome.num_stopped) == (0, 1)
    assert trials["status"].tolist() == ["completed", "completed", "completed", "stopped"]
    stopped = trials.iloc[-1]
    assert stopped["stopped_epoch"] == 0
    assert stopped["error"].startswith("stopped by the median-stopping scheduler after epoch 0: train_loss=")
    epochs = results.epochs(str(tmp_path), sweep="median").groupby("trial_id")["epoch"].max()
    assert epochs[trials["trial_id"]].tolist() == [2, 2, 2, 0]


def test_hyperband_stops_the_worst_and_resumes_paused_trials_where_they_left_off(ray_cluster, tmp_path):
    """Tune's HyperBand with max_t 4 and reduction factor 2 puts the first three trials in a bracket
    that runs them to the end and the next three (lr 0.1, 0.05, 1e-4) in one that halves at 2
    epochs: it pauses those that get there first and keeps the best two. A paused trial resumes
    from its checkpoint, so its rows equal those of the same lr run straight through."""
    lrs = [0.5, 0.3, 0.2, 0.1, 0.05, 1.0e-4]
    overrides = {
        "storage": str(tmp_path),
        "train.backend": "simulated",
        "train.epochs": 4,
        "resources.trial_cpus": 0.25,  # all six at once: a bracket halves when all its trials get there
        "resources.max_concurrent_trials": len(lrs),
        "sweep": {
            "ordering.name": ["rr"],
            "train.lr": lrs,
            "scheduler": {"name": "hyperband", "reduction_factor": 2},
        },
    }
    outcome = orderlab.sweep(str(TINY), overrides={**overrides, "name": "hyperband"}, quiet=True)
    trials = results.trials(str(tmp_path), sweep="hyperband").sort_values("lr", ascending=False)
    assert (outcome.num_errors, outcome.num_stopped) == (0, 1)
    assert trials["status"].tolist() == ["completed"] * 5 + ["stopped"]
    assert trials["stopped_epoch"].iloc[-1] == 1
    assert (
        trials["error"].iloc[-1].startswith("stopped by the hyperband scheduler after epoch 1: train_loss=")
    )
    restored = []
    for trial_id in trials["trial_id"]:
        (result,) = glob.glob(f"{tmp_path}/_tune/hyperband/run_trial_{trial_id}_*/result.json")
        last = json.loads(Path(result).read_text().splitlines()[-1])
        if last["iterations_since_restore"] < last["training_iteration"]:
            restored.append(trial_id)
            # paused at its second epoch's report, it trained epochs 2 and 3 after it, not 0 to 3
            assert (last["training_iteration"], last["iterations_since_restore"]) == (4, 2)
    assert restored  # the halving bracket paused one or both of the trials it kept

    straight = {**overrides, "name": "straight", "sweep": {"ordering.name": ["rr"], "train.lr": [0.1, 0.05]}}
    orderlab.sweep(str(TINY), overrides=straight, quiet=True)
    columns = ["lr", "epoch", "train_loss", "order_digest"]

    def rows(sweep: str, trial_ids: list[str]) -> pd.DataFrame:
        epochs = results.epochs(str(tmp_path), sweep=sweep, trial_id=trial_ids)
        return epochs[columns].sort_values(["lr", "epoch"]).reset_index(drop=True)

    resumed = rows("hyperband", restored)
    assert set(resumed["lr"]) <= {0.1, 0.05} and len(resumed) == 4 * len(restored)
    expected = rows("straight", list(results.trials(str(tmp_path), sweep="straight")["trial_id"]))
    pd.testing.assert_frame_equal(
        resumed, expected[expected["lr"].isin(resumed["lr"])].reset_index(drop=True)
    )
    first = trials.set_index("trial_id").loc[restored]
    assert (first["wall_seconds"] == (first["finished_at"] - first["started_at"]).dt.total_seconds()).all()
