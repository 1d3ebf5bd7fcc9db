"""Typed experiment config: pydantic models, YAML loading, dotted overrides, sweep grids.

A config is checked once, here, and every problem a user can cause comes back as one
``OrderlabError`` with one line per problem (``{source}: {dotted.key}={value!r}: {reason}``)::

    cfg = load_config("configs/demo.yaml", ["train.lr=0.05", "sweep.seed=[0,1,2]"])
    for trial_cfg in validate_grid(cfg):  # one ExperimentConfig per sweep point, all checked first
        ...

Registries are imported lazily (``known_task_names``, ``known_ordering_names``) so that importing
this module pulls in neither torch nor Ray.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from orderlab.errors import OrderlabError

# Strict numbers: YAML `true` or "3" is a mistake, not an epoch count (ints still pass as floats).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Beta = Annotated[float, Strict(), Field(ge=0, lt=1)]
Overrides = Mapping[str, Any] | Sequence[str]

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
#: dict-valued fields whose sub-keys are free: sweep axes (dotted names) and task options (nested)
_FREE_KEYS = ("task.options",)
#: top-level keys (and the keys under them) that make no sense as a sweep axis
_NOT_SWEEPABLE = ("sweep", "num_samples", "tracking")
#: the forms of a sweep axis's value: a list is a grid; a mapping with one of these keys is a space
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
#: what a search or scheduler can optimise: an epoch row's metric, reported to Tune every epoch
Metric = Literal["train_loss", "val_loss", "val_metric"]
_OPTIONS_PREFIX = "task.options."
_MAX_ERROR_LINES = 30
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` and ``1.0e3`` as floats (YAML 1.2), not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def known_task_names() -> list[str]:
    """Names of the registered tasks (``orderlab.tasks.TASKS``), sorted."""
    from orderlab.tasks import TASKS

    return sorted(TASKS)


def known_ordering_names() -> list[str]:
    """Names of the registered orderings (``orderlab.orderings.ORDERINGS``), sorted."""
    from orderlab.orderings import ORDERINGS

    return sorted(ORDERINGS)


def _field_error(field: str, value: Any, reason: str) -> PydanticCustomError:
    """A validation error for ``field`` (dotted, relative to the model raising it) and its value."""
    return PydanticCustomError("orderlab", "{reason}", {"field": field, "value": value, "reason": reason})


def _suggest(word: object, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` when ``word`` is close to one of ``choices``, else ``""``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_name(kind: str, name: str, known: Sequence[str]) -> PydanticCustomError:
    return _field_error("", name, f"unknown {kind}{_suggest(name, known)}; known: {', '.join(known)}")


class TaskConfig(BaseModel):
    """Which benchmark task to train, where its data lives, and its task-specific options."""

    model_config = _MODEL_CONFIG
    name: str
    data_dir: str | None = None
    train_examples: Int | None = Field(None, ge=1)  # a fixed random subset of the training set (seed 0)
    options: dict[str, Any] = {}  # validated by the task itself

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        known = known_task_names()
        if name not in known:
            raise _unknown_name("task", name, known)
        return name


class LRScheduleConfig(BaseModel):
    """Learning-rate schedule over epochs; a plain string is shorthand for ``{name: ...}``."""

    model_config = _MODEL_CONFIG
    name: Literal["constant", "step", "multistep", "cosine", "linear", "warmup-cosine"] = "constant"
    step_size: Int = Field(10, ge=1)
    gamma: Float = Field(0.1, gt=0)
    milestones: list[Annotated[int, Strict(), Field(ge=1)]] = []
    warmup_epochs: Int = Field(0, ge=0)
    min_lr: Float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check_milestones(self) -> Self:
        if self.name == "multistep" and not self.milestones:
            raise _field_error("milestones", self.milestones, "must list >= 1 epoch for name='multistep'")
        if any(b <= a for a, b in itertools.pairwise(self.milestones)):
            raise _field_error("milestones", self.milestones, "must be strictly increasing")
        return self


class TrainConfig(BaseModel):
    """Training loop settings; ``batch_size`` is global, summed over ``num_workers``."""

    model_config = _MODEL_CONFIG
    epochs: Int = Field(10, ge=1)
    batch_size: Int = Field(32, ge=1)
    num_workers: Int = Field(2, ge=1)
    unit: Literal["example", "microbatch"] = "example"
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: Float = Field(0.1, gt=0)
    momentum: Float = Field(0.0, ge=0, lt=1)
    weight_decay: Float = Field(0.0, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    lr_base_batch_size: Int | None = Field(None, ge=1)
    grad_clip: Float | None = Field(None, gt=0)  # max L2 norm of the averaged gradient (clip_grad_norm_)
    max_failures: Int = Field(0, ge=0)
    # ray-train: one Ray Train worker process per worker, an order-server actor per trial;
    # simulated: all num_workers workers' steps in the trial's own process, the ordering called in it
    backend: Literal["ray-train", "simulated"] = "ray-train"
    # where a simulated trial's model, per-unit gradients and the ordering's running sums live (cuda:
    # the trial reserves one GPU); ray-train workers take GPUs from resources.gpus_per_worker
    device: Literal["cpu", "cuda"] = "cpu"

    @property
    def microbatch_size(self) -> int:
        """Units each worker takes per step: ``batch_size // num_workers``."""
        return self.batch_size // self.num_workers

    @property
    def effective_lr(self) -> float:
        """``lr`` scaled by ``batch_size / lr_base_batch_size`` (or its square root) per ``lr_scaling``."""
        if self.lr_scaling == "none" or self.lr_base_batch_size is None:
            return self.lr
        ratio = self.batch_size / self.lr_base_batch_size
        return self.lr * (ratio if self.lr_scaling == "linear" else math.sqrt(ratio))

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Self:
        if self.batch_size % self.num_workers:
            raise _field_error("batch_size", self.batch_size, _divisibility_hint(self))
        if self.momentum > 0 and self.optimizer != "sgd":
            raise _field_error(
                "momentum", self.momentum, f"is for sgd only; set it to 0 or use betas with {self.optimizer}"
            )
        if self.lr_scaling != "none" and self.lr_base_batch_size is None:
            reason = (
                f"required when train.lr_scaling={self.lr_scaling!r}: the batch size train.lr was tuned for"
            )
            raise _field_error("lr_base_batch_size", None, reason)
        schedule = self.lr_schedule
        if schedule.name in ("linear", "cosine", "warmup-cosine") and schedule.min_lr > self.effective_lr:
            reason = f"must be <= the learning rate it decays from, {self.effective_lr:g} (train.lr after lr_scaling)"
            raise _field_error("lr_schedule.min_lr", schedule.min_lr, reason)
        if schedule.name == "warmup-cosine" and schedule.warmup_epochs >= self.epochs:
            reason = f"must be < train.epochs={self.epochs}"
            raise _field_error("lr_schedule.warmup_epochs", schedule.warmup_epochs, reason)
        if schedule.milestones and schedule.milestones[-1] >= self.epochs:
            raise _field_error(
                "lr_schedule.milestones", schedule.milestones, f"must all be < train.epochs={self.epochs}"
            )
        return self


