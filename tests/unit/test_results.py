"""Unit tests for orderlab.results: Parquet writer, DuckDB views, loaders, summary."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from orderlab import cli, results, stats
from orderlab.errors import DamagedResultsWarning, OrderlabError

# duckdb's .df() on TIMESTAMPTZ columns calls DataFrame.drop(inplace=True), deprecated in pandas 3.1.
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.drop")

GROUP = {
    "task": "mnist1d",
    "unit": "example",
    "num_workers": 2,
    "batch_size": 16,
    "optimizer": "sgd",
    "lr": 0.1,
    "lr_schedule": "constant",
    "momentum": None,  # NULL group columns must still match each other
    "weight_decay": 0.0,
}

# Summary fixture, in binary fractions so the ties below are exact.
# (ordering, seed) -> per-epoch train_loss, final val accuracy, epoch_seconds, order_wait_seconds
CURVES = {
    ("rr", 0): ([1.0, 0.75, 0.5], 0.5, 2.0, [0.0, 0.0, 0.0]),
    ("rr", 1): ([1.5, 1.0, 0.75], 0.75, 4.0, [0.0, 0.0, 0.0]),
    ("cd-grab", 0): ([1.0, 0.5, 0.25], 0.75, 3.0, [0.25, 0.5, 0.75]),
    ("cd-grab", 1): ([1.0, 0.75, 0.75], 1.0, 5.0, [0.75, 0.5, 0.25]),
}
# By hand: rr curve [1.25, 0.875, 0.625], final mean 0.625, std sqrt(2 * 0.125**2 / 1) = 0.1767767;
# cd-grab curve [1.0, 0.625, 0.5], final mean 0.5, std sqrt(2 * 0.25**2 / 1) = 0.3535534.
# Baseline rr (target 0.625): rr reaches at epoch 3 (tie), cd-grab at epoch 2 (tie 0.625).
# Baseline cd-grab (target 0.5): cd-grab at epoch 3 (tie), rr never (NaN).


def trial_row(trial_id: str, sweep: str = "s", **overrides: object) -> dict:
    return {"trial_id": trial_id, "sweep": sweep, **GROUP, "status": "completed", **overrides}


def write_fixture(root: str) -> None:
    for (ordering, seed), (losses, accuracy, epoch_seconds, waits) in CURVES.items():
        trial_id = f"{ordering}-{seed}"
        results.write_trial(root, trial_row(trial_id, ordering=ordering, seed=seed, epochs=3))
        for epoch in reversed(range(3)):  # write order must not matter
            results.write_epoch(
                root,
                {
                    "trial_id": trial_id,
                    "sweep": "s",
                    "epoch": epoch,
                    "train_loss": losses[epoch],
                    "val_metric": accuracy if epoch == 2 else 0.0,
                    "val_metric_name": "accuracy",
                    "epoch_seconds": epoch_seconds,
                    "order_wait_seconds": waits[epoch],
                },
            )
    # A failed trial in the same group, with losses that would change every number if counted.
    results.write_trial(root, trial_row("rr-err", ordering="rr", seed=2, status="error", error="boom"))
    results.write_epoch(root, {"trial_id": "rr-err", "sweep": "s", "epoch": 0, "train_loss": 0.0})
    # A one-seed group (other lr) in another sweep.
    results.write_trial(root, trial_row("solo", sweep="t", ordering="rr", seed=0, lr=0.05))
    for epoch, loss in enumerate([2.0, 1.0]):
        results.write_epoch(root, {"trial_id": "solo", "sweep": "t", "epoch": epoch, "train_loss": loss})


def test_round_trip_write_connect_sql(tmp_path: Path) -> None:
    root = str(tmp_path / "res")
    started = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    path = results.write_trial(root, trial_row("a", ordering="rr", seed=3, started_at=started, num_dropped=7))
    assert path == str(tmp_path / "res" / "trials" / "s" / "a.parquet")
    path = results.write_epoch(
        root, {"trial_id": "a", "sweep": "s", "epoch": 4, "train_loss": 0.5, "herding": 1.5}
    )
    assert path == str(tmp_path / "res" / "epochs" / "s" / "a" / "epoch-00004.parquet")

    con = results.connect(root)
    row = con.sql("SELECT trial_id, ordering, seed, num_dropped, error FROM trials").fetchall()
    assert row == [("a", "rr", 3, 7, None)]
    assert con.sql("SELECT epoch_us(started_at) AS us FROM trials").fetchall() == [
        (started.timestamp() * 1e6,)
    ]
    assert con.sql("SELECT epoch, train_loss, herding, val_loss FROM epochs").fetchall() == [
        (4, 0.5, 1.5, None)
    ]
    assert con.sql("SELECT column_name FROM (DESCRIBE trials)").df()["column_name"].tolist() == (
        results.TRIALS_SCHEMA.names
    )


def test_retry_overwrites_one_row_per_trial_and_epoch(tmp_path: Path) -> None:
    root = str(tmp_path)
    for attempt in range(3):
        results.write_trial(root, trial_row("a", status="running" if attempt < 2 else "completed"))
        for epoch in range(2):
            results.write_epoch(
                root, {"trial_id": "a", "sweep": "s", "epoch": epoch, "train_loss": float(attempt)}
            )
    df = results.epochs(root)
    assert df[["epoch", "train_loss"]].values.tolist() == [[0, 2.0], [1, 2.0]]
    assert results.trials(root)["status"].tolist() == ["completed"]
    assert sorted(p.name for p in (tmp_path / "epochs" / "s" / "a").iterdir()) == [
        "epoch-00000.parquet",
        "epoch-00001.parquet",
    ]


def test_orphan_temp_file_is_ignored(tmp_path: Path) -> None:
    root = str(tmp_path)
    results.write_epoch(root, {"trial_id": "a", "sweep": "s", "epoch": 0, "train_loss": 1.0})
    orphan = tmp_path / "epochs" / "s" / "a" / ".epoch-00001.parquet.0123abcd.tmp"
    orphan.write_bytes(b"PAR1 half a file")
    (tmp_path / "trials" / "s").mkdir(parents=True)
    (tmp_path / "trials" / "s" / ".b.parquet.0123abcd.tmp").write_bytes(b"")
    assert len(results.epochs(root)) == 1
    assert len(results.trials(root)) == 0


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(OrderlabError, match="'sweep'"):
        results.write_trial(str(tmp_path), {"trial_id": "a"})
    with pytest.raises(OrderlabError, match="'epoch'"):
        results.write_epoch(str(tmp_path), {"trial_id": "a", "sweep": "s", "train_loss": 1.0})
    with pytest.raises(OrderlabError, match="'trial_id'"):
        results.write_epoch(str(tmp_path), {"trial_id": None, "sweep": "s", "epoch": 0})


def test_unknown_key_is_named_with_known_columns(tmp_path: Path) -> None:
    with pytest.raises(
        OrderlabError, match=r"unknown column\(s\) loss, trainloss; known: trial_id, sweep, epoch"
    ):
        results.write_epoch(
            str(tmp_path), {"trial_id": "a", "sweep": "s", "epoch": 0, "trainloss": 1, "loss": 2}
        )


def test_bad_values_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(OrderlabError, match="num_workers='four' does not fit int32"):
        results.write_trial(str(tmp_path), trial_row("a", num_workers="four"))
    with pytest.raises(OrderlabError, match="status='done' is unknown; known: running, completed"):
        results.write_trial(str(tmp_path), trial_row("a", status="done"))
    with pytest.raises(OrderlabError, match="trial_id='../x'"):
        results.write_trial(str(tmp_path), trial_row("../x"))
    assert not (tmp_path / "trials").exists()


def test_empty_root_gives_empty_views_with_columns(tmp_path: Path) -> None:
    for root in (tmp_path, tmp_path / "not-yet-created"):
        con = results.connect(str(root))
        for name, schema in results.TABLES.items():
            df = con.sql(f"SELECT * FROM {name}").df()
            assert len(df) == 0
            assert list(df.columns) == schema.names
        assert results.summary(str(root)).empty
        assert results.format_summary(results.summary(str(root))) == "no completed trials"


def test_filters_equality_lists_and_unknown_column(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)
    assert results.trials(root, ordering="cd-grab")["trial_id"].tolist() == ["cd-grab-0", "cd-grab-1"]
    assert results.trials(root, ordering=["rr"], seed=(0, 2))["trial_id"].tolist() == [
        "rr-0",
        "rr-err",
        "solo",
    ]
    assert results.trials(root, ordering=[]).empty
    assert results.trials(root, sweep="t")["trial_id"].tolist() == ["solo"]
    assert results.trials(root, momentum=None, lr=0.05)["trial_id"].tolist() == ["solo"]
    df = results.epochs(root, trial_id=["rr-1", "cd-grab-0"])
    assert list(zip(df["trial_id"], df["epoch"], strict=True)) == [("cd-grab-0", e) for e in range(3)] + [
        ("rr-1", e) for e in range(3)
    ]
    # A value is bound as a parameter, never spliced into SQL.
    assert results.trials(root, ordering="rr' OR '1'='1").empty
    with pytest.raises(OrderlabError, match="unknown trials filter column.*orderin; known: trial_id"):
        results.trials(root, orderin="rr")
    with pytest.raises(OrderlabError, match="unknown epochs filter column.*ordering"):
        results.epochs(root, ordering="rr")
    with pytest.raises(OrderlabError, match="filters"):
        results.trials(root, seed="zero")


def test_summary_against_hand_computed_fixture(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)
    df = results.summary(root, sweep="s")
    assert df["ordering"].tolist() == ["cd-grab", "rr"]  # sorted by final_train_loss_mean
    cd, rr = (df.iloc[i] for i in range(2))
    assert (cd["num_seeds"], rr["num_seeds"]) == (2, 2)
    assert cd["final_train_loss_mean"] == 0.5 and rr["final_train_loss_mean"] == 0.625
    assert cd["final_train_loss_std"] == pytest.approx(math.sqrt(0.125))
    assert rr["final_train_loss_std"] == pytest.approx(math.sqrt(0.03125))
    assert cd["val_metric_mean"] == 0.875 and rr["val_metric_mean"] == 0.625
    assert cd["val_metric_name"] == "accuracy"
    assert (cd["epochs_to_baseline"], rr["epochs_to_baseline"]) == (2, 3)  # both reached on a tie
    assert (cd["epoch_seconds_mean"], rr["epoch_seconds_mean"]) == (4.0, 3.0)
    assert cd["order_wait_seconds_mean"] == pytest.approx(0.5) and rr["order_wait_seconds_mean"] == 0.0
    assert rr["sweep"] == "s" and rr["lr"] == 0.1 and math.isnan(rr["momentum"])

    by_cd = results.summary(root, baseline="cd-grab", sweep="s").set_index("ordering")
    assert by_cd.loc["cd-grab", "epochs_to_baseline"] == 3
    assert math.isnan(by_cd.loc["rr", "epochs_to_baseline"])  # 0.625 never gets to 0.5
    assert results.summary(root, baseline="so", sweep="s")["epochs_to_baseline"].isna().all()


def test_summary_of_an_unknown_sweep_names_the_sweeps_there(tmp_path: Path) -> None:
    root = str(tmp_path)
    with pytest.raises(OrderlabError, match="no sweep 's' under results root .*; it holds no trials"):
        results.summary(root, sweep="s")
    write_fixture(root)
    with pytest.raises(OrderlabError, match="no sweep 'nosuch' under results root .*; its sweeps: s, t$"):
        results.summary(root, sweep="nosuch")


def test_summary_one_seed_group_and_format(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)
    df = results.summary(root)
    assert df["sweep"].tolist() == ["s", "s", "t"]
    solo = df.iloc[2]
    assert solo["num_seeds"] == 1 and solo["final_train_loss_mean"] == 1.0
    assert math.isnan(solo["final_train_loss_std"])
    assert solo["epochs_to_baseline"] == 2

    text = results.format_summary(df)
    assert "sweep=s lr=0.1" in text and "sweep=t lr=0.05" in text
    assert "0.5 ± 0.35" in text and "0.875 accuracy" in text
    single = results.format_summary(results.summary(root, sweep="s"))
    assert "sweep=" not in single
    header = single.splitlines()[0].split()
    assert header[:2] == ["ordering", "seeds"] and "order-wait" in single


def test_file_uri_root(tmp_path: Path) -> None:
    root = tmp_path.as_uri()
    assert root.startswith("file://")
    path = results.write_epoch(root, {"trial_id": "a", "sweep": "s", "epoch": 0, "train_loss": 1.0})
    assert path == str(tmp_path / "epochs" / "s" / "a" / "epoch-00000.parquet")
    assert results.epochs(root)["train_loss"].tolist() == [1.0]
    assert results.epochs(str(tmp_path))["train_loss"].tolist() == [1.0]


def test_remote_filesystem_reads_through_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand-in for s3:// or gs://: any filesystem that is not LocalFileSystem takes the dataset path.
    remote = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    monkeypatch.setattr(results, "_storage", lambda root: (remote, "bucket/res"))
    path = results.write_trial("mem://bucket/res", trial_row("a", ordering="rr"))
    assert path == "mem://bucket/res/trials/s/a.parquet"
    results.write_epoch("mem://bucket/res", {"trial_id": "a", "sweep": "s", "epoch": 0, "train_loss": 1.0})
    assert (tmp_path / "bucket" / "res" / "trials" / "s" / "a.parquet").is_file()
    assert results.trials("mem://bucket/res")["ordering"].tolist() == ["rr"]
    assert results.summary("mem://bucket/res")["epochs_to_baseline"].tolist() == [1.0]


def test_unwritable_or_unreadable_root_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    root = str(blocker / "results")
    with pytest.raises(
        OrderlabError, match="cannot write results under .*a-file/results.*writable storage root"
    ):
        results.write_trial(root, trial_row("a"))
    with pytest.raises(OrderlabError, match="a-file' is a file"):
        results.connect(str(blocker))
    with pytest.raises(OrderlabError, match="not a usable URI"):
        results.connect("nosuchscheme://x")


def test_summary_statistics_columns_by_hand(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)
    df = results.summary(root, sweep="s").set_index("ordering")
    cd, rr = df.loc["cd-grab"], df.loc["rr"]
    # 95% CI half-width: t_{0.975, 1} = 12.7062 (table) times std / sqrt(2).
    assert cd["final_train_loss_ci95"] == pytest.approx(12.7062 * math.sqrt(0.125) / math.sqrt(2), rel=1e-4)
    assert rr["final_train_loss_ci95"] == pytest.approx(12.7062 * math.sqrt(0.03125) / math.sqrt(2), rel=1e-4)
    # Seconds to the target 0.625: cd-grab 2 epochs x mean 4 s, rr 3 epochs x mean 3 s.
    assert (cd["seconds_to_baseline"], rr["seconds_to_baseline"]) == (8.0, 9.0)
    # Speedup: rr needs 3 epochs to its own final mean, cd-grab 2; time: 9 s / 8 s.
    assert (cd["speedup"], cd["time_speedup"]) == (1.5, 1.125)
    assert (rr["speedup"], rr["speedup_ci_low"], rr["speedup_ci_high"]) == (1.0, 1.0, 1.0)
    # Bootstrap CIs enumerated in test_stats.py.
    assert (cd["speedup_ci_low"], cd["speedup_ci_high"]) == (0.0, 1.5)
    assert (cd["time_speedup_ci_low"], cd["time_speedup_ci_high"]) == (0.0, 2.0)
    assert (cd["num_diverged"], rr["num_diverged"]) == (0, 0)

    # Never reached (rr against cd-grab's 0.5): every target column NaN.
    by_cd = results.summary(root, baseline="cd-grab", sweep="s").set_index("ordering")
    never = by_cd.loc["rr", ["seconds_to_baseline", "speedup", "speedup_ci_low", "time_speedup"]]
    assert never.isna().all()
    assert by_cd.loc["cd-grab", "speedup"] == 1.0 and by_cd.loc["cd-grab", "seconds_to_baseline"] == 12.0
    # One seed: no CI, point estimates still there.
    solo = results.summary(root, sweep="t").iloc[0]
    assert math.isnan(solo["final_train_loss_ci95"]) and math.isnan(solo["speedup_ci_low"])
    assert solo["speedup"] == 1.0 and math.isnan(solo["seconds_to_baseline"])  # no epoch_seconds


def test_summary_keeps_columns_and_counts_diverged(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)
    before = results.summary(root, sweep="s")
    # Diverged trials: counted, never averaged; an ordering with only diverged trials gets a row.
    for trial_id, ordering in [("cd-grab-9", "cd-grab"), ("so-0", "so"), ("so-1", "so")]:
        results.write_trial(root, trial_row(trial_id, ordering=ordering, seed=9, status="diverged"))
        results.write_epoch(root, {"trial_id": trial_id, "sweep": "s", "epoch": 0, "train_loss": 1e9})
    # a trial the scheduler stopped after epoch 0: counted apart, not averaged as if it completed
    stopped = trial_row("rr-9", ordering="rr", seed=9, status="stopped", stopped_epoch=0, error="asha")
    results.write_trial(root, stopped)
    results.write_epoch(root, {"trial_id": "rr-9", "sweep": "s", "epoch": 0, "train_loss": 5.0})
    df = results.summary(root, sweep="s")
    assert list(df.columns) == [
        *results.GROUP_COLUMNS,
        "ordering",
        "num_seeds",
        "final_train_loss_mean",
        "final_train_loss_std",
        "val_metric_mean",
        "val_metric_name",
        "epochs_to_baseline",
        "epoch_seconds_mean",
        "order_wait_seconds_mean",
        "final_train_loss_ci95",
        "seconds_to_baseline",
        "speedup",
        "speedup_ci_low",
        "speedup_ci_high",
        "time_speedup",
        "time_speedup_ci_low",
        "time_speedup_ci_high",
        "num_diverged",
        "num_stopped",
    ]
    assert df["ordering"].tolist() == ["cd-grab", "rr", "so"]
    assert df["num_diverged"].tolist() == [1, 0, 2]
    assert df["num_stopped"].tolist() == [0, 1, 0]
    assert df["num_seeds"].tolist() == [2, 2, 0]
    numbers = before.columns.drop(["val_metric_name", "momentum", "num_diverged", "num_stopped"])
    assert df.iloc[:2][numbers].equals(before[numbers])  # the diverged and stopped rows changed nothing
    counts = ["num_seeds", "num_diverged", "num_stopped"]
    assert df.iloc[2].drop([*results.GROUP_COLUMNS, "ordering", *counts]).isna().all()

    text = results.format_summary(df)
    assert "diverged" in text.splitlines()[0] and "speedup [95% CI]" in text
    assert "1.5 [0, 1.5]" in text and "1.12 [0, 2]" in text and "± 3.2" in text


def read_all(root: str) -> tuple:
    return results.trials(root), results.epochs(root), results.summary(root)


def assert_same_reads(root: str, expected: tuple) -> None:
    trials, epochs, summary = read_all(root)
    assert trials.equals(expected[0]) and epochs.equals(expected[1])
    pd.testing.assert_frame_equal(summary, expected[2])


def test_every_row_once_in_every_compaction_state(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)  # row files only: the layout before trial files and compaction
    expected = read_all(root)
    assert results.consolidate_trial(root, "s", "rr-0") == str(tmp_path / "epochs/s/rr-0/epochs.parquet")
    assert sorted(p.name for p in (tmp_path / "epochs/s/rr-0").iterdir()) == ["epochs.parquet"]
    assert results.consolidate_trial(root, "s", "rr-0") is None  # nothing left to merge
    assert_same_reads(root, expected)
    done = results.compact(root, sweep="s")
    assert (done.sweeps, done.rows, done.damaged) == (["s"], {"trials": 5, "epochs": 13}, [])
    assert not (tmp_path / "epochs/s").exists() and (tmp_path / "epochs/t/solo").is_dir()
    assert_same_reads(root, expected)  # sweep s compacted, sweep t still row files
    results.compact(root)
    assert sorted(p.relative_to(tmp_path).parts[:3] for p in tmp_path.rglob("*.parquet")) == [
        ("compacted", "epochs", "s"), ("compacted", "epochs", "t"),
        ("compacted", "trials", "s"), ("compacted", "trials", "t"),
    ]  # fmt: skip
    assert_same_reads(root, expected)
    assert results.compact(root).sweeps == []  # already one part per table and sweep
    assert results.read_trial(root, "s", "rr-1")["ordering"] == "rr"  # from the compacted part
    assert results.read_trial(root, "s", "nosuch") is None


def test_newest_source_wins_after_compaction(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)
    results.compact(root)
    # A resumed trial rewrites epoch 2 and its row: the row files win over the compacted part ...
    results.write_epoch(root, {"trial_id": "rr-0", "sweep": "s", "epoch": 2, "train_loss": 9.0})
    results.write_trial(root, trial_row("rr-0", ordering="rr", seed=0, status="error"))
    assert results.epochs(root, trial_id="rr-0")["train_loss"].tolist() == [1.0, 0.75, 9.0]
    assert results.trials(root, trial_id="rr-0")["status"].tolist() == ["error"]
    # ... then the trial file, then a newer part.
    results.consolidate_trial(root, "s", "rr-0")
    assert results.epochs(root, trial_id="rr-0")["train_loss"].tolist() == [1.0, 0.75, 9.0]
    results.compact(root)
    assert len(list((tmp_path / "compacted/epochs/s").iterdir())) == 1
    assert results.epochs(root, trial_id="rr-0")["train_loss"].tolist() == [1.0, 0.75, 9.0]
    assert len(results.epochs(root)) == 15 and results.trials(root, status="error")["trial_id"].tolist() == [
        "rr-0",
        "rr-err",
    ]


def test_interrupted_compaction_leaves_each_row_once(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)
    expected = read_all(root)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.parquet")}
    results.compact(root)
    results.compact(root, sweep="s")  # a no-op: one part already
    first_parts = sorted(tmp_path.glob("compacted/*/*/*.parquet"))
    for path, data in before.items():  # as if killed after writing its parts, before removing inputs
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert_same_reads(root, expected)
    results.compact(root)  # a second generation of parts: the older ones are removed after it
    assert_same_reads(root, expected)
    assert not set(tmp_path.glob("compacted/*/*/*.parquet")) & set(first_parts)


def test_compact_migrates_files_without_newer_columns(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)
    old = results.EPOCHS_SCHEMA.remove(results.EPOCHS_SCHEMA.get_field_index("send_wait_seconds"))
    path = tmp_path / "epochs/s/rr-1/epoch-00001.parquet"
    pq.write_table(pq.read_table(path).select(old.names), path)  # written before the column existed
    expected = read_all(root)
    assert expected[1]["send_wait_seconds"].isna().all()
    results.compact(root)
    assert_same_reads(root, expected)
    assert pq.read_schema(next(tmp_path.glob("compacted/epochs/s/*.parquet"))) == results.EPOCHS_SCHEMA


def test_damaged_file_is_named_and_the_rest_is_read(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)
    expected = read_all(root)
    bad = tmp_path / "epochs/s/cd-grab-0/epoch-00003.parquet"
    bad.write_bytes(b"PAR1 half a file")  # a partial copy
    with pytest.warns(DamagedResultsWarning, match=f"{bad}.*partial: copy the file again"):
        assert results.epochs(root).equals(expected[1])
    with pytest.warns(DamagedResultsWarning, match="partial"):
        pd.testing.assert_frame_equal(results.summary(root), expected[2])
    with pytest.warns(DamagedResultsWarning, match="left in place"):
        assert results.consolidate_trial(root, "s", "cd-grab-0") is not None
    with pytest.warns(DamagedResultsWarning, match="not compacted and is left in place"):
        done = results.compact(root)
    assert done.damaged == [str(bad)] and bad.read_bytes() == b"PAR1 half a file"
    with pytest.warns(DamagedResultsWarning):
        assert_same_reads(root, expected)


def test_cli_names_a_damaged_file_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path)
    write_fixture(root)
    (tmp_path / "epochs/s/rr-0/epoch-00003.parquet").write_bytes(b"garbage")
    assert cli.main(["results", root, "--sweep", "s"]) == 2
    out, err = capsys.readouterr()
    assert "cd-grab" in out and "Traceback" not in err
    assert err.startswith("orderlab: warning: unreadable results file") and "epoch-00003.parquet" in err
    assert cli.main(["results", root, "--compact"]) == 2
    out, err = capsys.readouterr()
    assert (
        "compacted 2 sweep(s) (s, t): 21 files read, 6 trial rows and 15 epoch rows" in out
        and "not compacted" in err
    )
    (tmp_path / "epochs/s/rr-0/epoch-00003.parquet").unlink()
    assert cli.main(["results", root, "--compact"]) == 0
    assert "compacted 0 sweep(s) (nothing to merge)" in capsys.readouterr().out


def random_fixture(root: str, rng: np.random.Generator) -> None:
    """Groups with 1-4 seeds per ordering, uneven epochs, missing timings: the batched summary's inputs."""
    for lr in (0.1, 0.2, 0.3):
        for ordering in ("rr", "so", "cd-grab"):
            for seed in range(int(rng.integers(1, 5))):
                trial_id = f"{ordering}-{lr}-{seed}"
                results.write_trial(root, trial_row(trial_id, ordering=ordering, seed=seed, lr=lr))
                for epoch in range(int(rng.integers(3, 7))):
                    seconds = None if rng.random() < 0.1 else float(rng.random())
                    loss = float(np.exp(-epoch * rng.uniform(0.2, 0.6)) + rng.normal(0, 0.02))
                    results.write_epoch(
                        root,
                        {"trial_id": trial_id, "sweep": "s", "epoch": epoch, "train_loss": loss,
                         "epoch_seconds": seconds},
                    )  # fmt: skip


