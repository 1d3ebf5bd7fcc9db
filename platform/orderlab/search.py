"""A sweep's search, scheduler and trackers as Ray Tune's own objects (``sweep.search``,
``sweep.scheduler``, ``tracking``; docs/search.md).

Grid axes are crossed with the search: ``GridPointSearch`` runs one searcher (Optuna, HyperOpt, or
any Tune ``Searcher``) per grid point, ``num_samples`` trials each, so every ordering gets its own
search. Random search is Tune's ``BasicVariantGenerator``, which crosses grids with sampled spaces
itself. Schedulers judge trials by ``epochs_done`` (epochs trained, reported with every epoch row).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

from ray import tune
from ray.tune.schedulers import (
    AsyncHyperBandScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    TrialScheduler,
)
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, Searcher
from ray.tune.search.sample import Domain

from orderlab.config import SchedulerConfig, SearchConfig, grid_values, space_kind
from orderlab.errors import OrderlabError

#: the result key schedulers count time in: epochs trained so far (epoch + 1)
TIME_ATTR = "epochs_done"
#: the extra (``pip install 'orderlab[EXTRA]'``) that installs each optional package
EXTRAS = {"optuna": "search", "hyperopt": "search", "mlflow": "tracking", "wandb": "tracking"}


def require(package: str, key: str) -> None:
    """Import ``package`` or fail naming the config key that needs it and the extra that installs it.

    Raises:
        OrderlabError: ``package`` is not installed.
    """
    try:
        __import__(package)
    except ImportError as error:
        raise OrderlabError(
            f"{key} needs the {package!r} package, which is not installed ({error}); install it with "
            f"pip install 'orderlab[{EXTRAS[package]}]'"
        ) from None


def tune_space(value: Any) -> Any:
    """A checked sweep axis value as Tune's: a list or ``{grid: [...]}`` becomes ``tune.grid_search``;
    ``{choice: [...]}``, ``{uniform: [a, b]}``, ``{loguniform: [a, b]}``, ``{randint: [a, b]}`` (b
    excluded) become ``tune.choice``, ``tune.uniform``, ``tune.loguniform``, ``tune.randint``."""
    kind = space_kind(value)
    if kind == "grid":
        return tune.grid_search(grid_values(value))
    args = value[kind]
    if kind == "choice":
        return tune.choice(list(args))
    makers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    return makers[kind](*args)


def split_space(space: Mapping[str, Any]) -> tuple[dict[str, list[Any]], dict[str, Domain], dict[str, Any]]:
    """A Tune param space by dotted key as (grid axes with their values, sampled ``Domain`` axes,
    constants)."""
    grid, sampled, constants = {}, {}, {}
    for key, value in space.items():
        if isinstance(value, Mapping) and set(value) == {"grid_search"}:
            grid[key] = list(value["grid_search"])
        elif isinstance(value, Domain):
            sampled[key] = value
        else:
            constants[key] = value
    return grid, sampled, constants


class GridPointSearch(Searcher):
    """One ``searcher`` per grid point, ``num_samples`` trials each: the search never sees the grid.

    Suggestions take the grid points in turn (the first point with trials left after the last one
    served), so with ``max_concurrent_trials`` every point's search advances together. Each grid
    point's searcher is a deep copy of ``searcher`` (the same seed gives each point the same first
    suggestions), set up with ``space``; results go back to the searcher that suggested the trial.

    Args:
        searcher: a Tune ``Searcher`` not yet given a space (``OptunaSearch(seed=0)``), or given one.
        grid: the grid points, each a dict of dotted overrides; ``[{}]`` for no grid.
        space: the sampled axes by dotted key (Tune ``Domain``s). num_samples: trials per grid point.
        metric, mode: what the searchers optimise (``train_loss``, ``min``).
    """

    def __init__(
        self,
        searcher: Searcher,
        grid: list[dict[str, Any]],
        space: dict[str, Domain],
        num_samples: int,
        metric: str,
        mode: str,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.grid = [dict(point) for point in grid] or [{}]
        self.searchers = [copy.deepcopy(searcher) for _ in self.grid]
        for each in self.searchers:
            each.set_search_properties(metric, mode, dict(space))
        self.num_samples = num_samples
        self.started = [0] * len(self.grid)
        self.owner: dict[str, int] = {}
        self.turn = 0

    @property
    def total_trials(self) -> int:
        """Trials over all grid points: ``len(grid) * num_samples``."""
        return len(self.grid) * self.num_samples

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # set up at construction; the Tuner's param space holds constants only

    def suggest(self, trial_id: str) -> dict | None:  # or Searcher.FINISHED, as Tune's own searchers
        """The next trial's config (grid point plus its searcher's suggestion), None while every
        point with trials left waits for results, FINISHED when all points have their trials."""
        count = len(self.grid)
        for step in range(count):
            point = (self.turn + step) % count
            if self.started[point] >= self.num_samples:
                continue
            suggestion = self.searchers[point].suggest(trial_id)
            if suggestion == Searcher.FINISHED:
                self.started[point] = self.num_samples
                continue
            if suggestion is None:
                continue
            self.started[point] += 1
            self.owner[trial_id] = point
            self.turn = (point + 1) % count
            return {**self.grid[point], **suggestion}
        finished = min(self.started) >= self.num_samples
        return Searcher.FINISHED if finished else None  # type: ignore[return-value]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        point = self.owner.pop(trial_id, None)
        if point is not None:
            self.searchers[point].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        """One zip file: the turn-taking state as JSON, and each grid point's searcher as its own
        ``save`` writes it (Tune's searchers choose their format; this module never unpickles)."""
        state = {"started": self.started, "owner": self.owner, "turn": self.turn}
        with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(checkpoint_path, "w") as archive:
            archive.writestr("state.json", json.dumps(state))
            for point, searcher in enumerate(self.searchers):
                path = os.path.join(scratch, f"point-{point}")
                searcher.save(path)
                archive.write(path, f"point-{point}")

    def restore(self, checkpoint_path: str) -> None:
        """Undo ``save`` into this search, whose grid and searchers are the saved sweep's."""
        with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(checkpoint_path) as archive:
            state = json.loads(archive.read("state.json"))
            for point, searcher in enumerate(self.searchers):
                searcher.restore(archive.extract(f"point-{point}", scratch))
        self.started, self.owner, self.turn = state["started"], state["owner"], state["turn"]


def make_searcher(search: SearchConfig) -> Searcher | None:
    """Tune's searcher for ``sweep.search.algorithm`` (None for ``random``), seeded with ``search.seed``.

    Raises:
        OrderlabError: the algorithm's package is not installed (naming the extra that installs it).
    """
    key = f"sweep.search.algorithm={search.algorithm}"
    if search.algorithm == "optuna":
        require("optuna", key)
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=search.metric, mode=search.mode, seed=search.seed)
    if search.algorithm == "hyperopt":
        require("hyperopt", key)
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=search.metric, mode=search.mode, random_state_seed=search.seed)
    return None