def _divisibility_hint(train: TrainConfig) -> str:
    """Why batch_size and num_workers clash, with the nearest valid value of each."""
    size, workers = train.batch_size, train.num_workers
    lower, upper = size - size % workers, size - size % workers + workers
    sizes = " or ".join(str(b) for b in (lower, upper) if b >= workers)
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    below = [d for d in divisors if d < workers]
    above = [d for d in divisors if d > workers]
    nearest = " or ".join(str(d) for d in (below[-1:] + above[:1]))
    return (
        f"must be divisible by train.num_workers={workers} (the global batch is split evenly); "
        f"use train.batch_size={sizes}, or train.num_workers={nearest}"
    )


class OrderingConfig(BaseModel):
    """Which example ordering to use and how workers talk to its order server."""

    model_config = _MODEL_CONFIG
    name: str = "rr"
    first_epoch: Literal["random", "identity"] = "random"
    balance: Literal["deterministic", "probabilistic"] = "deterministic"
    balance_c: Float = Field(30.0, gt=0)
    message_steps: Int = Field(16, ge=1)  # training steps batched into one message to the server
    max_in_flight: Int = Field(4, ge=1)  # messages a worker may have outstanding
    # wire format of the vectors sent to the order server; balancing always accumulates in float32
    payload_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # CountSketch gradients to this many coordinates on the worker before sending (None: exact)
    sketch_dim: Int | None = Field(None, ge=1)
    # how messages reach the server: a shared-memory ring per worker (CPU workers on the server's
    # node), Ray actor calls, or auto (the ring where it can be used)
    transport: Literal["auto", "shared_memory", "ray"] = "auto"
    # where workers make their rings (None: /dev/shm); a tmpfs mounted with -o huge=within_size gives
    # the order server 2 MiB pages (up to 11% more pairs/s through the actor, README "Performance")
    ring_directory: str | None = None
    # threads the order server balances with (each pass over the running sum split by coordinates,
    # for d >= 65,536; the orders do not depend on it); they share the node's cores with its workers
    server_threads: Int = Field(1, ge=1)

    @field_validator("name")
    @classmethod
    def _known_ordering(cls, name: str) -> str:
        known = known_ordering_names()
        if name not in known:
            raise _unknown_name("ordering", name, known)
        return name