def test_batched_summary_equals_the_per_ordering_bootstrap(tmp_path: Path) -> None:
    root = str(tmp_path)
    random_fixture(root, np.random.default_rng(7))
    df = results.summary(root)
    trials = results.trials(root)[["trial_id", "ordering", "lr"]]
    curves = results.epochs(root).drop(columns="lr").merge(trials, on="trial_id")

    def runs(ordering: str, lr: float) -> stats.Runs:
        rows = curves[(curves["ordering"] == ordering) & (curves["lr"] == lr)].sort_values(
            ["trial_id", "epoch"]
        )
        seeds = {t: i for i, t in enumerate(sorted(rows["trial_id"].unique()))}
        shape = (len(seeds), int(rows["epoch"].max()) + 1)
        losses, seconds = np.full(shape, np.nan), np.full(shape, np.nan)
        index = (rows["trial_id"].map(seeds).to_numpy(), rows["epoch"].to_numpy())
        losses[index] = rows["train_loss"].to_numpy(dtype=float, na_value=np.nan)
        seconds[index] = rows["epoch_seconds"].to_numpy(dtype=float, na_value=np.nan)
        finals = rows.groupby("trial_id")["train_loss"].last().loc[sorted(seeds)].to_numpy()
        return stats.Runs(losses, seconds, finals)

    checked = 0
    for _, row in df.iterrows():
        own, base = runs(row["ordering"], row["lr"]), runs("rr", row["lr"])
        expected = stats.speedup_vs_baseline(base, own, same=row["ordering"] == "rr")
        speedups = ["speedup", "speedup_ci_low", "speedup_ci_high", "time_speedup", "time_speedup_ci_low"]
        got = [
            row["epochs_to_baseline"],
            row["seconds_to_baseline"],
            *row[[*speedups, "time_speedup_ci_high"]],
        ]
        np.testing.assert_allclose(got, list(vars(expected).values()), rtol=1e-12)
        assert row["final_train_loss_ci95"] == pytest.approx(
            stats.t_ci_halfwidth(own.finals), rel=1e-12, nan_ok=True
        )
        checked += not math.isnan(expected.speedup_ci_low)
    assert len(df) == 9 and checked >= 3  # several rows with a bootstrap interval