def search_plan(
    space: Mapping[str, Any],
    searcher: Searcher | SearchAlgorithm | None,
    num_samples: int,
    metric: str,
    mode: str,
    seed: int | None,
    max_concurrent: int = 0,
) -> tuple[SearchAlgorithm | Searcher, dict[str, Any], int]:
    """(search algorithm, the Tuner's param space, the Tuner's num_samples) for a param space.

    ``searcher`` None: Tune's ``BasicVariantGenerator`` (seeded with ``seed``, at most
    ``max_concurrent`` trials at once; 0: no limit) over the whole space, each grid point
    ``num_samples`` times. A ``Searcher``: a ``GridPointSearch`` of it (the Tuner's space keeps the
    constants; Tune limits its concurrency). Any other ``SearchAlgorithm`` is used as it is.
    """
    if searcher is None:
        generator = BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
        return generator, dict(space), num_samples
    if not isinstance(searcher, Searcher):
        return searcher, dict(space), num_samples
    grid, sampled, constants = split_space(space)
    keys = list(grid)
    points: list[dict[str, Any]] = [{}]
    for key in keys:
        points = [{**point, key: value} for point in points for value in grid[key]]
    search = GridPointSearch(searcher, points, sampled, num_samples, metric, mode)
    return search, constants, search.total_trials


