"""The training loop, written once for both backends (``train.backend``).

A process trains the ranks it runs: one rank under Ray Train (``orderlab.worker``), every rank of
the trial in one process with the simulated backend (``orderlab.simulated``). Each epoch reads top
to bottom: fetch the epoch's orders, run the steps (per-unit gradients of every rank, the sum over
workers of their mean gradients, optimizer and LR schedule, the ordering's inputs handed on),
evaluate, and write the epoch row and a checkpoint. What differs between backends (where orders
come from, how a step's sum over workers is formed, where the ordering's inputs go, how a
checkpoint is kept) sits behind ``Workers``. Its parts: ``TrialState`` (what a process trains, and
its checkpoints), ``HerdingProbe`` (the herding bound of an epoch's orders), ``FaultInjector``
(test-only faults) and ``TrainingLoop`` (the epochs and steps). This module imports no Ray.

Shards: the task's training examples are cut into units (1 example, or ``microbatch_size``
consecutive examples for ``unit: microbatch``); worker w owns units [w*n, (w+1)*n) with
n = shard_size; the tail that does not fill W equal shards of whole steps is dropped and reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from orderlab import results
from orderlab.config import ExperimentConfig, FaultPoint, FaultsConfig, TrainConfig
from orderlab.errors import OrderlabError
from orderlab.grads import (
    assign_flat_gradient,
    check_vmappable,
    microbatch_gradient,
    per_example_gradients,
    vmap_problem,
)
from orderlab.herding import parallel_herding_bound
from orderlab.orderings import OrderingSpec
from orderlab.seeding import DATA, MODEL, rng_for, seed_for
from orderlab.tasks import (
    Task,
    TaskData,
    load_task_data,
    make_task,
    reset_model_state,
    resolve_data_dir,
    stateful_modules,
)

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> None:
    """Write a ``TrainingLoop`` checkpoint (torch tensors, numbers, dicts) into ``directory``."""
    torch.save(state, Path(directory) / CHECKPOINT_FILE)


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The checkpoint ``save_checkpoint`` wrote into ``directory``, on the CPU."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")


@dataclass(frozen=True)
class TrialPlan:
    """Sizes derived from the config and the task (all counts, no units of time).

    Attributes:
        num_workers: W. unit_size: examples per unit. units_per_step: k, units a worker visits per step.
        shard_size: n, units per worker. steps_per_epoch: n / k. num_dropped: tail examples left out.
        dim: d, gradient length. needs_gradients / message_kind: what the ordering consumes.
    """

    num_workers: int
    unit_size: int
    units_per_step: int
    shard_size: int
    steps_per_epoch: int
    num_dropped: int
    dim: int
    needs_gradients: bool
    message_kind: str


def plan_trial(
    train: TrainConfig, num_examples: int, dim: int, needs_gradients: bool, message_kind: str
) -> TrialPlan:
    """Equal shards of whole steps for ``num_examples`` training examples.

    Raises:
        OrderlabError: fewer examples than one step of every worker needs.
    """
    example_units = train.unit == "example"
    unit_size = 1 if example_units else train.microbatch_size
    units_per_step = train.microbatch_size if example_units else 1
    num_units = num_examples // unit_size
    steps_per_epoch = num_units // (train.num_workers * units_per_step)
    if steps_per_epoch == 0:
        raise OrderlabError(
            f"the task has {num_examples} training examples, fewer than train.num_workers × microbatch size = "
            f"{train.num_workers} × {train.microbatch_size}; lower train.batch_size or train.num_workers"
        )
    shard_size = steps_per_epoch * units_per_step
    return TrialPlan(
        num_workers=train.num_workers,
        unit_size=unit_size,
        units_per_step=units_per_step,
        shard_size=shard_size,
        steps_per_epoch=steps_per_epoch,
        num_dropped=num_examples - train.num_workers * shard_size * unit_size,
        dim=dim,
        needs_gradients=needs_gradients,
        message_kind=message_kind,
    )


def ordering_spec(cfg: ExperimentConfig, plan: TrialPlan) -> OrderingSpec:
    """The trial's ordering settings: its shards, its seed, ``cfg.ordering``'s rules, the length of
    the vectors the ordering balances (the sketch length when ``ordering.sketch_dim`` is set), and
    its balancing threads (``ordering.server_threads``)."""
    ordering = cfg.ordering
    return OrderingSpec(
        num_workers=plan.num_workers,
        shard_size=plan.shard_size,
        dim=ordering.sketch_dim or plan.dim,
        seed=cfg.seed,
        first_epoch=ordering.first_epoch,
        balance=ordering.balance,
        balance_c=ordering.balance_c,
        threads=ordering.server_threads,
    )


def build_model(task: Task, seed: int) -> nn.Module:
    """The task's model, initialised identically on every worker from ``seed_for(seed, 0, 0, MODEL)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(seed, 0, 0, MODEL))
        return task.make_model()