class ResourcesConfig(BaseModel):
    """Ray resources per worker and per trial."""

    model_config = _MODEL_CONFIG
    cpus_per_worker: Float = Field(0.45, gt=0)
    gpus_per_worker: Float = Field(0.0, ge=0)
    # CPUs a Tune trial reserves besides its workers (None: 0.1 for ray-train's trial driver,
    # num_threads for the simulated backend, whose trial process does all the training)
    trial_cpus: Float | None = Field(None, gt=0)
    max_concurrent_trials: Int | None = Field(None, ge=1)  # None: computed from the cluster
    num_threads: Int = Field(1, ge=1)  # torch threads per worker
    # Ray placement of a trial's workers: PACK fills a node first, SPREAD spreads them over nodes
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus(cls, gpus: float) -> float:
        if 0 < gpus < 1 or gpus != int(gpus):
            raise _field_error(
                "",
                gpus,
                "must be 0 (CPU, gloo) or a whole number of GPUs: NCCL needs a GPU of its own per rank",
            )
        return gpus


class MetricsConfig(BaseModel):
    """Optional per-epoch measurements."""

    model_config = _MODEL_CONFIG
    # parallel herding bound of each epoch's orders over per-unit gradients at the epoch's start
    # weights (epochs.herding): of every unit, or of a fixed random subsample of herding_units per
    # worker (cheaper, but a small subsample hides the balance that pairing builds)
    herding: bool = False
    herding_units: Int | None = Field(None, ge=2)


class FaultPoint(BaseModel):
    """Where a fault fires: before optimizer step ``step`` of ``epoch`` on worker ``rank``."""

    model_config = _MODEL_CONFIG
    epoch: Int = Field(0, ge=0)
    step: Int = Field(0, ge=0)
    rank: Int = Field(0, ge=0)


class FaultsConfig(BaseModel):
    """Test-only fault injection. Each fault fires once per trial (a marker in the trial's storage).

    ``exit_worker``: that worker process exits (``os._exit``). ``kill_order_server``: rank ``rank``
    kills the trial's order-server actor through Ray.
    """

    model_config = _MODEL_CONFIG
    exit_worker: FaultPoint | None = None
    kill_order_server: FaultPoint | None = None


class SearchConfig(BaseModel):
    """How the trials of a sweep with search spaces are chosen: ``num_samples`` trials per grid point.

    The grid axes (lists) are crossed with the search: every grid point gets its own search over the
    space axes (``{loguniform: [a, b]}``, ...), so each ordering is tuned on its own.
    """

    model_config = _MODEL_CONFIG
    # random: Tune's random sampling; optuna: Tune's OptunaSearch (TPE); hyperopt: Tune's HyperOptSearch
    algorithm: Literal["random", "optuna", "hyperopt"] = "random"
    num_samples: Int = Field(1, ge=1)  # trials per grid point
    metric: Metric = (
        "train_loss"  # the epoch metric the search optimises (its value at the trial's last epoch)
    )
    mode: Literal["min", "max"] = "min"
    seed: Int = Field(0, ge=0, lt=2**32)  # the same seed gives the same suggestions for the same results