def test_best_trials_picks_each_grid_points_best_completed_trial_at_its_last_epoch(tmp_path: Path) -> None:
    root = str(tmp_path)
    # A search: lr sampled per ordering (the grid axis); finals by hand below.
    searched = {
        ("rr", "a"): (0.01, "completed", [2.0, 1.5]),  # final 1.5
        ("rr", "b"): (0.1, "completed", [2.0, 0.5, 0.25]),  # final 0.25: rr's best
        ("rr", "c"): (0.9, "diverged", [0.0]),  # lower, but not completed
        ("cd-grab", "a"): (
            0.01,
            "completed",
            [2.0, 0.75],
        ),  # final 0.75: cd-grab's best (ties a lower trial_id)
        ("cd-grab", "b"): (0.1, "completed", [0.1, 0.75]),  # final 0.75, not its lowest epoch
        ("cd-grab", "c"): (0.5, "stopped", [0.5]),  # stopped by a scheduler: not completed
    }
    for (ordering, name), (lr, status, losses) in searched.items():
        trial_id = f"{ordering}-{name}"
        results.write_trial(
            root,
            trial_row(
                trial_id, ordering=ordering, lr=lr, status=status,
                grid_point_json=json.dumps({"ordering.name": ordering}),
                searched_json=json.dumps({"train.lr": lr, "train": {"momentum": 0.9}}),
            ),
        )  # fmt: skip
        for epoch, loss in enumerate(losses):
            results.write_epoch(
                root, {"trial_id": trial_id, "sweep": "s", "epoch": epoch, "train_loss": loss}
            )
    write_fixture(str(tmp_path / "older"))  # rows written before grid_point_json existed are left out
    assert results.best_trials(str(tmp_path / "older")).empty

    best = results.best_trials(root, sweep="s")
    assert best.columns.tolist() == [
        "sweep", "ordering.name", "train.lr", "train", "trial_id", "train_loss", "epochs_done", "num_trials",
    ]  # fmt: skip
    assert best.drop(columns=["sweep", "train"]).values.tolist() == [
        ["cd-grab", 0.01, "cd-grab-a", 0.75, 2, 3],
        ["rr", 0.1, "rr-b", 0.25, 3, 3],
    ]
    assert json.loads(best["train"][0]) == {"momentum": 0.9}  # a section's value, as JSON
    assert results.best_trials(root, sweep="s", mode="max")["trial_id"].tolist() == ["cd-grab-a", "rr-a"]
    assert results.best_trials(root, sweep="other").empty
    with pytest.raises(OrderlabError, match="metric='loss'.*use metric train_loss, val_loss or val_metric"):
        results.best_trials(root, metric="loss")


