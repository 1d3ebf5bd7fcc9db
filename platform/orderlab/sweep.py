"""Ray Tune sweeps: config -> param space -> one function trainable per trial -> Parquet results.

Train V2 inside Tune, the supported way (docs/architecture.md, "Data flow of one trial"): each Tune trial function creates the
trial's order server (0 CPU, owned by the trial) and a ``TorchTrainer`` named after the trial, and
calls ``fit()``. Rank 0 forwards its per-epoch report to Tune through ``TuneReportCallback``.
Only this module and the CLI call ``ray.init``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import BasicVariantGenerator

from orderlab import results
from orderlab.config import ExperimentConfig, config_to_dict, load_config, validate, validate_grid
from orderlab.errors import OrderlabError
from orderlab.grads import num_parameters, vmap_problem
from orderlab.loop import TrialPlan, build_model, load_checkpoint, ordering_spec, plan_trial, save_checkpoint
from orderlab.orderings import ordering_class
from orderlab.progress import Progress, ended_before_last_epoch
from orderlab.search import (
    GridPointSearch,
    make_scheduler,
    make_searcher,
    search_plan,
    split_space,
    tracking_callbacks,
    tune_space,
)
from orderlab.server import RemoteOrderServer
from orderlab.simulated import run_simulated_trial
from orderlab.source import source_commit
from orderlab.tasks import load_task_data, make_task, resolve_data_dir
from orderlab.worker import train_loop

if TYPE_CHECKING:
    # ray.train and ray.train.torch bind these names to Ray Train v2's classes at run time only (when
    # ray.train.v2's is_v2_enabled(), the default), so a type checker sees v1's; v2 is what runs
    # here (Result.return_value, TuneReportCallback)
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer
else:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

#: seconds Tune waits for a stopped trial's process to end before it kills it: a trial the scheduler
#: stops waits in its epoch report, so it never ends by itself (Tune's default is 600)
CLEANUP_SECONDS = "5"
#: environment for every Ray process of a sweep; RAY_TRAIN_* reach the Train controller and workers
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


@dataclass(frozen=True)
class SweepResult:
    """What a finished sweep produced.

    Attributes:
        name: the sweep name. storage: the results root (absolute path or URI).
        num_trials / num_errors / num_stopped: trials run, trials that ended in error, trials the
            scheduler stopped early.
        summary: ``orderlab.results.summary`` of the sweep (one row per ordering and setting).
        best: ``orderlab.results.best_trials`` of the sweep by the search's metric: the best
            completed trial of each grid point (empty when no trial completed).
    """

    name: str
    storage: str
    num_trials: int
    num_errors: int
    summary: pd.DataFrame
    num_stopped: int = 0
    best: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass(frozen=True)
class TaskFacts:
    """What the driver learns from a task before any trial: training-set size (as arranged for the
    trial's workers and batch), gradient length, the units it supports, and why per-example
    gradients are impossible (None when ``vmap`` can split the model)."""

    num_examples: int
    dim: int
    supported_units: tuple[str, ...]
    not_vmappable: str | None


def results_root(storage: str) -> str:
    """``storage`` as an absolute local path or an unchanged URI (Train workers chdir elsewhere)."""
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def storage_location(storage: str) -> tuple[pafs.FileSystem | None, str]:
    """Where Tune and Train keep their state: (None, absolute path) for local storage, else the
    pyarrow filesystem of the URI and its path (query parameters such as ``endpoint_override``
    configure the filesystem, so they never end up inside Ray's paths)."""
    root = results_root(storage)
    if "://" not in root:
        return None, root
    filesystem, path = pafs.FileSystem.from_uri(root)
    return filesystem, path.rstrip("/")


def inspect_tasks(points: list[ExperimentConfig]) -> dict[str, TaskFacts]:
    """Load each task's data and model once to size every trial's shards and gradients (the sizes
    do not depend on the seed: trials of every seed share one load).

    Raises:
        OrderlabError: unknown task or option, missing or corrupt data files.
    """
    loaded: dict[str, tuple[Any, Any, Any]] = {}
    facts: dict[str, TaskFacts] = {}
    for point in points:
        source = json.dumps(
            [point.task.name, point.task.options, point.task.data_dir, point.task.train_examples], default=str
        )
        if source not in loaded:
            task = make_task(point.task.name, point.task.options)
            loaded[source] = (
                task,
                load_task_data(task, point.task.data_dir, point.task.train_examples),
                build_model(task, seed=0),  # for its size and vmap-ability, the same at every seed
            )
        task, data, model = loaded[source]
        key = task_key(point)
        if key not in facts:
            arranged = task.arrange(data, point.train.num_workers, point.train.microbatch_size)
            facts[key] = TaskFacts(
                len(arranged.train_targets),
                num_parameters(model),
                tuple(task.supported_units),
                vmap_problem(model),
            )
    return facts


def provenance() -> dict[str, str | None]:
    """Versions and the git commit that the trials table records."""
    return {
        "orderlab_version": metadata.version("orderlab"),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "git_commit": source_commit(),
    }


def _numpy_scalar(value: Any) -> Any:
    """A numpy scalar (Tune's samplers return them) as the Python number ``json.dumps`` takes."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def trial_row(cfg: ExperimentConfig, trial_id: str, shard_size: int, num_dropped: int) -> dict[str, Any]:
    """The trials-table row of a trial that is about to start."""
    train = cfg.train
    return {
        "trial_id": trial_id,
        "sweep": cfg.name,
        "task": cfg.task.name,
        "ordering": cfg.ordering.name,
        "unit": train.unit,
        "num_workers": train.num_workers,
        "batch_size": train.batch_size,
        "microbatch_size": train.microbatch_size,
        "optimizer": train.optimizer,
        "lr": train.effective_lr,
        "lr_schedule": train.lr_schedule.name,
        "momentum": train.momentum,
        "weight_decay": train.weight_decay,
        "seed": cfg.seed,
        "epochs": train.epochs,
        "backend": train.backend,
        "shard_size": shard_size,
        "num_dropped": num_dropped,
        "status": "running",
        "started_at": datetime.now(UTC),
        "config_json": json.dumps(config_to_dict(cfg)),
    }


def run_trial(
    point: dict[str, Any],
    *,
    base: dict[str, Any],
    facts: dict[str, TaskFacts],
    info: dict[str, Any],
    grid_keys: Sequence[str] = (),
    searched_keys: Sequence[str] = (),
) -> None:
    """The Tune function trainable: one trial = one order server + one ``TorchTrainer.fit()``
    (``train.backend: ray-train``), or all workers in this process (``simulated``).

    Args:
        point: this trial's dotted overrides (from the param space).
        base: the sweep's config as a dict. facts: ``TaskFacts`` by task key. info: provenance.
        grid_keys, searched_keys: the sweep's grid axes and search-space axes (dotted keys of
            ``point``), recorded as the trial's ``grid_point_json`` and ``searched_json``.
    """
    cfg = validate(base).with_overrides(point)
    trial_id = tune.get_context().get_trial_id()
    ordering = ordering_class(cfg.ordering.name)
    key = task_key(cfg)
    # a sampled size between the ends the sweep was validated with (randint batch_size) has no facts yet
    task_facts = facts[key] if key in facts else inspect_tasks([cfg])[key]
    plan = plan_trial(
        cfg.train, task_facts.num_examples, task_facts.dim, ordering.needs_gradients, ordering.message_kind
    )
    root = results_root(cfg.storage)
    previous = results.read_trial(root, cfg.name, trial_id)
    if previous is not None and previous["status"] in ("completed", "diverged", "stopped"):
        # a resumed sweep whose saved Tune state predates this trial's end: keep its rows, and give
        # Tune (its scheduler and searcher expect the metric) the trial's last epoch again
        last = results.epochs(root, sweep=cfg.name, trial_id=trial_id).tail(1).to_dict("records")
        if last:
            metrics = {key: last[0][key] for key in ("epoch", "train_loss", "val_loss", "val_metric")}
            tune.report({**metrics, "epochs_done": int(last[0]["epoch"]) + 1})
        return
    row = {**trial_row(cfg, trial_id, plan.shard_size, plan.num_dropped), **info}
    if previous is not None and previous["started_at"] is not None:
        row["started_at"] = previous["started_at"]  # resumed from its checkpoint (paused, retried)
    row.update(
        grid_point_json=json.dumps({key: point[key] for key in grid_keys}, default=_numpy_scalar),
        searched_json=json.dumps({key: point[key] for key in searched_keys}, default=_numpy_scalar),
    )
    results.write_trial(root, row)
    error: BaseException | None = None
    try:
        if cfg.train.backend == "simulated":
            row.update(simulated_trial(cfg, plan, trial_id, root))
        else:
            row.update(ray_train_trial(cfg, plan, trial_id, root, row))
    except Exception as failure:  # recorded in the trials table, then re-raised for Tune
        error = failure
        row.update(status="error", error=f"{type(failure).__name__}: {failure}"[:4000])
    current = results.read_trial(root, cfg.name, trial_id)
    # a scheduler's stop (StoppedTrials) is the record, whether ending this Ray Train run raised here
    # or its workers finished anyway
    stopped = current is not None and current["status"] == "stopped"
    if not stopped:
        finished = datetime.now(UTC)
        row.update(finished_at=finished, wall_seconds=(finished - row["started_at"]).total_seconds())
        results.write_trial(root, row)
    results.consolidate_trial(root, cfg.name, trial_id)  # no rank writes its rows any more
    if error is not None and not stopped:
        raise error


def ray_train_trial(
    cfg: ExperimentConfig, plan: TrialPlan, trial_id: str, root: str, row: dict[str, Any]
) -> dict[str, Any]:
    """One trial on Ray Train: the trial's order server and a ``TorchTrainer`` of ``num_workers``
    workers; returns rank 0's outcome (status, node ids, test metrics) and sets ``row``'s server node."""
    # Any: Ray types an actor's methods with .remote only when they are decorated with @ray.method
    server: Any = RemoteOrderServer.remote(
        cfg.ordering.name,
        ordering_spec(cfg, plan),
        payload_dtype=cfg.ordering.payload_dtype,
    )
    resources = cfg.resources
    fs, fs_root = storage_location(cfg.storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config_to_dict(cfg),
            "plan": asdict(plan),
            "server": server,
            "trial_id": trial_id,
            "results_root": root,
        },
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker},
            placement_strategy=resources.placement_strategy,
        ),
        run_config=RunConfig(
            name=f"train-{trial_id}",
            storage_path=f"{fs_root}/_train/{cfg.name}",
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    row["server_node_id"] = ray.get(server.node_id.remote())
    try:
        # status completed or diverged, node ids; Ray's v2 fit() is typed with v1's Result (see the imports)
        return trainer.fit().return_value  # type: ignore[attr-defined]
    finally:
        ray.kill(server)


def simulated_trial(cfg: ExperimentConfig, plan: TrialPlan, trial_id: str, root: str) -> dict[str, Any]:
    """One trial with all its workers in this Tune trial's process: each epoch's row and checkpoint
    go to Tune (``tune.report``), and a retried trial resumes from its last checkpoint."""
    checkpoint = tune.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)

    def report(row: dict[str, Any], epoch_state: dict[str, Any] | None) -> None:
        if epoch_state is None:
            tune.report(row)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(epoch_state, directory)
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(directory))

    outcome = run_simulated_trial(
        cfg, plan, trial_id=trial_id, results_root=root, checkpoint=state, report=report
    )
    node_id = ray.get_runtime_context().get_node_id()
    return {**outcome, "worker_node_ids": [node_id] * plan.num_workers}


def task_key(cfg: ExperimentConfig) -> str:
    """Trials with equal keys share a task's data, its layout over workers, and the model size (the
    seed changes none of them: ``task.train_examples`` is a subset fixed by seed 0)."""
    task, train = cfg.task, cfg.train
    return json.dumps(
        [
            task.name,
            task.options,
            str(resolve_data_dir(task.data_dir)),  # trials get it resolved (see sweep)
            task.train_examples,
            train.num_workers,
            train.batch_size,
        ],
        default=str,
    )


class StoppedTrials(tune.Callback):
    """Records the trials a scheduler stopped: status ``stopped``, the epoch whose report it stopped
    the trial on (``stopped_epoch``), and why.

    Tune calls ``on_trial_complete`` as it decides to stop a trial, before it ends the trial's
    process, and the decision is the record whatever that process does next: a simulated trial waits
    in its epoch report, but a Ray Train trial's workers go on training while Tune decides (Ray Train
    queues their reports), so its ``fit()`` may fail as its worker group goes (the row says ``error``)
    or even finish its last epoch (``completed``). ``run_trial`` leaves a ``stopped`` row as it is,
    and at the sweep's end every stop is written again in case a trial's last write crossed it. A
    trial that ended on its own has written its final status (``diverged`` rows stay).

    Args:
        root, sweep: the results root and the sweep's name.
        scheduler, metric: named in the reason (``stopped by the asha scheduler after epoch 0: ...``).
        epochs_of: a trial's total epochs from its config (the Tune trial's dotted overrides).
    """

    def __init__(
        self,
        root: str,
        sweep: str,
        scheduler: str,
        metric: str,
        epochs_of: Callable[[Mapping[str, Any]], int],
    ) -> None:
        self.root, self.sweep, self.scheduler, self.metric = root, sweep, scheduler, metric
        self.epochs_of = epochs_of
        self.stops: dict[str, dict[str, Any]] = {}  # trial id -> the row's stop columns

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not ended_before_last_epoch(trial, self.epochs_of(trial.config)):
            return
        last = trial.last_result or {}
        epoch, value = last.get("epoch"), last.get(self.metric, float("nan"))
        self.stops[trial.trial_id] = {
            "status": "stopped",
            "stopped_epoch": epoch,
            "error": f"stopped by the {self.scheduler} scheduler after epoch {epoch}: {self.metric}={value:.6g}",
            "finished_at": datetime.now(UTC),
        }
        self.record(trial.trial_id)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial_id in self.stops:
            self.record(trial_id)

    def record(self, trial_id: str) -> None:
        """Writes the trial's stop into its row, unless the row says ``stopped`` or ``diverged``."""
        row = results.read_trial(self.root, self.sweep, trial_id)
        if row is None or row["status"] not in ("running", "error", "completed"):
            return
        stop = self.stops[trial_id]
        started = row["started_at"]
        wall = (stop["finished_at"] - started).total_seconds() if started else None
        results.write_trial(self.root, {**row, **stop, "wall_seconds": wall})