class SchedulerConfig(BaseModel):
    """Tune's trial scheduler: which trials to stop early. Its time unit is the epoch."""

    model_config = _MODEL_CONFIG
    # fifo: run every trial to the end; asha: Tune's ASHAScheduler; median-stopping: Tune's
    # MedianStoppingRule; hyperband: Tune's HyperBandScheduler (pauses trials and resumes them from checkpoints)
    name: Literal["fifo", "asha", "median-stopping", "hyperband"] = "fifo"
    metric: Metric = "train_loss"  # the epoch metric compared between trials
    mode: Literal["min", "max"] = "min"
    grace_period: Int = Field(
        1, ge=1
    )  # epochs a trial trains before it can be stopped (asha, median-stopping)
    reduction_factor: Float = Field(3.0, gt=1)  # asha and hyperband: keep 1 / reduction_factor at each rung
    brackets: Int = Field(1, ge=1)  # asha only
    min_samples_required: Int = Field(3, ge=1)  # median-stopping only: trials to compare against


class SweepConfig(BaseModel):
    """The sweep: axes by dotted key (a list is a grid, a mapping is a search space), and how to search and schedule.

    Any other key is an axis: ``ordering.name: [rr, cd-grab]`` (grid), ``train.lr: {loguniform: [1.0e-3, 1.0]}``
    (search space; also ``choice``, ``uniform``, ``randint`` and ``grid``).
    """

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()

    @property
    def axes(self) -> dict[str, Any]:
        """Every axis by dotted key, in the order written: grid lists and search-space mappings."""
        return dict(self.model_extra or {})

    @property
    def grid_axes(self) -> dict[str, list[Any]]:
        """The grid axes (lists, ``{grid: [...]}``) with their values."""
        return {key: grid_values(value) for key, value in self.axes.items() if space_kind(value) == "grid"}

    @property
    def space_axes(self) -> dict[str, dict[str, Any]]:
        """The search-space axes (``{choice: ...}``, ``{uniform: ...}``, ...): sampled, not crossed."""
        return {key: value for key, value in self.axes.items() if space_kind(value) != "grid"}

    @model_validator(mode="after")
    def _check_axes(self) -> Self:
        for axis, values in self.axes.items():
            if not _is_sweep_axis(axis):
                valid = sweep_axes()
                axes = ", ".join(
                    [*valid, _OPTIONS_PREFIX + "<key>", "a section (train, ordering, ...) of mappings"]
                )
                reason = f"unknown sweep axis{_suggest(axis, valid)}; valid axes: {axes}"
                raise _field_error(axis, values, reason)
            problem = space_problem(values)
            if problem:
                raise _field_error(axis, values, problem)
            if _is_section_axis(axis):
                options = values.get("grid", values.get("choice")) if isinstance(values, Mapping) else values
                if not isinstance(options, list) or not all(isinstance(v, Mapping) for v in options):
                    section = _model_at(axis.split("."))
                    assert section is not None  # _is_section_axis: a section's model
                    reason = f"a section as an axis takes mappings of its keys, e.g. [{{{next(iter(section.model_fields))}: ...}}]"
                    raise _field_error(axis, values, reason)
            if self.search.algorithm == "optuna" and space_kind(values) == "choice":
                plain = (str, int, float, bool, type(None))  # what Optuna's CategoricalDistribution takes
                if not all(isinstance(v, plain) for v in values["choice"]):
                    reason = (
                        "sweep.search.algorithm=optuna chooses among plain values only (numbers, strings, "
                        "booleans, null); make this axis a grid (a list), or use algorithm random or hyperopt"
                    )
                    raise _field_error(axis, values, reason)
        return self


def space_kind(value: Any) -> str:
    """``grid`` for a list or ``{grid: [...]}``, else the space's kind (``choice``, ``uniform``, ...)."""
    return "grid" if isinstance(value, list) else str(next(iter(value)))


def grid_values(value: Any) -> list[Any]:
    """The values of a grid axis: the list itself, or ``{grid: [...]}``'s list."""
    return list(value) if isinstance(value, list) else list(value["grid"])