def make_scheduler(scheduler: SchedulerConfig, max_epochs: int) -> TrialScheduler | None:
    """Tune's scheduler for ``sweep.scheduler`` (None for ``fifo``), in epochs (``TIME_ATTR``).

    A trial is never stopped for reaching ``max_epochs``: it ends on its own at its last epoch.

    Raises:
        OrderlabError: ``grace_period`` is not below ``max_epochs``.
    """
    name = scheduler.name
    if name == "fifo":
        return None
    if name in ("asha", "median-stopping") and scheduler.grace_period >= max_epochs:
        raise OrderlabError(
            f"sweep.scheduler.grace_period={scheduler.grace_period} must be < train.epochs={max_epochs}: "
            "a trial must train that many epochs before it can be stopped"
        )
    common: dict[str, Any] = {"time_attr": TIME_ATTR, "metric": scheduler.metric, "mode": scheduler.mode}
    if name == "asha":
        return AsyncHyperBandScheduler(
            **common,
            max_t=max_epochs,
            grace_period=scheduler.grace_period,
            reduction_factor=scheduler.reduction_factor,
            brackets=scheduler.brackets,
            stop_last_trials=False,
        )
    if name == "median-stopping":
        return MedianStoppingRule(
            **common, grace_period=scheduler.grace_period, min_samples_required=scheduler.min_samples_required
        )
    return HyperBandScheduler(
        **common, max_t=max_epochs, reduction_factor=scheduler.reduction_factor, stop_last_trials=False
    )


def tracking_callbacks(trackers: Sequence[str], name: str, root: str) -> list[tune.Callback]:
    """Tune's logger callback of each tracker: one run per trial, every epoch metric, the trial's
    swept values as params.

    mlflow: ``MLflowLoggerCallback``, experiment ``name``, tracking URI ``MLFLOW_TRACKING_URI`` or
    ``sqlite:///{root}/mlflow.db``. tensorboard: ``TBXLoggerCallback``, event files in each trial's
    directory under ``{root}/_tune/{name}/``. wandb: ``WandbLoggerCallback``, project ``name``,
    offline under ``{root}/wandb`` unless ``WANDB_API_KEY`` is set or ``wandb login`` was run.

    Raises:
        OrderlabError: a tracker's package is missing, or mlflow has no local root for its default store.
    """
    callbacks: list[tune.Callback] = []
    local = "://" not in root
    for tracker in dict.fromkeys(trackers):
        if tracker == "mlflow":
            require("mlflow", "tracking: mlflow")
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if uri is None and not local:
                raise OrderlabError(
                    f"tracking: mlflow keeps its runs under a local storage root by default, but storage={root!r}; "
                    "set MLFLOW_TRACKING_URI to your MLflow server"
                )
            callbacks.append(
                MLflowLoggerCallback(
                    tracking_uri=uri or f"sqlite:///{root}/mlflow.db",
                    experiment_name=name,
                    save_artifact=False,
                )
            )
        elif tracker == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            callbacks.append(TBXLoggerCallback())
        elif tracker == "wandb":
            require("wandb", "tracking: wandb")
            from ray.air.integrations.wandb import WandbLoggerCallback

            options: dict[str, Any] = {}
            if not wandb_logged_in():
                os.environ.setdefault("WANDB_MODE", "offline")
                options["mode"] = "offline"
            if local:
                os.makedirs(f"{root}/wandb", exist_ok=True)
                options["dir"] = f"{root}/wandb"
            callbacks.append(WandbLoggerCallback(project=name, **options))
    return callbacks


def wandb_logged_in() -> bool:
    """Whether W&B credentials are set: ``WANDB_API_KEY``, or a key saved by ``wandb login``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))  # a key from `wandb login`, not checked online
    except Exception:  # no key anywhere: wandb raises its own errors
        return False