def init_ray(address: str | None, verbose: bool) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start an embedded local Ray; reuse a live one."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    if address is None and "RAY_ADDRESS" not in os.environ:  # an embedded local Ray
        # a trial starts ~2 + num_workers processes at once; let the raylet spawn them without warning
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "8")
    if not verbose:  # the notice that token authentication is on (it stays on)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        address=address,
        dashboard_host="127.0.0.1",
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        runtime_env={"env_vars": RAY_ENV},
    )


def max_concurrent_trials(configs: list[ExperimentConfig]) -> int:
    """How many trials fit the cluster at once, so no trial waits forever for its workers.

    Raises:
        OrderlabError: one trial needs more CPUs or GPUs than the whole cluster has.
    """
    cluster = ray.cluster_resources()
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    fits = []
    for cfg in configs:
        res, workers = cfg.resources, cfg.train.num_workers
        need_cpus = cfg.trial_cpus + cfg.worker_cpus
        need_gpus = cfg.trial_gpus + workers * res.gpus_per_worker
        if need_cpus > cpus + 1e-9 or need_gpus > gpus + 1e-9:
            raise OrderlabError(
                f"a trial with train.num_workers={workers} needs {need_cpus:g} CPUs and {need_gpus:g} GPUs "
                f"(resources.trial_cpus + num_workers × resources.cpus_per_worker / gpus_per_worker; "
                f"train.backend={cfg.train.backend!r}), but the "
                f"cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower train.num_workers or "
                "resources.cpus_per_worker, or use a larger cluster"
            )
        fit = math.floor((cpus + 1e-9) / need_cpus)
        if need_gpus > 0:
            fit = min(fit, math.floor((gpus + 1e-9) / need_gpus))
        fits.append(fit)
    limit = min(fits)
    requested = configs[0].resources.max_concurrent_trials
    return min(limit, requested) if requested else limit