def test_cli_results_prints_a_searchs_best_trials_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    search, grid = str(tmp_path / "search"), str(tmp_path / "grid")
    for trial_id, lr, loss in (("a", 0.01, 0.5), ("b", 0.1, 0.25)):
        row = trial_row(trial_id, ordering="rr", lr=lr, grid_point_json='{"ordering.name": "rr"}')
        results.write_trial(search, {**row, "searched_json": json.dumps({"train.lr": lr})})
        results.write_epoch(search, {"trial_id": trial_id, "sweep": "s", "epoch": 0, "train_loss": loss})
    write_fixture(grid)
    assert cli.main(["results", search]) == 0
    lines = capsys.readouterr().out.splitlines()
    best = lines.index("best completed trial of each grid point:")
    assert lines[best + 1].split() == [
        "ordering.name",
        "train.lr",
        "trial_id",
        "train_loss",
        "epochs_done",
        "num_trials",
    ]
    assert lines[best + 2].split() == ["rr", "0.1", "b", "0.25", "1", "2"]
    assert cli.main(["results", grid]) == 0
    assert "best completed trial" not in capsys.readouterr().out


def test_summary_and_best_trials_query_a_given_connection_and_leave_it_open(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)

    def write_searched(trial_id: str, loss: float) -> None:
        row = trial_row(trial_id, sweep="g", ordering="rr", grid_point_json='{"ordering.name": "rr"}')
        results.write_trial(root, {**row, "searched_json": "{}"})
        results.write_epoch(root, {"trial_id": trial_id, "sweep": "g", "epoch": 0, "train_loss": loss})

    write_searched("early", 0.5)
    with results.connect(root) as con:
        write_searched("late", 0.25)  # after connect: that connection does not see it
        assert results.best_trials(root, sweep="g", con=con)["trial_id"].tolist() == ["early"]
        assert results.best_trials(root, sweep="g")["trial_id"].tolist() == ["late"]
        for _ in range(2):  # the summary's temporary tables are replaced on a reused connection
            pd.testing.assert_frame_equal(
                results.summary(root, sweep="s", con=con), results.summary(root, sweep="s")
            )
        assert con.execute("SELECT count(*) FROM trials WHERE sweep = 'g'").fetchone() == (1,)


def test_compact_of_a_sweep_with_no_files_is_an_error_unless_missing_ok(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_fixture(root)
    with pytest.raises(OrderlabError, match="no sweep 'u' under results root"):
        results.compact(root, sweep="u")
    assert results.compact(root, sweep="u", missing_ok=True).sweeps == []
    assert (tmp_path / "epochs/s/rr-0").is_dir()  # other sweeps untouched