def space_problem(value: Any) -> str | None:
    """Why ``value`` is not a sweep axis's value (a non-empty list or one space of SPACE_KINDS), or None."""
    if isinstance(value, list):
        return None if value else "needs at least one value"
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in SPACE_KINDS:
        return (
            "must be a list of values (a grid) or one search space: {choice: [...]}, {uniform: [a, b]}, "
            "{loguniform: [a, b]}, {randint: [a, b]} or {grid: [...]}"
        )
    kind, args = next(iter(value.items()))
    if kind in ("grid", "choice"):
        return None if isinstance(args, list) and args else f"{kind} takes a non-empty list of values"
    numbers = isinstance(args, list) and len(args) == 2
    numbers = numbers and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
    if not numbers or not all(math.isfinite(a) for a in args):
        return f"{kind} takes [low, high], two finite numbers"
    low, high = args
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        return "randint takes [low, high], two integers (high excluded)"
    if not low < high:
        return f"{kind} needs low < high"
    if kind == "loguniform" and low <= 0:
        return "loguniform needs 0 < low"
    return None


def space_examples(value: Any) -> list[Any]:
    """Values of a checked search space that every grid point is validated with: each choice, or
    the ends of a range (randint's high is excluded)."""
    kind, args = next(iter(value.items()))
    if kind == "choice":
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [float(args[0]), float(args[1])]


class ExperimentConfig(BaseModel):
    """One experiment: the base trial config plus the sweep axes expanded around it."""

    model_config = _MODEL_CONFIG
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: Int = Field(0, ge=0, lt=2**63)
    task: TaskConfig
    train: TrainConfig = TrainConfig()
    ordering: OrderingConfig = OrderingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    storage: str = Field("results", min_length=1)
    sweep: SweepConfig = SweepConfig()
    num_samples: Int = Field(1, ge=1)
    # experiment trackers every trial reports its epochs to (Tune's logger callbacks)
    tracking: list[Literal["mlflow", "tensorboard", "wandb"]] = []
    metrics: MetricsConfig = MetricsConfig()
    faults: FaultsConfig = FaultsConfig()  # test-only

    @field_validator("name")
    @classmethod
    def _not_a_relative_dir(cls, name: str) -> str:
        if name in (".", ".."):
            raise _field_error("", name, "must name a directory, not '.' or '..'")
        return name

    @model_validator(mode="after")
    def _check_num_samples(self) -> Self:
        if self.num_samples > 1 and self.sweep.search.num_samples > 1:
            raise _field_error(
                "num_samples",
                self.num_samples,
                "and sweep.search.num_samples both repeat the grid: set only sweep.search.num_samples",
            )
        return self

    @model_validator(mode="after")
    def _check_backend(self) -> Self:
        if self.train.backend != "simulated":
            if self.train.device != "cpu":
                raise _field_error(
                    "train.device",
                    self.train.device,
                    f"is for train.backend='simulated'; train.backend={self.train.backend!r} workers take "
                    "GPUs from resources.gpus_per_worker: remove train.device or use train.backend='simulated'",
                )
            return self
        ordering, defaults = self.ordering, OrderingConfig()
        for key in ("transport", "ring_directory", "message_steps", "max_in_flight"):
            value = getattr(ordering, key)
            if value != getattr(defaults, key):
                raise _field_error(
                    f"ordering.{key}",
                    value,
                    "configures messages to an order server, which train.backend='simulated' does not "
                    "have (the ordering runs in the trial's process); remove it or use train.backend='ray-train'",
                )
        if self.resources.gpus_per_worker > 0:
            raise _field_error(
                "resources.gpus_per_worker",
                self.resources.gpus_per_worker,
                "train.backend='simulated' trains on the trial process's CPUs; set it to 0 or use "
                "train.backend='ray-train'",
            )
        if self.faults.kill_order_server is not None:
            raise _field_error(
                "faults.kill_order_server",
                self.faults.kill_order_server.model_dump(),
                "train.backend='simulated' has no order server to kill; use faults.exit_worker",
            )
        return self

    @property
    def trial_gpus(self) -> float:
        """GPUs a Tune trial reserves besides its Ray Train workers: one for a simulated trial on cuda."""
        return 1.0 if self.train.device == "cuda" else 0.0

    @property
    def trial_cpus(self) -> float:
        """CPUs a Tune trial reserves besides its Ray Train workers (``resources.trial_cpus``, or its
        backend's default: 0.1 for ray-train's driver, ``num_threads`` for a simulated trial)."""
        if self.resources.trial_cpus is not None:
            return self.resources.trial_cpus
        return float(self.resources.num_threads) if self.train.backend == "simulated" else 0.1

    @property
    def worker_cpus(self) -> float:
        """CPUs of a trial's Ray Train workers together: none for the simulated backend."""
        if self.train.backend == "simulated":
            return 0.0
        return self.train.num_workers * self.resources.cpus_per_worker

    def with_overrides(self, overrides: Overrides) -> ExperimentConfig:
        """A copy with dotted ``overrides`` applied and re-validated.

        Raises:
            OrderlabError: an unknown key or an invalid resulting config.
        """
        return validate(apply_overrides(self.model_dump(), overrides), source="overrides")


