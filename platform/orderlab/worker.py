"""The per-worker training loop run by ``ray.train.torch.TorchTrainer``.

Each epoch reads top to bottom: fetch the order from the order server, run the steps (gradients
per unit, one all-reduce of the mean gradient, optimizer and LR schedule, batched fire-and-forget
messages to the server), flush, evaluate, and (rank 0) write the epoch row and a checkpoint.
Nothing on the training step waits for the server except the bounded in-flight window; only the
next epoch's order does.

Shards: the task's training examples are cut into units (1 example, or ``microbatch_size``
consecutive examples for ``unit: microbatch``); worker w owns units [w*n, (w+1)*n) with
n = shard_size; the tail that does not fill W equal shards of whole steps is dropped and reported.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from orderlab import results
from orderlab.channel import WIRE_DTYPES, MessageRing, default_ring_directory, memory_fence
from orderlab.config import ExperimentConfig, FaultPoint, TrainConfig
from orderlab.errors import OrderlabError
from orderlab.grads import (
    CountSketch,
    assign_flat_gradient,
    check_vmappable,
    microbatch_gradient,
    per_example_gradients,
    vmap_problem,
)
from orderlab.herding import parallel_herding_bound
from orderlab.orderings._balance import PairStream
from orderlab.seeding import DATA, MODEL, rng_for, seed_for
from orderlab.server import PAYLOAD_DTYPES, OrderMessage, OrderServerRestarted, to_wire
from orderlab.tasks import Task, TaskData, load_task_data, make_task, reset_model_state, resolve_data_dir

CHECKPOINT_FILE = "checkpoint.pt"
MAX_SLOT_BYTES = 64 * 2**20  # a ring slot holds fewer than message_steps steps when they need more


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
    """Worker ``rank``'s units as example index rows, and its slice of the validation set.

    Attributes:
        unit_examples: LongTensor [shard_size, unit_size], the examples of each local unit.
    """

    def __init__(self, data: TaskData, plan: TrialPlan, rank: int, device: torch.device) -> None:
        first = rank * plan.shard_size * plan.unit_size
        examples = torch.arange(first, first + plan.shard_size * plan.unit_size)
        self.unit_examples = examples.view(plan.shard_size, plan.unit_size)
        self.inputs = data.train_inputs[examples].to(device)
        self.targets = data.train_targets[examples].to(device)
        self.first = first
        self.val_inputs = data.val_inputs[rank :: plan.num_workers].to(device)
        self.val_targets = data.val_targets[rank :: plan.num_workers].to(device)

    def batch(self, units: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of ``units`` (local unit indices), in that order."""
        rows = (self.unit_examples[torch.from_numpy(units)].reshape(-1) - self.first).to(self.inputs.device)
        return self.inputs[rows], self.targets[rows]


