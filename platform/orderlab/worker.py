"""The Ray Train side of the training loop: one rank per worker process.

``train_loop`` is the ``ray.train.torch.TorchTrainer`` entry point: it runs ``orderlab.loop``'s
``TrainingLoop`` with ``RayTrainWorkers``, which fetches orders from the trial's order server,
all-reduces each step's gradient sum with ``torch.distributed`` (gloo on CPU, NCCL on GPU), sends
the ordering's inputs to the server in batched fire-and-forget messages (``ServerMessenger``), and
keeps checkpoints with Ray Train. Nothing on the training step waits for the server except the
bounded in-flight window; only the next epoch's order does.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections import deque
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from orderlab.channel import WIRE_DTYPES, MessageRing, default_ring_directory, memory_fence
from orderlab.config import ExperimentConfig
from orderlab.errors import OrderlabError
from orderlab.grads import CountSketch
from orderlab.loop import TrainingLoop, TrialPlan, load_checkpoint, save_checkpoint
from orderlab.orderings import PairStream
from orderlab.server import OrderMessage, OrderServerRestarted
from orderlab.wire import PAYLOAD_DTYPES, to_wire

MAX_SLOT_BYTES = 64 * 2**20  # a ring slot holds fewer than message_steps steps when they need more


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
            if self.send_buffer is not None and self.rows_buffered:
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
        assert self.ring is not None  # only the ring's waits call this
        if not ray.get(self.server.has_ring.remote(self.rank, self.ring.path)):
            raise OrderServerRestarted(
                f"worker {self.rank}: the order server no longer reads this worker's ring (Ray restarted it)"
            )

    def _send(self) -> None:
        self.steps_buffered = 0
        if not self.rows_buffered:
            return
        rows, self.rows_buffered = self.rows_buffered, 0
        assert self.send_buffer is not None  # it holds the rows buffered
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


class RayTrainWorkers:
    """``orderlab.loop.Workers`` for one Ray Train worker: rank ``ray.train``'s world rank.

    Args:
        cfg: the trial's config. plan: its sizes. server: the trial's order-server actor handle.
        device: this worker's device (``ray.train.torch.get_device()``).
    """

    def __init__(self, cfg: ExperimentConfig, plan: TrialPlan, server: Any, device: torch.device) -> None:
        rank = ray.train.get_context().get_world_rank()
        self.ranks, self.writes_results = range(rank, rank + 1), rank == 0
        self.plan, self.server, self.rank = plan, server, rank
        ordering = cfg.ordering
        sketch = None
        if ordering.sketch_dim is not None and plan.needs_gradients:
            sketch = CountSketch(plan.dim, ordering.sketch_dim, cfg.seed, device)
        transport = message_transport(ordering.transport, server, device) if plan.needs_gradients else "ray"
        self.messenger = ServerMessenger(
            server,
            rank,
            plan.message_kind,
            ordering.message_steps,
            ordering.max_in_flight,
            sketch,
            ordering.payload_dtype,
            transport,
            ordering.ring_directory,
            plan.shard_size,
        )

    @property
    def bytes_sent(self) -> int:
        return self.messenger.bytes_sent

    @property
    def wait_seconds(self) -> float:
        return self.messenger.wait_seconds

    def start(self, state: dict[str, Any] | None) -> None:
        """Reset the order server to the checkpoint (rank 0) and share its generation.

        Every start of a worker group (first start, Ray Train restart, resumed sweep) begins a new
        generation, so messages still in flight from a crashed group are dropped by the server.
        """
        generation = [
            ray.get(self.server.reset.remote(state["server"] if state else None)) if self.rank == 0 else 0
        ]
        dist.broadcast_object_list(generation, src=0)
        self.messenger.generation = generation[0]

    def fetch_orders(self, epoch: int) -> tuple[np.ndarray, float]:
        order, wait_seconds = self.messenger.fetch_order(epoch)
        self.messenger.begin_epoch(epoch)
        return order[np.newaxis], wait_seconds

    def all_reduce(self, tensor: torch.Tensor) -> float:
        started = time.perf_counter()
        dist.all_reduce(tensor)
        return time.perf_counter() - started

    def observe(self, unit_grads: torch.Tensor) -> None:
        self.messenger.add(unit_grads[0])

    def finish_steps(self) -> None:
        self.messenger.flush()

    def gather(self, grads: torch.Tensor) -> torch.Tensor | None:
        rows = grads[0]
        gathered = [torch.empty_like(rows) for _ in range(self.plan.num_workers)] if self.rank == 0 else None
        dist.gather(rows, gathered, dst=0)
        return torch.stack(gathered) if gathered is not None else None  # rank 0

    def order_digest(self, epoch: int) -> str:
        return ray.get(self.server.order_digest.remote(epoch))

    def ordering_state(self, epoch: int) -> dict[str, Any]:
        return ray.get(self.server.snapshot.remote(epoch, self.messenger.generation))

    def report(self, row: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        if checkpoint is None:
            ray.train.report(row, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(checkpoint, directory)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def latest_checkpoint(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_checkpoint(directory)

    def kill_order_server(self) -> None:
        ray.kill(self.server, no_restart=False)


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: ``loop_config`` holds config (dict), plan (dict), server, trial_id, results_root.

    Raises:
        RuntimeError: the order server died (Ray Train restarts the worker group from the last
            checkpoint when ``train.max_failures`` allows).
    """
    cfg = ExperimentConfig.model_validate(loop_config["config"])
    plan = TrialPlan(**loop_config["plan"])
    torch.set_num_threads(cfg.resources.num_threads)
    device = ray.train.torch.get_device()
    workers = RayTrainWorkers(cfg, plan, loop_config["server"], device)
    loop = TrainingLoop(
        cfg,
        plan,
        workers,
        trial_id=loop_config["trial_id"],
        results_root=loop_config["results_root"],
        device=device,
    )
    try:
        outcome = loop.run()
    except (
        ray.exceptions.RayActorError,
        ray.exceptions.ActorUnavailableError,
        OrderServerRestarted,
    ) as error:
        raise RuntimeError(
            f"the order server of trial {loop_config['trial_id']} died ({type(error).__name__}); with "
            "train.max_failures >= 1 the trial restarts from its last checkpoint"
        ) from error
    node_ids: list[Any] = [None] * plan.num_workers
    dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
    return {**outcome, "worker_node_ids": node_ids}