def tracked_constants(cfg: ExperimentConfig, axes: Mapping[str, Any]) -> dict[str, Any]:
    """ordering.name, task.name, train.num_workers and seed where no axis sets them: added to each
    trial's Tune config so that trackers record them as the run's params."""
    values = {
        "ordering.name": cfg.ordering.name,
        "task.name": cfg.task.name,
        "train.num_workers": cfg.train.num_workers,
        "seed": cfg.seed,
    }
    return {key: value for key, value in values.items() if key not in axes and key.split(".")[0] not in axes}


def sweep(
    config: str | Path | ExperimentConfig,
    overrides: Mapping[str, Any] | list[str] | None = None,
    param_space: Mapping[str, Any] | None = None,
    *,
    address: str | None = None,
    verbose: bool = False,
    resume: bool = False,
    search_alg: Any = None,
    scheduler: Any = None,
    num_samples: int | None = None,
    callbacks: list[tune.Callback] | None = None,
    quiet: bool = False,
) -> SweepResult:
    """Run every trial of a sweep on Ray and return its summary.

    Args:
        config: a YAML path or a validated ``ExperimentConfig``.
        overrides: dotted overrides, e.g. ``{"train.epochs": 3}`` or ``["train.epochs=3"]``.
        param_space: extra sweep axes by dotted key: plain lists (grid) or ``ray.tune`` search spaces
            (``tune.grid_search``, ``tune.loguniform``, ...; sampled ``num_samples`` times per grid point).
        address: a Ray cluster (``ray://`` or ``HOST:PORT``); default ``RAY_ADDRESS`` or an embedded local Ray.
        verbose: Ray's and Tune's own console output instead of orderlab's progress.
        resume: continue the sweep of the same name and storage after an interruption: finished
            trials are kept, unfinished and errored ones run again (each from its last checkpoint).
        search_alg: a Tune ``Searcher`` (``OptunaSearch(seed=0)``; run once per grid point, see
            ``orderlab.search.GridPointSearch``) or any other ``SearchAlgorithm``, instead of
            ``sweep.search.algorithm``.
        scheduler: a Tune ``TrialScheduler`` (``ASHAScheduler(time_attr="epochs_done", ...)``)
            instead of ``sweep.scheduler``.
        num_samples: trials per grid point, instead of ``sweep.search.num_samples``/``num_samples``.
        callbacks: more Tune callbacks (loggers, your own), besides ``tracking``'s.
        quiet: one line per finished trial, no live progress.

    Raises:
        OrderlabError: any invalid config value (before anything runs), missing data, unwritable
            storage, a trial that cannot fit the cluster, a missing optional package (naming the
            extra that installs it), or nothing to resume.
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    if isinstance(config, ExperimentConfig) and overrides:
        cfg = cfg.with_overrides(overrides)
    plain_axes = {k: list(v) for k, v in (param_space or {}).items() if isinstance(v, list | tuple)}
    if plain_axes:
        cfg = cfg.with_overrides({f"sweep.{k}": v for k, v in plain_axes.items()})
    points = validate_grid(cfg)
    facts = inspect_tasks(points)
    for point in points:
        fact = facts[task_key(point)]
        ordering = ordering_class(point.ordering.name)
        plan_trial(point.train, fact.num_examples, fact.dim, ordering.needs_gradients, ordering.message_kind)
        if point.train.unit not in fact.supported_units:
            raise OrderlabError(
                f"train.unit={point.train.unit!r} is not supported by task {point.task.name!r}; "
                f"use one of: {', '.join(fact.supported_units)}"
            )
        if ordering.needs_gradients and point.train.unit == "example" and fact.not_vmappable:
            raise OrderlabError(f"ordering.name={point.ordering.name!r}: {fact.not_vmappable}")
    search = cfg.sweep.search
    searcher = search_alg if search_alg is not None else make_searcher(search)
    max_epochs = max(point.train.epochs for point in points)
    trial_scheduler = scheduler if scheduler is not None else make_scheduler(cfg.sweep.scheduler, max_epochs)
    root = results_root(cfg.storage)
    trackers = tracking_callbacks(cfg.tracking, cfg.name, root)
    results.ensure_writable(root)
    init_ray(address, verbose)
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", CLEANUP_SECONDS)
    if not verbose:  # Optuna's line per study it creates (one per grid point)
        logging.getLogger("optuna").setLevel(logging.WARNING)
    axes = {key: tune_space(value) for key, value in cfg.sweep.axes.items()}
    axes.update({k: v for k, v in (param_space or {}).items() if k not in plain_axes})
    # trials run in their own working directories: they get paths resolved here
    if "task.data_dir" in cfg.sweep.grid_axes:
        dirs = [str(resolve_data_dir(value)) for value in cfg.sweep.grid_axes["task.data_dir"]]
        axes["task.data_dir"] = tune.grid_search(dirs)
    shown = list(axes)
    if cfg.tracking or callbacks:
        axes.update(tracked_constants(cfg, axes))
    samples = num_samples or max(search.num_samples, cfg.num_samples)
    concurrent = max_concurrent_trials(points)
    algorithm, space, total = search_plan(
        axes, searcher, samples, search.metric, search.mode, search.seed, concurrent
    )
    grid_axes, sampled_axes, _ = split_space(axes)
    grid_keys = [key for key in shown if key in grid_axes]
    searched_keys = [key for key in shown if key in sampled_axes]
    num_trials = (
        total if isinstance(algorithm, GridPointSearch) else total * math.prod(map(len, grid_axes.values()))
    )
    base = config_to_dict(
        cfg.with_overrides(
            {"sweep": {}, "storage": root, "task.data_dir": str(resolve_data_dir(cfg.task.data_dir))}
        )
    )
    # trial drivers and their order servers go to the head node when the cluster marks it
    head = {"orderlab_head": 0.001} if "orderlab_head" in ray.cluster_resources() else {}
    base_cfg = validate(base)

    def trial_resources(point: dict[str, Any]) -> tune.PlacementGroupFactory:
        trial = base_cfg.with_overrides(point)
        gpus = {"GPU": trial.trial_gpus} if trial.trial_gpus else {}
        return tune.PlacementGroupFactory([{"CPU": trial.trial_cpus, **gpus, **head}])

    def epochs_of(point: Mapping[str, Any]) -> int:
        return int(point.get("train.epochs", base_cfg.train.epochs))

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base,
            facts=facts,
            info=provenance(),
            grid_keys=grid_keys,
            searched_keys=searched_keys,
        ),
        trial_resources,
    )
    # a simulated trial is its own worker group: Tune retries it from its last checkpoint
    retries = max((p.train.max_failures for p in points if p.train.backend == "simulated"), default=0)
    fs, fs_root = storage_location(cfg.storage)
    tune_path = f"{fs_root}/_tune/{cfg.name}"
    if resume:
        if not tune.Tuner.can_restore(tune_path, storage_filesystem=fs):
            raise OrderlabError(
                f"--resume: no sweep {cfg.name!r} to resume under storage={root!r} ({tune_path}); "
                "run it without --resume, or give the storage and name it ran with"
            )
        tuner = tune.Tuner.restore(
            tune_path, trainable=trainable, param_space=space, resume_errored=True, storage_filesystem=fs
        )
    else:
        metric = search.metric if trial_scheduler is None else cfg.sweep.scheduler.metric
        scheduler_name = cfg.sweep.scheduler.name if scheduler is None else type(scheduler).__name__
        outcomes: list[tune.Callback] = [StoppedTrials(root, cfg.name, scheduler_name, metric, epochs_of)]
        if not verbose:
            outcomes.append(Progress(epochs_of, num_trials, shown, quiet=quiet))
        stoppable_ray_train = trial_scheduler is not None and any(
            p.train.backend == "ray-train" for p in points
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                # a Searcher's limit (Tune wraps it in a ConcurrencyLimiter); the random search's is set above
                max_concurrent_trials=None if isinstance(algorithm, BasicVariantGenerator) else concurrent,
                num_samples=total,
                search_alg=algorithm,
                scheduler=trial_scheduler,
                # a trial's process is kept for the next trial with the same resources: no start-up
                # and imports per trial (3 s each here, most of a simulated demo trial's 4 s); not
                # when a scheduler can stop Ray Train trials, whose worker groups must end with them
                reuse_actors=not stoppable_ray_train,
            ),
            run_config=tune.RunConfig(
                name=cfg.name,
                storage_path=f"{fs_root}/_tune",
                storage_filesystem=fs,
                verbose=2 if verbose else 0,
                callbacks=[*outcomes, *trackers, *(callbacks or [])],
                failure_config=tune.FailureConfig(max_failures=retries),
            ),
        )
    grid = tuner.fit()
    results.compact(root, sweep=cfg.name, missing_ok=True)  # every trial has ended: one part per table
    with results.connect(root) as con:
        summary = results.summary(root, sweep=cfg.name, con=con)
        best = results.best_trials(root, cfg.name, search.metric, search.mode, con=con)
    return SweepResult(
        name=cfg.name,
        storage=root,
        num_trials=len(grid),
        num_errors=len(grid.errors),
        summary=summary,
        num_stopped=int(summary["num_stopped"].sum()),  # every stopped trial is counted in its group
        best=best,
    )


def run(
    config: str | Path | ExperimentConfig,
    overrides: Mapping[str, Any] | list[str] | None = None,
    *,
    address: str | None = None,
    verbose: bool = False,
    quiet: bool = False,
) -> SweepResult:
    """Run one trial: the config with its sweep axes, search and scheduler removed (``orderlab run``)."""
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    return sweep(cfg.with_overrides({"sweep": {}}), address=address, verbose=verbose, quiet=quiet)


class _CallableModule(ModuleType):
    """Lets ``orderlab.sweep(...)`` (the public contract) call ``sweep`` while staying a module."""

    def __call__(self, *args: Any, **kwargs: Any) -> SweepResult:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
