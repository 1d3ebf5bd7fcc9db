"""orderlab.progress: the live table on a terminal, plain lines elsewhere, --quiet; no Ray cluster.

Tune hands its callbacks ``Trial`` objects; these tests give the callback stand-ins with the four
attributes it reads (trial_id, config, status, last_result)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from ray import cloudpickle
from ray.tune.experiment import Trial
from rich.console import Console

from orderlab.progress import Progress


def trial(trial_id: str, lr: float, status: str, epochs_done: int, loss: float) -> SimpleNamespace:
    config = {"ordering.name": "rr", "train.lr": lr, "task.name": "digits-logreg"}
    result = {"epochs_done": epochs_done, "train_loss": loss, "val_metric": 0.9}
    return SimpleNamespace(trial_id=trial_id, config=config, status=status, last_result=result)


def progress(terminal: bool, quiet: bool = False) -> tuple[Progress, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200, highlight=False)
    callback = Progress(
        lambda c: 3, total=3, keys=["ordering.name", "train.lr"], quiet=quiet, console=console
    )
    return callback, out


def run(callback: Progress) -> list[SimpleNamespace]:
    """Two trials run; one is stopped after epoch 1, one completes; a third is still pending."""
    a, b = trial("a", 0.1, Trial.RUNNING, 1, 1.5), trial("b", 0.01, Trial.RUNNING, 2, 0.75)
    trials = [a, b]
    for t in trials:
        callback.on_trial_start(0, trials, t)
    callback.on_step(1, trials)
    a.status = Trial.TERMINATED
    callback.on_trial_complete(2, trials, a)
    b.last_result = {"epochs_done": 3, "train_loss": 0.5, "val_metric": 0.95}
    b.status = Trial.TERMINATED
    callback.on_trial_complete(3, trials, b)
    callback.on_experiment_end(trials)
    return trials


def test_plain_lines_when_not_a_terminal() -> None:
    callback, out = progress(terminal=False)
    run(callback)
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "trials: 0 done, 2 running, 1 pending (of 3); ordering.name=rr train.lr=0.1 epoch 1/3; "
        "ordering.name=rr train.lr=0.01 epoch 2/3"
    )
    assert (
        lines[1] == "stopped ordering.name=rr train.lr=0.1  epochs=1/3  train_loss=1.5000  val_metric=0.9000"
    )
    assert (
        lines[2] == "done    ordering.name=rr train.lr=0.01  epochs=3/3  train_loss=0.5000  val_metric=0.9500"
    )
    assert len(lines) == 3  # the next status line waits for the interval


def test_quiet_keeps_one_line_per_finished_trial() -> None:
    callback, out = progress(terminal=False, quiet=True)
    run(callback)
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["stopped", "done"]


def test_a_terminal_gets_the_live_table() -> None:
    callback, out = progress(terminal=True)
    run(callback)
    text = out.getvalue()
    assert "trials: 0 done, 2 running, 1 pending (of 3)" in text
    assert "ordering.name=rr train.lr=0.01" in text and "2/3" in text and "0.7500" in text
    assert "trials: 2 done, 0 running, 1 pending (of 3)" in text  # the final table


def test_tune_can_pickle_it_with_the_experiment_state() -> None:
    callback, _ = progress(terminal=True)
    run(callback)
    copy = cloudpickle.loads(cloudpickle.dumps(callback))  # as Tune saves tuner.pkl
    assert copy.finished == 2 and copy.keys == ["ordering.name", "train.lr"] and copy.live is None