# ---------------------------------------------------------------- schema walking


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model class when a field holds a nested section, else None."""
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def leaf_keys() -> list[str]:
    """All dotted leaf keys of ``ExperimentConfig``, in declaration order."""

    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        keys: list[str] = []
        for name, field in model.model_fields.items():
            sub = _section(field.annotation)
            keys += walk(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
        return keys

    return walk(ExperimentConfig, "")


def sweep_axes() -> list[str]:
    """The keys a sweep may vary: leaves (but those under ``sweep``, ``num_samples``, ``tracking``)
    and ``train.lr_schedule``.

    ``task.options.<key>`` is also an axis, for any ``<key>``.
    """
    return [k for k in leaf_keys() if k.split(".")[0] not in _NOT_SWEEPABLE] + ["train.lr_schedule"]


def _is_sweep_axis(key: str) -> bool:
    if key.split(".")[0] in _NOT_SWEEPABLE:
        return False
    return (
        key in sweep_axes()
        or _is_section_axis(key)
        or (key.startswith(_OPTIONS_PREFIX) and key != _OPTIONS_PREFIX)
    )


def _is_section_axis(key: str) -> bool:
    """A section (``train``, ``ordering``, ...) as an axis: each value, a mapping, sets several keys
    of the section together (``train: [{num_workers: 4, batch_size: 4}, {num_workers: 8, batch_size: 8}]``)."""
    sections = _model_at(key.split(".")) not in (None, ExperimentConfig)
    sweepable = key.split(".")[0] not in _NOT_SWEEPABLE
    return sections and sweepable and key not in sweep_axes()  # train.lr_schedule also takes its shorthand


def _model_at(parts: Sequence[Any]) -> type[BaseModel] | None:
    """The section model at dotted path ``parts`` (() is ExperimentConfig), or None."""
    model: type[BaseModel] | None = ExperimentConfig
    for part in parts:
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        model = _section(field.annotation) if field else None
    return model


def _unknown_key(full_key: str, depth: int, model: type[BaseModel]) -> str:
    """``full_key`` has no field at its ``depth``-th part in ``model``: name it and the valid keys."""
    parts = full_key.split(".")
    valid, parent = list(model.model_fields), ".".join(parts[:depth])
    where = f"under {parent}" if parent else "at the top level"
    unknown = f"unknown key {parts[depth]!r}{_suggest(parts[depth], valid)}"
    return f"{full_key}: {unknown}; valid keys {where}: {', '.join(valid)}"


# ---------------------------------------------------------------- overrides


def _parse_overrides(overrides: Overrides) -> list[tuple[str, Any]]:
    """``[(dotted_key, value)]`` from a mapping or from ``"key=value"`` strings (values YAML-parsed)."""
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    items = [overrides] if isinstance(overrides, str) else list(overrides)
    pairs: list[tuple[str, Any]] = []
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise OrderlabError(f"override {item!r} must look like dotted.key=value, e.g. train.lr=0.05")
        try:
            pairs.append((key.strip(), yaml.load(text, Loader=_Loader)))
        except yaml.YAMLError as err:
            raise OrderlabError(f"override {item!r}: malformed YAML: {_describe_yaml_error(err)}") from None
    return pairs


def apply_overrides(data: Mapping[str, Any], overrides: Overrides | None) -> dict[str, Any]:
    """A copy of ``data`` with each dotted override set; a mapping value merges into a section.

    ``sweep.<axis>`` takes the rest of the key as one axis name (``sweep.ordering.name``; but
    ``sweep.search.*`` and ``sweep.scheduler.*`` are keys), ``sweep`` alone replaces every axis, and
    ``task.options.<x>`` accepts any (nested) key; every other key must exist in the schema.

    Raises:
        OrderlabError: an unknown key (naming it and the valid keys at its level) or a malformed
            ``"key=value"`` string.
    """
    result = copy.deepcopy(dict(data))
    for key, value in _parse_overrides(overrides or {}):
        if not isinstance(key, str):
            raise OrderlabError(f"override key {key!r} must be a dotted string such as 'train.lr'")
        _set(result, key, value)
    return result


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in ``data`` (the whole config), checking each part against the schema."""
    parts = key.split(".")
    node: dict[str, Any] = data
    model: type[BaseModel] = ExperimentConfig
    if parts[0] == "sweep" and (len(parts) == 1 or parts[1] not in SweepConfig.model_fields):
        if len(parts) == 1:  # the whole sweep is replaced, not merged: {"sweep": {}} removes every axis
            data["sweep"] = copy.deepcopy(value)
        else:  # an axis is one dotted name
            _mapping_at(data, "sweep", "sweep")[".".join(parts[1:])] = copy.deepcopy(value)
        return
    for depth, part in enumerate(parts):
        dotted, rest = ".".join(parts[: depth + 1]), parts[depth + 1 :]
        field = model.model_fields.get(part)
        if field is None:
            raise OrderlabError(_unknown_key(key, depth, model))
        sub = _section(field.annotation)
        if sub is not None and not rest and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                _set(data, f"{dotted}.{sub_key}", sub_value)
            return
        if not rest:
            node[part] = copy.deepcopy(value)
            return
        if sub is None and dotted not in _FREE_KEYS:
            raise OrderlabError(f"{key}: {dotted} is a value, not a section with keys")
        node = _mapping_at(node, part, dotted)
        if sub is None:
            for i, free_part in enumerate(rest[:-1]):
                node = _mapping_at(node, free_part, ".".join([dotted, *rest[: i + 1]]))
            node[rest[-1]] = copy.deepcopy(value)
            return
        model = sub


