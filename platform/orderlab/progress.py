"""Live console progress of a sweep, as a Tune callback.

On a terminal, a ``rich`` table redrawn in place: per running trial its swept values, epoch / total,
last train loss and elapsed seconds, under a line of trials done / running / pending. Elsewhere (a
log file, CI) the same counts as a plain line every ``interval`` seconds. Either way one line per
finished trial; ``quiet`` keeps only those.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


def describe(point: Mapping[str, Any], keys: list[str] | None = None) -> str:
    """``key=value`` of ``point`` (only ``keys`` when given), floats to 4 significant digits."""
    shown = [(k, point[k]) for k in (keys if keys is not None else point) if k in point]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown) or "trial"


def ended_before_last_epoch(trial: Trial, epochs: int) -> bool:
    """Whether Tune's last result of ``trial`` is from an epoch before its last (of ``epochs``): a
    scheduler stopped it, or it diverged, when Tune reports it complete. False without a result."""
    done = (trial.last_result or {}).get("epochs_done")
    return done is not None and done < epochs


class Progress(tune.Callback):
    """Prints a sweep's progress (see the module docstring).

    Args:
        epochs_of: a trial's total epochs from its config (the Tune trial's dotted overrides).
        total: trials the sweep will run (for the counts line).
        keys: the swept keys each trial is named by.
        quiet: only one line per finished trial.
        console: where to print (default: stdout); a terminal gets the live table.
        interval: seconds between plain status lines when not on a terminal.
    """

    def __init__(
        self,
        epochs_of: Callable[[Mapping[str, Any]], int],
        total: int,
        keys: list[str],
        *,
        quiet: bool = False,
        console: Console | None = None,
        interval: float = 10.0,
    ) -> None:
        self.epochs_of, self.total, self.keys, self.quiet = epochs_of, total, keys, quiet
        self.console = console or Console(highlight=False)
        self.interval = interval
        self.started: dict[str, float] = {}
        self.finished = 0
        self.live: Live | None = None
        self.last_line = self.last_draw = 0.0

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with the experiment's state: without the console and live table."""
        return {**self.__dict__, "console": None, "live": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.console = Console(highlight=False)

    def outcome(self, trial: Trial) -> str:
        """``stopped`` when the trial ended before its last epoch (a scheduler stopped it), else ``done``."""
        return "stopped" if ended_before_last_epoch(trial, self.epochs_of(trial.config)) else "done"

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.started.setdefault(trial.trial_id, time.monotonic())

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        self.finished += 1
        self.console.print(
            f"{self.outcome(trial):<7} {describe(trial.config, self.keys)}  "
            f"epochs={result.get('epochs_done', 0)}/{self.epochs_of(trial.config)}  "
            f"train_loss={result.get('train_loss', float('nan')):.4f}  "
            f"val_metric={result.get('val_metric', float('nan')):.4f}",
            soft_wrap=True,
        )
        self.refresh(trials)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.finished += 1
        self.console.print(
            f"ERROR   {describe(trial.config, self.keys)}  (see the trials table's error column)",
            soft_wrap=True,
        )
        self.refresh(trials)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        self.refresh(trials)

    def on_step(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self.refresh(trials)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        if self.live is not None:
            self.live.update(self.table(trials), refresh=True)
            self.live.stop()
            self.live = None

    def counts(self, trials: list[Trial]) -> str:
        """``trials: D done, R running, P pending (of N)``."""
        running = sum(t.status == Trial.RUNNING for t in trials)
        pending = max(self.total - self.finished - running, 0)
        return f"trials: {self.finished} done, {running} running, {pending} pending (of {self.total})"

    def table(self, trials: list[Trial]) -> Group:
        """The live view: the counts line over a table of one row per running trial."""
        table = Table(expand=False)
        for column in ("trial", "epoch", "train loss", "elapsed s"):
            table.add_column(column, justify="left" if column == "trial" else "right")
        now = time.monotonic()
        for trial in trials:
            if trial.status != Trial.RUNNING:
                continue
            result = trial.last_result or {}
            loss = result.get("train_loss")
            table.add_row(
                describe(trial.config, self.keys),
                f"{result.get('epochs_done', 0)}/{self.epochs_of(trial.config)}",
                "-" if loss is None else f"{loss:.4f}",
                f"{now - self.started.get(trial.trial_id, now):.0f}",
            )
        return Group(Text(self.counts(trials)), table)

    def refresh(self, trials: list[Trial]) -> None:
        """Redraw the live table (terminal) or print the counts line when ``interval`` has passed."""
        now = time.monotonic()
        if self.quiet or now - self.last_draw < 0.25:
            return
        self.last_draw = now
        if self.console.is_terminal:
            if self.live is None:
                self.live = Live(console=self.console, auto_refresh=False, transient=False)
                self.live.start()
            self.live.update(self.table(trials), refresh=True)
            return
        if now - self.last_line >= self.interval:
            self.last_line = now
            running = [t for t in trials if t.status == Trial.RUNNING]
            parts = [
                f"{describe(t.config, self.keys)} epoch {(t.last_result or {}).get('epochs_done', 0)}"
                f"/{self.epochs_of(t.config)}"
                for t in running
            ]
            self.console.print(
                f"{self.counts(trials)}" + (f"; {'; '.join(parts)}" if parts else ""), soft_wrap=True
            )