def make_optimizer(train: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """torch's SGD (with momentum), Adam or AdamW at ``train.effective_lr``."""
    params, lr = model.parameters(), train.effective_lr
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)
    optimizer_class = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return optimizer_class(params, lr=lr, betas=train.betas, weight_decay=train.weight_decay)


def make_lr_scheduler(
    train: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A torch LR scheduler stepped once per optimizer step; epoch-based settings become step counts."""
    schedule, sched = train.lr_schedule, torch.optim.lr_scheduler
    total_steps = train.epochs * steps_per_epoch
    end_factor = schedule.min_lr / train.effective_lr
    if schedule.name == "constant":
        return sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if schedule.name == "step":
        return sched.StepLR(optimizer, step_size=schedule.step_size * steps_per_epoch, gamma=schedule.gamma)
    if schedule.name == "multistep":
        milestones = [m * steps_per_epoch for m in schedule.milestones]
        return sched.MultiStepLR(optimizer, milestones=milestones, gamma=schedule.gamma)
    if schedule.name == "linear":
        return sched.LinearLR(optimizer, start_factor=1.0, end_factor=end_factor, total_iters=total_steps)
    warmup_steps = schedule.warmup_epochs * steps_per_epoch if schedule.name == "warmup-cosine" else 0
    cosine = sched.CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=schedule.min_lr)
    if warmup_steps == 0:
        return cosine
    warmup = sched.LinearLR(
        optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps
    )
    return sched.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


class Shard:
    """The units of the workers ``ranks`` (consecutive) as example index rows, and their validation rows.

    Attributes:
        unit_examples: LongTensor [len(ranks) * shard_size, unit_size], the examples of each unit,
            rank-major.
        inputs, targets: the training rows of those units, rank-major ([len(ranks) * shard_size *
            unit_size, ...]). val_inputs, val_targets: per rank, rows rank::num_workers of the
            validation set.
    """

    def __init__(self, data: TaskData, plan: TrialPlan, ranks: range, device: torch.device) -> None:
        rows_per_rank = plan.shard_size * plan.unit_size
        first = ranks.start * rows_per_rank
        examples = torch.arange(first, first + len(ranks) * rows_per_rank)
        self.ranks, self.shard_size, self.rows_per_rank = ranks, plan.shard_size, rows_per_rank
        self.unit_examples = examples.view(len(ranks) * plan.shard_size, plan.unit_size)
        self.inputs = data.train_inputs[examples].to(device)
        self.targets = data.train_targets[examples].to(device)
        self.first = first
        self.val_inputs = [data.val_inputs[rank :: plan.num_workers].to(device) for rank in ranks]
        self.val_targets = [data.val_targets[rank :: plan.num_workers].to(device) for rank in ranks]

    def batch(self, units: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of ``units``, int64 [len(ranks), k] local unit indices of each rank:
        rank-major, each rank's in that order."""
        local = torch.from_numpy(np.ascontiguousarray(units))
        return self._rows(local + torch.arange(len(self.ranks)).unsqueeze(1) * self.shard_size)

    def rank_batch(self, index: int, units: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the ``index``-th rank's local ``units`` (int64 [k]), in that order."""
        return self._rows(torch.from_numpy(np.ascontiguousarray(units)) + index * self.shard_size)

    def _rows(self, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = (self.unit_examples[units.reshape(-1)].reshape(-1) - self.first).to(self.inputs.device)
        return self.inputs[rows], self.targets[rows]

    def train_rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training rows of the ``index``-th rank of ``ranks`` (views)."""
        rows = slice(index * self.rows_per_rank, (index + 1) * self.rows_per_rank)
        return self.inputs[rows], self.targets[rows]


@dataclass
class EpochTimes:
    """Seconds spent in one epoch, by part (rank 0's clock)."""

    epoch_seconds: float = 0.0
    compute_seconds: float = 0.0
    allreduce_seconds: float = 0.0
    order_wait_seconds: float = 0.0  # for the epoch's order
    send_wait_seconds: float = 0.0  # for room to send (the in-flight bound, a ring slot) and the flush


def fires_once(
    results_root: str, trial_id: str, fault: str, point: FaultPoint | None, epoch: int, step: int, rank: int
) -> bool:
    """True the first time a test-only fault's point is reached in a trial (a marker file remembers)."""
    if point is None or (point.epoch, point.step, point.rank) != (epoch, step, rank):
        return False
    return results.create_marker(results_root, f"_faults/{trial_id}/{fault}")


class FaultInjector:
    """The test-only faults of ``faults`` (``FaultsConfig``) for the ranks a process runs, each at
    most once per trial: ``exit_worker`` ends the process (``os._exit(1)``), ``kill_order_server``
    calls ``kill_order_server``."""

    def __init__(
        self,
        faults: FaultsConfig,
        *,
        ranks: range,
        results_root: str,
        trial_id: str,
        kill_order_server: Callable[[], None],
    ) -> None:
        self.faults, self.ranks, self.kill_order_server = faults, ranks, kill_order_server
        self.results_root, self.trial_id = results_root, trial_id

    def at(self, epoch: int, step: int) -> None:
        """Fire the faults whose point is (``epoch``, ``step``, a rank of this process)."""
        for rank in self.ranks:
            where = (epoch, step, rank)
            if fires_once(self.results_root, self.trial_id, "exit_worker", self.faults.exit_worker, *where):
                os._exit(1)
            if fires_once(
                self.results_root, self.trial_id, "kill_order_server", self.faults.kill_order_server, *where
            ):
                self.kill_order_server()


class Workers(Protocol):
    """What a backend does for the loop, for the ranks its process runs.

    Orders, unit gradients and evaluation sums hold one row per rank of ``ranks``.
    """

    ranks: range  # the ranks this process computes
    writes_results: bool  # this process writes the epoch rows and checkpoints (rank 0's role)

    @property
    def bytes_sent(self) -> int:
        """Bytes of ordering inputs sent to the order server this epoch (this process)."""

    @property
    def wait_seconds(self) -> float:
        """Seconds this epoch waited to send to the order server (the in-flight bound, a free ring
        slot, the flush): ``epochs.send_wait_seconds``, not compute and not ``order_wait_seconds``."""

    def start(self, state: dict[str, Any] | None) -> None:
        """Begin a run of the loop from checkpoint ``state`` (None: from scratch)."""

    def fetch_orders(self, epoch: int) -> tuple[np.ndarray, float]:
        """Each rank's order for ``epoch`` (int64 [len(ranks), shard_size]) and the seconds waited."""

    def all_reduce(self, tensor: torch.Tensor) -> float:
        """Sum ``tensor`` over every worker of the trial, in place; return the seconds it took."""

    def observe(self, unit_grads: torch.Tensor) -> None:
        """Hand the ordering a step's unit gradients [len(ranks), k, d] float32 (not written to afterwards)."""

    def finish_steps(self) -> None:
        """The epoch's steps are done: send what is queued."""

    def gather(self, grads: torch.Tensor) -> torch.Tensor | None:
        """Every rank's rows [num_workers, ...] from this process's [len(ranks), ...] (None where
        this process does not write results)."""

    def order_digest(self, epoch: int) -> str:
        """The sha256 of ``epoch``'s orders of all workers."""

    def ordering_state(self, epoch: int) -> dict[str, Any]:
        """The ordering's state after ``epoch``'s items, for a checkpoint."""

    def report(self, row: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        """Hand the epoch's row (and a checkpoint to keep, when given) to the trial's runner."""

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint this trial kept, or None."""

    def kill_order_server(self) -> None:
        """Test-only fault: kill the trial's order server."""


class RankStates:
    """The state a stateful model carries between forward calls (the LSTM's hidden state), kept for
    each rank a process runs, so that every rank continues its own stream.

    A stateful module has ``reset_state()`` and keeps its state in a ``state`` attribute
    (``orderlab.tasks.stateful_modules``).
    """

    def __init__(self, model: nn.Module, num_ranks: int) -> None:
        self.modules = stateful_modules(model)
        self.states: list[list[Any]] = [[None] * len(self.modules) for _ in range(num_ranks)]

    def reset(self) -> None:
        """Every rank starts from a reset state (the start of an epoch)."""
        for module in self.modules:
            module.reset_state()
        self.states = [[module.state for module in self.modules] for _ in self.states]

    @contextlib.contextmanager
    def of_rank(self, index: int) -> Iterator[None]:
        """Run the model with the ``index``-th rank's state, and keep what it leaves."""
        for module, state in zip(self.modules, self.states[index], strict=True):
            module.state = state
        yield
        self.states[index] = [module.state for module in self.modules]


@dataclass
class TrialState:
    """What a process trains for its ranks: the task, their shard, the model (initialised alike on
    every worker), its optimizer and LR schedule, and the stateful model's per-rank state.

    ``build`` makes it from the config; ``checkpoint`` and ``restore`` carry it across restarts.
    """

    task: Task
    shard: Shard
    model: nn.Module
    rank_states: RankStates
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @classmethod
    def build(cls, cfg: ExperimentConfig, plan: TrialPlan, ranks: range, device: torch.device) -> TrialState:
        """Load the task's data and cut the ranks' shard; build the model, optimizer and schedule.

        Raises:
            OrderlabError: missing or corrupt data files.
        """
        task = make_task(cfg.task.name, cfg.task.options)
        data = load_task_data(task, cfg.task.data_dir, cfg.task.train_examples)
        data = task.arrange(data, plan.num_workers, cfg.train.microbatch_size)
        model = build_model(task, cfg.seed).to(device)
        optimizer = make_optimizer(cfg.train, model)
        return cls(
            task=task,
            shard=Shard(data, plan, ranks, device),
            model=model,
            rank_states=RankStates(model, len(ranks)),
            optimizer=optimizer,
            scheduler=make_lr_scheduler(cfg.train, optimizer, plan.steps_per_epoch),
        )

    def checkpoint(self, epoch: int, ordering_state: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint after ``epoch``: model, optimizer, scheduler, torch RNG state, the epoch and
        ``ordering_state`` (the ordering's, once it has every item of the epoch)."""
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "server": ordering_state,
        }

    def restore(self, checkpoint: dict[str, Any]) -> int:
        """Load a ``checkpoint`` into model, optimizer, scheduler and RNG; return the epoch to train next."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"])
        return int(checkpoint["epoch"]) + 1


class HerdingProbe:
    """The parallel herding bound of an epoch's orders, measured at the weights the epoch starts from
    (docs/orderings.md, "Measures").

    Per-unit gradients of a fixed random subsample of ``metrics.herding_units`` local units of each
    rank (seeded from (seed, rank)), each worker's subsample taken in the order the epoch visits it.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        plan: TrialPlan,
        trial: TrialState,
        *,
        ranks: range,
        gather: Callable[[torch.Tensor], torch.Tensor | None],
        device: torch.device,
    ) -> None:
        self.seed, self.unit, self.plan, self.trial = cfg.seed, cfg.train.unit, plan, trial
        self.ranks, self.gather, self.device = ranks, gather, device
        self.count = min(cfg.metrics.herding_units or plan.shard_size, plan.shard_size)

    def measure(self, orders: np.ndarray) -> float | None:
        """The bound of ``orders`` (int64 [len(ranks), shard_size]) over every rank, or None where
        this process writes no results (``gather`` collects every rank's [count, d] gradients)."""
        grads = torch.empty(len(self.ranks), self.count, self.plan.dim, device=self.device)
        for index, (rank, order) in enumerate(zip(self.ranks, orders, strict=True)):
            generator = rng_for(self.seed, rank, 0, DATA)
            units = torch.randperm(self.plan.shard_size, generator=generator)[: self.count]
            first_visit = np.full(self.plan.shard_size, len(order), dtype=np.int64)
            np.minimum.at(first_visit, order, np.arange(len(order)))  # with-replacement may repeat units
            units = units[np.argsort(first_visit[units.numpy()], kind="stable")]
            grads[index] = self.unit_gradients(index, units.numpy())  # [count, d], in visiting order
        vectors = self.gather(grads)  # on the device: NCCL needs device tensors
        if vectors is None:
            return None
        return parallel_herding_bound(
            vectors.cpu(), torch.arange(self.count).repeat(self.plan.num_workers, 1)
        )

    def unit_gradients(self, index: int, units: np.ndarray) -> torch.Tensor:
        """Flat gradients [len(units), d] of the ``index``-th rank's local units at the current weights
        (per-example gradients in batches of 256 for example units; one backward per unit for
        microbatch units)."""
        model, loss, shard = self.trial.model, self.trial.task.loss, self.trial.shard
        if self.unit == "example" and vmap_problem(model) is None:
            batches = [shard.rank_batch(index, units[i : i + 256]) for i in range(0, len(units), 256)]
            return torch.cat([per_example_gradients(model, loss, *batch)[0] for batch in batches])
        grads = []
        for unit in units:
            reset_model_state(model)  # each unit measured from the same state
            grads.append(microbatch_gradient(model, loss, *shard.rank_batch(index, np.array([unit])))[0])
        return torch.stack(grads)


class TrainingLoop:
    """One trial's training for the ranks of ``workers``: task, shard, model, optimizer, schedule.

    Args:
        cfg: the trial's config. plan: its sizes. workers: the backend's side (``Workers``).
        trial_id: the trial's id (the results' key). results_root: the storage root.
        device: where the model and the shard live.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        plan: TrialPlan,
        workers: Workers,
        *,
        trial_id: str,
        results_root: str,
        device: torch.device,
    ) -> None:
        self.cfg, self.plan, self.workers, self.device = cfg, plan, workers, device
        self.trial_id, self.results_root = trial_id, results_root
        self.trial = TrialState.build(cfg, plan, workers.ranks, device)
        self.task, self.shard, self.model = self.trial.task, self.trial.shard, self.trial.model
        self.per_example = plan.needs_gradients and cfg.train.unit == "example"
        if self.per_example:
            check_vmappable(self.model)
        self.herding: HerdingProbe | None = None
        if cfg.metrics.herding:
            self.herding = HerdingProbe(
                cfg, plan, self.trial, ranks=workers.ranks, gather=workers.gather, device=device
            )
        self.faults = FaultInjector(
            cfg.faults,
            ranks=workers.ranks,
            results_root=results_root,
            trial_id=trial_id,
            kill_order_server=workers.kill_order_server,
        )

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs; return what the trial records: status (completed or
        diverged), diverged_epoch and error when it diverged, and test_metrics."""
        outcome: dict[str, Any] = {"status": "completed"}
        start = self.restore_checkpoint()
        for epoch in range(start, self.cfg.train.epochs):
            orders, wait_seconds = self.workers.fetch_orders(epoch)
            herding = self.herding.measure(orders) if self.herding is not None else None
            times, diverged = self.run_epoch(epoch, orders)
            times.order_wait_seconds += wait_seconds
            times.epoch_seconds += wait_seconds
            self.finish_epoch(epoch, times, herding, checkpoint=diverged is None)
            if diverged is not None:
                outcome = {"status": "diverged", "diverged_epoch": epoch, "error": diverged}
                break
        return {**outcome, "test_metrics": self.test_metrics(outcome["status"])}

    def run_epoch(self, epoch: int, orders: np.ndarray) -> tuple[EpochTimes, str | None]:
        """All steps of one epoch in ``orders`` (local unit indices, int64 [len(ranks), shard_size]).

        Returns:
            The epoch's times, and why training diverged (a non-finite loss or gradient) or None.
        """
        times, started, diverged = EpochTimes(), time.perf_counter(), None
        self.model.train()
        self.trial.rank_states.reset()  # the LSTM carries its hidden state across the epoch's chunks
        k = self.plan.units_per_step
        for step in range(self.plan.steps_per_epoch):
            self.faults.at(epoch, step)
            step_started = time.perf_counter()
            inputs, targets = self.shard.batch(orders[:, step * k : (step + 1) * k])
            unit_grads, reduced = self.step_gradients(inputs, targets)  # reduced: [sum of gradients; loss]
            allreduce_seconds = self.workers.all_reduce(reduced)
            times.allreduce_seconds += allreduce_seconds
            if not bool(torch.isfinite(reduced).all()):  # every rank sees the same sum: all stop here
                what = "gradient" if bool(torch.isfinite(reduced[-1])) else "loss"
                diverged = f"non-finite {what} at epoch {epoch}, step {step}"
                break
            assign_flat_gradient(self.model, reduced[:-1] / self.plan.num_workers, self.cfg.train.grad_clip)
            self.trial.optimizer.step()
            self.trial.scheduler.step()
            if unit_grads is not None:
                self.workers.observe(unit_grads)
            times.compute_seconds += time.perf_counter() - step_started - allreduce_seconds
        times.compute_seconds -= self.workers.wait_seconds  # waits on the in-flight bound are not compute
        if diverged is None:
            self.workers.finish_steps()
        times.send_wait_seconds = self.workers.wait_seconds
        times.epoch_seconds = time.perf_counter() - started
        return times, diverged

    def step_gradients(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One step of every rank this process runs, on its rows of ``inputs``/``targets`` (rank-major).

        Returns:
            (unit gradients [len(ranks), k, d] for the ordering or None, and the sum over those
            ranks of [each rank's mean gradient; its mean loss], float32 [d + 1]). Ranks' examples go
            through the model in one call when no rank's model state or own gradient is needed.
        """
        num_ranks = len(self.workers.ranks)
        per_rank_gradients = self.plan.needs_gradients and not self.per_example  # microbatch units
        if not self.trial.rank_states.modules and not per_rank_gradients:
            return self.gradients(inputs, targets, groups=num_ranks)
        parts = []
        for index, (rank_inputs, rank_targets) in enumerate(
            zip(inputs.chunk(num_ranks), targets.chunk(num_ranks), strict=True)
        ):
            with self.trial.rank_states.of_rank(index):
                parts.append(self.gradients(rank_inputs, rank_targets, groups=1))
        rank_grads = [grads for grads, _ in parts if grads is not None]  # every rank's, or none
        unit_grads = torch.cat(rank_grads) if rank_grads else None
        return unit_grads, torch.stack([reduced for _, reduced in parts]).sum(dim=0)

    def gradients(
        self, inputs: torch.Tensor, targets: torch.Tensor, groups: int
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``step_gradients`` for ``groups`` ranks' rows in one call."""
        if self.per_example:
            grads, losses = per_example_gradients(self.model, self.task.loss, inputs, targets, groups)
            unit_grads = grads.view(groups, -1, grads.shape[1])
            return unit_grads, torch.cat([unit_grads.mean(dim=1).sum(dim=0), losses.sum().view(1)])
        grad, losses = microbatch_gradient(self.model, self.task.loss, inputs, targets, groups)
        microbatch_grads = grad.view(1, 1, -1) if self.plan.needs_gradients else None
        return microbatch_grads, torch.cat([grad, losses.sum().view(1)])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Full-pass train loss at fixed weights over all shards and the validation loss/metric.

        Each rank's sums are taken on its own shard and added over ranks. Stateful models (the
        LSTM) start each pass from a reset state and read the shard chunk by chunk over its
        ``unit_size`` streams.
        """
        self.model.eval()
        streams = self.plan.unit_size if self.cfg.train.unit == "microbatch" else None
        sums = torch.zeros(7, dtype=torch.float64, device=self.device)
        for index in range(len(self.workers.ranks)):
            reset_model_state(self.model)
            train = self.task.evaluate_sums(self.model, *self.shard.train_rows(index), num_streams=streams)
            reset_model_state(self.model)
            val = self.task.evaluate_sums(
                self.model, self.shard.val_inputs[index], self.shard.val_targets[index]
            )
            rank_sums = [*train, *val, self.workers.bytes_sent if index == 0 else 0]
            sums += torch.tensor(rank_sums, dtype=torch.float64, device=self.device)
        self.workers.all_reduce(sums)
        train_loss, _, train_count, val_loss, val_metric, val_count, bytes_sent = sums.tolist()
        return {
            "train_loss": train_loss / train_count,
            "val_loss": val_loss / val_count,
            "val_metric": self.task.finalize_metric(val_loss / val_count, val_metric / val_count),
            "bytes_to_server": int(bytes_sent),
        }

    def finish_epoch(
        self, epoch: int, times: EpochTimes, herding: float | None, checkpoint: bool = True
    ) -> None:
        """Evaluate, write the epoch row and a checkpoint keyed by epoch (where this process writes
        results), and report the row with ``epochs_done`` (epoch + 1)."""
        metrics = self.evaluate()
        row = {
            "trial_id": self.trial_id,
            "sweep": self.cfg.name,
            "epoch": epoch,
            **metrics,
            "val_metric_name": self.task.metric_name,
            "lr": self.trial.optimizer.param_groups[0]["lr"],
            "herding": herding,
            **asdict(times),
        }
        if not self.workers.writes_results:
            self.workers.report({**row, "epochs_done": epoch + 1}, None)
            return
        row["order_digest"] = self.workers.order_digest(epoch)
        results.write_epoch(self.results_root, row)
        state = self.trial.checkpoint(epoch, self.workers.ordering_state(epoch)) if checkpoint else None
        # epochs_done: the time unit of Tune's schedulers (orderlab.search.TIME_ATTR)
        self.workers.report({**row, "epochs_done": epoch + 1}, state)

    def restore_checkpoint(self) -> int:
        """Load the latest checkpoint into model, optimizer, scheduler and RNG, start the workers
        from it, and return the first epoch to train.

        The checkpoint names its epoch, so training resumes right after it whatever other (orphaned)
        checkpoint folders exist, and the ordering returns to its state at that epoch.
        """
        state = self.workers.latest_checkpoint()
        start = 0 if state is None else self.trial.restore(state)
        self.workers.start(state)
        return start

    def test_metrics(self, status: str) -> str | None:
        """The task's held-out test metrics of the final model as JSON (where this process writes
        results, completed trials), or None."""
        if not self.workers.writes_results or status != "completed":
            return None
        self.model.eval()
        metrics = self.task.test_metrics(self.model, resolve_data_dir(self.cfg.task.data_dir))
        return json.dumps(metrics) if metrics else None