def _mapping_at(node: dict[str, Any], key: str, dotted: str) -> dict[str, Any]:
    """``node[key]`` as a dict to write into: created when absent, a schedule shorthand expanded."""
    child = node.get(key)
    if child is None or (isinstance(child, str) and dotted == "train.lr_schedule"):
        child = {} if child is None else {"name": child}
    if not isinstance(child, dict):
        raise OrderlabError(f"{dotted}={child!r} is not a mapping, so it has no sub-keys to set")
    node[key] = child
    return child


# ---------------------------------------------------------------- validation and loading


def _format_error(err: Any, source: str) -> str:
    """One line for one pydantic error: ``{source}: {dotted.loc}={value!r}: {reason}``."""
    loc = [str(part) for part in err["loc"]]
    value, reason, ctx = err.get("input"), err["msg"], err.get("ctx", {})
    kind = err["type"]
    if kind == "orderlab":
        loc += [p for p in str(ctx["field"]).split(".") if p]
        value, reason = ctx["value"], ctx["reason"]
    elif kind == "extra_forbidden":
        model = _model_at(err["loc"][:-1])
        if model is not None:
            return f"{source}: {_unknown_key('.'.join(loc), len(loc) - 1, model)}"
    elif kind == "missing":
        return f"{source}: {'.'.join(loc)}: required key is missing"
    elif kind == "literal_error":
        parent, leaf = _model_at(err["loc"][:-1]), err["loc"][-1]
        field = parent.model_fields.get(leaf) if parent else None
        allowed = [str(a) for a in get_args(field.annotation)] if field else []
        if field and get_origin(field.annotation) is Literal:
            reason = f"must be one of: {', '.join(allowed)}{_suggest(value, allowed)}"
    elif kind == "string_pattern_mismatch" and loc == ["name"]:
        reason = "may contain only letters, digits, '_', '.' and '-' (it names directories)"
    elif kind in _BOUNDS:
        reason = f"must be {_BOUNDS[kind]} {next(iter(ctx.values()))}"
    elif kind == "value_error":
        reason = str(ctx.get("error", reason))
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{source}: {'.'.join(loc) or '(top level)'}={text}: {reason}"