class ServerMessenger:
    """Batches a worker's reductions into keyed messages with a bounded number in flight.

    Per step: form pair differences (pair orderings), sketch them (optional), and write them in
    ``payload_dtype`` into a send buffer; every ``message_steps`` steps, send the buffered rows. A
    pair difference is written once, straight from the two unit gradients. Two transports:

    - ``shared_memory`` (CPU workers on the server's node): the send buffer is the next free slot
      of a ``MessageRing`` that the server polls; sending publishes the slot. The ring has
      ``max_in_flight`` + 1 slots (more when a slot holds fewer than ``message_steps`` steps, see
      ``_next_slot``), so a worker waits only when the server is that far behind. Once the ring
      exists, the server also hands the worker its orders there (``fetch_order``).
    - ``ray``: the send buffer stays on the device and ``push.remote`` sends a view of its rows (Ray
      copies arguments when a call is made, so the buffer is reused at once); at most
      ``max_in_flight`` calls are outstanding.

    Args:
        shard_size: the length of this worker's orders: the ring gets room for them (0: orders
            always come through ``begin_epoch``).

    Raises (from ``add``, ``flush`` and ``fetch_order``):
        OrderServerRestarted: the server no longer has this worker's ring (Ray restarted it), or is
            at another worker group's generation.
        ray.exceptions.RayActorError: the server died.
    """

    def __init__(
        self,
        server: Any,
        rank: int,
        message_kind: str,
        message_steps: int,
        max_in_flight: int,
        sketch: CountSketch | None = None,
        payload_dtype: str = "float32",
        transport: str = "ray",
        ring_directory: str | None = None,
        shard_size: int = 0,
    ) -> None:
        self.server, self.rank, self.message_kind, self.shard_size = server, rank, message_kind, shard_size
        self.message_steps, self.max_in_flight = message_steps, max_in_flight
        self.sketch, self.payload_dtype, self.transport = sketch, payload_dtype, transport
        self.ring_directory = ring_directory or default_ring_directory()
        self.generation = 0  # set from OrderServer.reset when the worker group starts
        self.in_flight: deque = deque()
        self.pairs = PairStream()
        self.send_buffer: torch.Tensor | None = None  # [capacity, d or sketch_dim] in the payload dtype
        self.ring: MessageRing | None = None  # shared_memory: created at the first message
        if transport == "shared_memory":
            memory_fence()  # numba's first call in this process (0.4 s) now, not at the first message
        self.begin_epoch(0)

    def begin_epoch(self, epoch: int) -> None:
        self.epoch, self.items_sent, self.bytes_sent, self.wait_seconds = epoch, 0, 0, 0.0
        self.rows_buffered = self.steps_buffered = 0
        self.pairs.reset()  # odd shard size: the last unit pairs with nothing

    def add(self, unit_grads: torch.Tensor) -> None:
        """Queue one step's unit gradients [k, d]; send when ``message_steps`` steps are queued.

        ``unit_grads`` must not be written to afterwards (an unpaired unit is kept as a view).
        """
        if self.message_kind == "pair_differences":
            for firsts, seconds in self.pairs.pairs(unit_grads):
                self._write(firsts, seconds)
        elif len(unit_grads):
            self._write(unit_grads)
        self.steps_buffered += 1
        if self.steps_buffered >= self.message_steps:
            self._send()

    def flush(self) -> None:
        """Send what is queued; with Ray calls, wait for their replies (their errors surface here).

        A ring's messages are not waited for: the server's ``begin_epoch`` and ``snapshot(epoch)``
        wait until it has applied the epoch's items, so it balances the last of them while the
        workers evaluate.
        """
        self._send()
        started = time.perf_counter()
        ray.get(list(self.in_flight))
        self.in_flight.clear()
        self.wait_seconds += time.perf_counter() - started

    def _write(self, rows: torch.Tensor, subtract: torch.Tensor | None = None) -> None:
        """Append ``rows`` [p, d] (minus ``subtract`` [p, d] when given) to the send buffer."""
        if self.sketch is not None:
            rows, subtract = self.sketch(rows if subtract is None else rows - subtract), None
        target = self._reserve(len(rows), rows.shape[1], rows.device)
        if subtract is None:
            target.copy_(rows)
        else:
            torch.sub(rows, subtract, out=target)

    def _reserve(self, count: int, width: int, device: torch.device) -> torch.Tensor:
        """The next ``count`` rows of the send buffer: of the ring's slot, or of a buffer that grows
        (keeping its rows) when full."""
        if self.transport == "shared_memory":
            if self.send_buffer is not None and self.rows_buffered + count > len(self.send_buffer):
                self._send()  # the slot is full: send it early
            if self.send_buffer is None:
                self.send_buffer = self._next_slot(count, width)
        elif self.send_buffer is None or len(self.send_buffer) < self.rows_buffered + count:
            grown = torch.empty(
                2 * (self.rows_buffered + count),
                width,
                dtype=PAYLOAD_DTYPES[self.payload_dtype],
                device=device,
            )
            if self.rows_buffered:
                grown[: self.rows_buffered] = self.send_buffer[: self.rows_buffered]
            self.send_buffer = grown
        self.rows_buffered += count
        return self.send_buffer[self.rows_buffered - count : self.rows_buffered]

    def _next_slot(self, count: int, width: int) -> torch.Tensor:
        """The ring's next free slot as a tensor [rows, width] in the payload dtype (creating the ring
        at the first message).

        A slot holds ``message_steps`` steps of up to ``count`` + 1 rows (at most ``MAX_SLOT_BYTES``).
        When it holds fewer steps, the ring gets enough extra slots for ``message_steps`` + 1 steps:
        a slot is released only once every rank's rows for it have arrived, and a rank sending with
        Ray calls sends them every ``message_steps`` steps, so fewer slots could wait on it forever.

        Raises:
            OrderlabError: the ring cannot be created, or the server cannot open it.
        """
        wire = WIRE_DTYPES[self.payload_dtype]
        if self.ring is None:
            row_bytes, step_rows = width * wire.itemsize, count + 1
            rows = max(count + 2, min(self.message_steps * step_rows + 1, MAX_SLOT_BYTES // row_bytes))
            lag_slots = math.ceil((self.message_steps + 1) * step_rows / rows)  # a Ray rank's lag
            slots = max(self.max_in_flight + 1, lag_slots + 1)
            try:
                self.ring = MessageRing.create(slots, rows * row_bytes, self.ring_directory, self.shard_size)
            except OSError as error:
                raise OrderlabError(
                    f"worker {self.rank} cannot create a shared-memory ring of {slots} × {rows * row_bytes / 2**20:.0f} "
                    f"MiB in {self.ring_directory} ({error}); free space there or set ordering.ring_directory "
                    "to a tmpfs directory that every node has, lower ordering.message_steps or max_in_flight, "
                    "or set ordering.transport: ray"
                ) from error
            try:
                ray.get(self.server.attach_ring.remote(self.rank, self.ring.path))
            except FileNotFoundError as error:  # e.g. the server's /dev/shm is not this worker's
                raise OrderlabError(
                    f"the order server cannot open worker {self.rank}'s ring {self.ring.path} ({error}); "
                    "set ordering.transport: ray"
                ) from error
            finally:
                self.ring.unlink()  # the server has mapped it (or failed): the memory lives on in the mappings
        self.wait_seconds += self.ring.wait_for_slot(self._check_ring)
        slot = torch.from_numpy(self.ring.slot_array(width, wire))
        if len(slot) < count:
            raise ValueError(f"a step's {count} rows exceed a ring slot's {len(slot)}")
        return slot.view(torch.bfloat16) if self.payload_dtype == "bfloat16" else slot

    def fetch_order(self, epoch: int) -> tuple[np.ndarray, float]:
        """This worker's order for ``epoch`` (int64 [shard_size]) and the seconds spent waiting for
        it: from the ring once it exists, else through ``begin_epoch``, which also checks the
        generation."""
        if self.ring is not None and self.shard_size > 0:
            return self.ring.wait_for_order(epoch, self._check_ring)
        started = time.perf_counter()
        order = ray.get(self.server.begin_epoch.remote(epoch, self.rank, self.generation))
        return order, time.perf_counter() - started

    def _check_ring(self) -> None:
        """Called while waiting on the ring: raise when the server no longer reads it."""
        if not ray.get(self.server.has_ring.remote(self.rank, self.ring.path)):
            raise OrderServerRestarted(
                f"worker {self.rank}: the order server no longer reads this worker's ring (Ray restarted it)"
            )

    def _send(self) -> None:
        self.steps_buffered = 0
        if not self.rows_buffered:
            return
        rows, self.rows_buffered = self.rows_buffered, 0
        items = to_wire(self.send_buffer[:rows])  # one device-to-host copy on GPUs
        if self.ring is not None:
            self.ring.publish(
                self.epoch, self.items_sent, self.rank, rows, items.shape[1], items.dtype, self.generation
            )
            self.send_buffer = None  # the slot now belongs to the server until it releases it
        else:
            message = OrderMessage(self.epoch, self.items_sent, self.rank, items, self.generation)
            self.in_flight.append(self.server.push.remote([message]))  # Ray copies items here
        self.items_sent += rows
        self.bytes_sent += items.nbytes
        if len(self.in_flight) > self.max_in_flight:
            started = time.perf_counter()
            ray.get(self.in_flight.popleft())
            self.wait_seconds += time.perf_counter() - started


def message_transport(transport: str, server: Any, device: torch.device) -> str:
    """The transport a worker uses (``ordering.transport``): ``auto`` is ``shared_memory`` for a CPU
    worker on the server's node on Linux (the only system the rings are built and tested on: their
    memory allocation, named pipes and huge-page advice are Linux's) and ``ray`` otherwise.

    Raises:
        OrderlabError: ``shared_memory`` asked for on another node, on a GPU, or off Linux.
    """
    if transport == "ray":
        return transport
    if sys.platform != "linux":
        if transport == "shared_memory":
            raise OrderlabError(
                f"ordering.transport: shared_memory needs Linux (this worker runs on {sys.platform}); "
                "use auto or ray"
            )
        return "ray"
    same_node = ray.get(server.node_id.remote()) == ray.get_runtime_context().get_node_id()
    if same_node and device.type == "cpu":
        return "shared_memory"
    if transport == "shared_memory":
        raise OrderlabError(
            "ordering.transport: shared_memory needs CPU workers on the order server's node "
            f"(this worker: {device.type}, {'same' if same_node else 'another'} node); use auto or ray"
        )
    return "ray"


@dataclass
class EpochTimes:
    """Seconds spent in one epoch, by part (rank 0's clock)."""

    epoch_seconds: float = 0.0
    compute_seconds: float = 0.0
    allreduce_seconds: float = 0.0
    order_wait_seconds: float = 0.0


def fires_once(
    results_root: str, trial_id: str, fault: str, point: FaultPoint | None, epoch: int, step: int, rank: int
) -> bool:
    """True the first time a test-only fault's point is reached in a trial (a marker file remembers)."""
    if point is None or (point.epoch, point.step, point.rank) != (epoch, step, rank):
        return False
    return results.create_marker(results_root, f"_faults/{trial_id}/{fault}")


class WorkerLoop:
    """One worker's state for a trial: task, shard, model, optimizer, schedule, messenger."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        self.cfg = ExperimentConfig.model_validate(loop_config["config"])
        self.plan = TrialPlan(**loop_config["plan"])
        self.server = loop_config["server"]
        self.trial_id: str = loop_config["trial_id"]
        self.results_root: str = loop_config["results_root"]
        self.rank = ray.train.get_context().get_world_rank()
        torch.set_num_threads(self.cfg.resources.num_threads)
        self.device = ray.train.torch.get_device()
        self.task = make_task(self.cfg.task.name, self.cfg.task.options)
        data = load_task_data(self.task, self.cfg.task.data_dir, self.cfg.task.train_examples)
        data = self.task.arrange(data, self.plan.num_workers, self.cfg.train.microbatch_size)
        self.shard = Shard(data, self.plan, self.rank, self.device)
        self.model = build_model(self.task, self.cfg.seed).to(self.device)
        self.per_example = self.plan.needs_gradients and self.cfg.train.unit == "example"
        if self.per_example:
            check_vmappable(self.model)
        self.optimizer = make_optimizer(self.cfg.train, self.model)
        self.scheduler = make_lr_scheduler(self.cfg.train, self.optimizer, self.plan.steps_per_epoch)
        ordering = self.cfg.ordering
        sketch = None
        if ordering.sketch_dim is not None and self.plan.needs_gradients:
            sketch = CountSketch(self.plan.dim, ordering.sketch_dim, self.cfg.seed, self.device)
        self.messenger = ServerMessenger(
            self.server,
            self.rank,
            self.plan.message_kind,
            ordering.message_steps,
            ordering.max_in_flight,
            sketch,
            ordering.payload_dtype,
            message_transport(ordering.transport, self.server, self.device)
            if self.plan.needs_gradients
            else "ray",
            ordering.ring_directory,
            self.plan.shard_size,
        )

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs; return what the trial records (rank 0's return value reaches it).

        Raises:
            RuntimeError: the order server died (Ray Train restarts the worker group from the last
                checkpoint when ``train.max_failures`` allows).
        """
        outcome: dict[str, Any] = {"status": "completed"}
        try:
            start = self.start_generation(self.restore_checkpoint())
            for epoch in range(start, self.cfg.train.epochs):
                order, wait_seconds = self.messenger.fetch_order(epoch)
                herding = self.measure_herding(order) if self.cfg.metrics.herding else None
                times, diverged = self.run_epoch(epoch, order)
                times.order_wait_seconds += wait_seconds
                times.epoch_seconds += wait_seconds
                self.finish_epoch(epoch, times, herding, checkpoint=diverged is None)
                if diverged is not None:
                    outcome = {"status": "diverged", "diverged_epoch": epoch, "error": diverged}
                    break
        except (
            ray.exceptions.RayActorError,
            ray.exceptions.ActorUnavailableError,
            OrderServerRestarted,
        ) as error:
            raise RuntimeError(
                f"the order server of trial {self.trial_id} died ({type(error).__name__}); with "
                "train.max_failures >= 1 the trial restarts from its last checkpoint"
            ) from error
        node_ids: list[Any] = [None] * self.plan.num_workers
        dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
        return {**outcome, "worker_node_ids": node_ids, "test_metrics": self.test_metrics(outcome["status"])}

    def test_metrics(self, status: str) -> str | None:
        """The task's held-out test metrics of the final model as JSON (rank 0, completed trials), or None."""
        if self.rank != 0 or status != "completed":
            return None
        self.model.eval()
        metrics = self.task.test_metrics(self.model, resolve_data_dir(self.cfg.task.data_dir))
        return json.dumps(metrics) if metrics else None

    def start_generation(self, state: dict[str, Any] | None) -> int:
        """Reset the order server to the checkpoint (rank 0) and share its generation; return the first epoch.

        Every start of a worker group (first start, Ray Train restart, resumed sweep) begins a new
        generation, so messages still in flight from a crashed group are dropped by the server.
        """
        generation = [
            ray.get(self.server.reset.remote(state["server"] if state else None)) if self.rank == 0 else 0
        ]
        dist.broadcast_object_list(generation, src=0)
        self.messenger.generation = generation[0]
        return 0 if state is None else int(state["epoch"]) + 1

    def run_epoch(self, epoch: int, order: np.ndarray) -> tuple[EpochTimes, str | None]:
        """All steps of one epoch in ``order`` (local unit indices [shard_size]).

        Returns:
            The epoch's times, and why training diverged (a non-finite loss or gradient) or None.
        """
        times, started, diverged = EpochTimes(), time.perf_counter(), None
        self.model.train()
        reset_model_state(self.model)  # the LSTM carries its hidden state across the epoch's chunks
        self.messenger.begin_epoch(epoch)
        k = self.plan.units_per_step
        for step in range(self.plan.steps_per_epoch):
            self.inject_faults(epoch, step)
            step_started = time.perf_counter()
            inputs, targets = self.shard.batch(order[step * k : (step + 1) * k])
            unit_grads, step_grad, step_loss = self.step_gradients(inputs, targets)
            reduced = torch.cat([step_grad, step_loss.view(1)])  # one all-reduce: gradient and loss
            allreduce_started = time.perf_counter()
            dist.all_reduce(reduced)
            allreduce_seconds = time.perf_counter() - allreduce_started
            times.allreduce_seconds += allreduce_seconds
            if not bool(torch.isfinite(reduced).all()):  # every rank sees the same sum: all stop here
                what = "gradient" if bool(torch.isfinite(reduced[-1])) else "loss"
                diverged = f"non-finite {what} at epoch {epoch}, step {step}"
                break
            assign_flat_gradient(self.model, reduced[:-1] / self.plan.num_workers, self.cfg.train.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if unit_grads is not None:
                self.messenger.add(unit_grads)
            times.compute_seconds += time.perf_counter() - step_started - allreduce_seconds
        times.compute_seconds -= self.messenger.wait_seconds  # waits on the in-flight bound are not compute
        if diverged is None:
            self.messenger.flush()
        times.order_wait_seconds += self.messenger.wait_seconds
        times.epoch_seconds = time.perf_counter() - started
        return times, diverged

    def step_gradients(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(unit gradients [k, d] for the ordering or None, this worker's mean gradient [d], its mean loss [])."""
        if self.per_example:
            grads, loss = per_example_gradients(self.model, self.task.loss, inputs, targets)
            return grads, grads.mean(dim=0), loss
        grad, loss = microbatch_gradient(self.model, self.task.loss, inputs, targets)
        return (grad.unsqueeze(0) if self.plan.needs_gradients else None), grad, loss

    def inject_faults(self, epoch: int, step: int) -> None:
        """Test-only faults of ``cfg.faults``, each at most once per trial."""
        faults, where = self.cfg.faults, (epoch, step, self.rank)
        if fires_once(self.results_root, self.trial_id, "exit_worker", faults.exit_worker, *where):
            os._exit(1)
        if fires_once(
            self.results_root, self.trial_id, "kill_order_server", faults.kill_order_server, *where
        ):
            ray.kill(self.server, no_restart=False)

    def measure_herding(self, order: np.ndarray) -> float | None:
        """Parallel herding bound of this epoch's orders (rank 0 gets it; others None).

        Per-unit gradients of a fixed random subsample of ``metrics.herding_units`` local units
        (seeded from (seed, rank)), at the weights the epoch starts from; each worker's subsample
        is taken in the order the epoch visits it (docs/orderings.md, "Measures").
        """
        count = min(self.cfg.metrics.herding_units or self.plan.shard_size, self.plan.shard_size)
        units = torch.randperm(self.plan.shard_size, generator=rng_for(self.cfg.seed, self.rank, 0, DATA))[
            :count
        ]
        first_visit = np.full(self.plan.shard_size, len(order), dtype=np.int64)
        np.minimum.at(first_visit, order, np.arange(len(order)))  # with-replacement may repeat or skip units
        units = units[np.argsort(first_visit[units.numpy()], kind="stable")]
        grads = self.unit_gradients(units.numpy())  # [count, d], in visiting order
        gathered = [torch.empty_like(grads) for _ in range(self.plan.num_workers)] if self.rank == 0 else None
        dist.gather(grads, gathered, dst=0)  # on the device: NCCL needs device tensors
        if self.rank != 0:
            return None
        vectors = torch.stack(gathered).cpu()  # [W, count, d]
        return parallel_herding_bound(vectors, torch.arange(count).repeat(self.plan.num_workers, 1))

    def unit_gradients(self, units: np.ndarray) -> torch.Tensor:
        """Flat gradients [len(units), d] of local units at the current weights (per-example gradients
        in batches of 256 for example units; one backward per unit for microbatch units)."""
        if self.cfg.train.unit == "example" and vmap_problem(self.model) is None:
            batches = [self.shard.batch(units[i : i + 256]) for i in range(0, len(units), 256)]
            return torch.cat(
                [per_example_gradients(self.model, self.task.loss, *batch)[0] for batch in batches]
            )
        grads = []
        for unit in units:
            reset_model_state(self.model)  # each unit measured from the same state
            grads.append(
                microbatch_gradient(self.model, self.task.loss, *self.shard.batch(np.array([unit])))[0]
            )
        return torch.stack(grads)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Full-pass train loss at fixed weights over all shards and the validation loss/metric (all-reduced).

        Stateful models (the LSTM) start each pass from a reset state and read the shard chunk by
        chunk over its ``unit_size`` streams.
        """
        self.model.eval()
        streams = self.plan.unit_size if self.cfg.train.unit == "microbatch" else None
        reset_model_state(self.model)
        train = self.task.evaluate_sums(
            self.model, self.shard.inputs, self.shard.targets, num_streams=streams
        )
        reset_model_state(self.model)
        val = self.task.evaluate_sums(self.model, self.shard.val_inputs, self.shard.val_targets)
        sums = torch.tensor(
            [*train, *val, self.messenger.bytes_sent], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(sums)
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
        """Evaluate, write the epoch row and (rank 0) a checkpoint keyed by epoch; report to Ray Train once."""
        metrics = self.evaluate()
        row = {
            "trial_id": self.trial_id,
            "sweep": self.cfg.name,
            "epoch": epoch,
            **metrics,
            "val_metric_name": self.task.metric_name,
            "lr": self.optimizer.param_groups[0]["lr"],
            "herding": herding,
            **asdict(times),
        }
        if self.rank != 0:
            ray.train.report(row, checkpoint=None)
            return
        row["order_digest"] = ray.get(self.server.order_digest.remote(epoch))
        results.write_epoch(self.results_root, row)
        if not checkpoint:
            ray.train.report(row, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as directory:
            state = {
                "epoch": epoch,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                # once all ranks' items of the epoch are in
                "server": ray.get(self.server.snapshot.remote(epoch, self.messenger.generation)),
            }
            torch.save(state, Path(directory) / CHECKPOINT_FILE)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def restore_checkpoint(self) -> dict[str, Any] | None:
        """Load the latest registered checkpoint into model, optimizer, scheduler and RNG; return it (or None).

        The checkpoint names its epoch, so training resumes right after it whatever other (orphaned)
        checkpoint folders exist, and the order server is reset to the snapshot taken at that epoch.
        """
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        return state


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: ``loop_config`` holds config (dict), plan (dict), server, trial_id, results_root."""
    return WorkerLoop(loop_config).run()
