"""CLI behaviour that needs no Ray: help with examples, and bad input -> exit 2, one message, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orderlab.cli import main

CLI = [sys.executable, "-m", "orderlab"]


@pytest.mark.parametrize("command", ["run", "sweep", "results"])
def test_help_shows_an_example(command, capsys):
    assert main([command, "--help"]) == 0
    assert "Example: orderlab" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "needle"),
    [
        ("task: {name: digits-logreg}\ntrain: {epochs: [\n", [], "line"),
        ("task: {name: digits-logreg}\ntrian: {}\n", [], "trian"),
        ("task: {name: digits-logreg}\nordering: {name: grabby}\n", [], "cd-grab"),
        ("task: {name: nope}\n", [], "digits-logreg"),
        ("task: {name: digits-logreg}\ntrain: {batch_size: 30, num_workers: 4}\n", [], "train.batch_size"),
        ("task: {name: digits-logreg}\n", ["train.lr_schedule=sawtooth"], "cosine"),
        ("task: {name: digits-logreg}\n", ["train.unknown=1"], "train.unknown"),
        pytest.param(  # the training set's size comes from the data file
            "task: {name: digits-logreg}\ntrain: {batch_size: 2000, num_workers: 2}\n",
            [],
            "fewer than",
            marks=pytest.mark.datasets,
        ),
        ("task: {name: digits-logreg, options: {depth: 3}}\n", [], "task.options.depth"),
    ],
)
def test_bad_input_exits_2_with_one_clear_message(tmp_path, yaml_text, overrides, needle):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    args = [*CLI, "sweep", str(config), "--set", f"storage={tmp_path / 'out'}"]
    for override in overrides:
        args += ["--set", override]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("orderlab: error:")
    assert needle in done.stderr
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


@pytest.mark.parametrize("args", [["run", "--bogus", "c.yaml"], ["data", "check", "--bogus"], []])
def test_a_usage_error_exits_2_without_a_traceback(args, capsys):
    assert main(args) == 2  # typer 0.26 raises its own copy of click's exceptions, which main misses
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("No such option" in err and "--bogus" in err or not args)


def test_missing_config_file_is_named(tmp_path, capsys):
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in capsys.readouterr().err


def test_missing_data_file_names_file_and_source(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"task: {{name: digits-logreg, data_dir: {tmp_path / 'empty'}}}\nstorage: {tmp_path / 'out'}\n"
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "digits.csv.gz" in err and "sha256" in err and "scikit-learn" in err


def test_sql_error_is_a_clean_error(tmp_path, capsys):
    assert main(["results", str(tmp_path), "--sql", "SELECT nonsense FROM nowhere"]) == 2
    assert "--sql failed" in capsys.readouterr().err


@pytest.mark.datasets  # the sweep reads the task's data before it checks this
def test_unwritable_storage_is_named_and_nothing_runs(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = tmp_path / "c.yaml"
    config.write_text(f"task: {{name: digits-logreg}}\nstorage: {blocker / 'results'}\n")
    assert main(["sweep", str(config)]) == 2
    err = capsys.readouterr().err
    assert "storage=" in err and "not writable" in err
    assert blocker.read_text() == "not a directory"  # nothing already there is touched


@pytest.mark.datasets  # the sweep reads the task's data before it checks this
def test_per_example_units_with_batchnorm_name_the_fix(tmp_path, capsys):
    from torch import nn

    from orderlab.tasks import TASKS, register_task
    from orderlab.tasks.digits import DigitsLogReg

    @register_task("digits-batchnorm-test")
    class DigitsBatchNorm(DigitsLogReg):
        def make_model(self) -> nn.Module:
            return nn.Sequential(nn.Linear(64, 10), nn.BatchNorm1d(10))

    try:
        config = tmp_path / "c.yaml"
        config.write_text(
            f"task: {{name: digits-batchnorm-test}}\nordering: {{name: cd-grab}}\nstorage: {tmp_path / 'out'}\n"
        )
        assert main(["sweep", str(config)]) == 2
        err = capsys.readouterr().err
        assert "BatchNorm1d" in err and "microbatch" in err
        assert not (tmp_path / "out").exists()
    finally:
        del TASKS["digits-batchnorm-test"]