def validate(data: Any, source: str = "config") -> ExperimentConfig:
    """Validate plain ``data`` (e.g. parsed YAML) into an ``ExperimentConfig``.

    Args:
        data: a mapping shaped like ``ExperimentConfig``.
        source: what the data came from (a file name), the prefix of every error line.

    Raises:
        OrderlabError: one line per problem, ``{source}: {dotted.key}={value!r}: {reason}``.
    """
    cfg, lines = _checked(data, source)
    if cfg is None:
        raise OrderlabError("\n".join(lines))
    return cfg


def _checked(data: Any, source: str) -> tuple[ExperimentConfig | None, list[str]]:
    """The validated config, or None and one error line per problem."""
    try:
        return ExperimentConfig.model_validate(data), []
    except ValidationError as exc:
        return None, [_format_error(err, source) for err in exc.errors()]


def load_config(path: str | Path, overrides: Overrides | None = None) -> ExperimentConfig:
    """Read the YAML experiment file ``path``, apply ``overrides`` and validate.

    Args:
        path: a YAML file whose top level is a mapping shaped like ``ExperimentConfig``.
        overrides: ``{"train.lr": 0.05}`` or ``["train.lr=0.05", "sweep.seed=[0,1]"]``.

    Raises:
        OrderlabError: missing file, malformed YAML (with file and line), or an invalid config.
    """
    path = Path(path)
    if not path.is_file():
        raise OrderlabError(f"config file {str(path)!r} not found; pass the path of an experiment YAML file")
    try:
        # bytes, so that undecodable files also surface as a YAMLError with a position
        data = yaml.load(path.read_bytes(), Loader=_Loader)
    except yaml.YAMLError as err:
        raise OrderlabError(f"{path}: malformed YAML: {_describe_yaml_error(err)}") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise OrderlabError(f"{path}: the top level is {kind}; it must be a mapping with at least task.name")
    return validate(apply_overrides(data, overrides), source=str(path))


def _describe_yaml_error(err: yaml.YAMLError) -> str:
    """``line L, column C: problem`` from a PyYAML error (lines and columns start at 1)."""
    if isinstance(err, yaml.reader.ReaderError):
        return f"byte {err.position}: {err.reason} (is it a text file in UTF-8?)"
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else str(problem)


# ---------------------------------------------------------------- sweep grids


def expand_grid(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """The cartesian product of ``cfg.sweep``'s grid axes, one dict of dotted overrides per point.

    Axes vary in the order they are listed in ``cfg.sweep``, the last one fastest; no grid axes
    gives one empty point. Search-space axes are not crossed: they are sampled per grid point.
    """
    grid = cfg.sweep.grid_axes
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def validate_grid(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """Every grid point of ``cfg`` as its own validated config (with an empty ``sweep``).

    Each point is also checked with every search-space axis at each of its ``space_examples``
    (each choice, the ends of a range), so a space that cannot give a valid trial fails here.

    Raises:
        OrderlabError: any point is invalid; each line names the point's axis values.
    """
    base = cfg.model_dump()
    base["sweep"] = {}
    samples = [
        {axis: value} for axis, space in cfg.sweep.space_axes.items() for value in space_examples(space)
    ]
    points: list[ExperimentConfig] = []
    lines: list[str] = []
    for point in expand_grid(cfg):
        for sample in [{}, *samples]:
            label = "sweep[" + ", ".join(f"{k}={v!r}" for k, v in {**point, **sample}.items()) + "]"
            point_cfg, point_lines = _checked(apply_overrides(base, {**point, **sample}), label)
            points += [point_cfg] if point_cfg and not sample else []
            lines += point_lines
    if lines:
        lines = list(dict.fromkeys(lines))
        more = len(lines) - _MAX_ERROR_LINES
        raise OrderlabError("\n".join(lines[:_MAX_ERROR_LINES] + ([f"... {more} more"] if more > 0 else [])))
    return points


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """``cfg`` as JSON-friendly plain data (tuples become lists)."""
    return cfg.model_dump(mode="json")
