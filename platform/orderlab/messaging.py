"""A Ray Train worker's messages to its order server, and its orders back (docs/architecture.md).

``ServerMessenger`` batches a worker's ``SendBuffer`` rows into keyed messages (epoch, start, rank,
generation) and hands them to one of two transports with one interface (``Transport``):

- ``RayCallTransport`` (``ordering.transport: ray``): each message is a ``push`` actor call, at most
  ``max_in_flight`` outstanding; orders come back from ``begin_epoch`` calls.
- ``RingTransport`` (``shared_memory``: CPU workers on the server's node): the send buffer's rows
  are written straight into the next free slot of a ``MessageRing`` that the server polls, and
  the server writes each epoch's order into the ring's order area.

The transport is chosen (``message_transport``) when the worker is built and started (``start``,
which creates and attaches a ring) when its worker group starts, so no step waits on either.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from typing import Any, Protocol

import numpy as np
import ray
import torch

from orderlab.channel import WIRE_DTYPES, MessageRing, default_ring_directory, memory_fence
from orderlab.config import OrderingConfig
from orderlab.errors import OrderlabError
from orderlab.grads import CountSketch
from orderlab.order_queue import OrderMessage, OrderServerRestarted
from orderlab.send_buffer import SendBuffer
from orderlab.wire import to_wire

MAX_SLOT_BYTES = 64 * 2**20  # a ring slot holds fewer than message_steps steps when they need more


class Transport(Protocol):
    """How a worker's messages reach its order server and its orders come back.

    Raises (from any method that talks to the server or waits on it): OrderServerRestarted when the
    server lost this worker group's state (Ray restarted it, or another generation started);
    ray.exceptions.RayActorError when the server died.
    """

    #: seconds waited to send (the in-flight bound, a free ring slot, the flush) since last set to 0
    wait_seconds: float

    def start(self, generation: int) -> None:
        """Begin sending for worker-group ``generation`` (``OrderServer.reset``)."""

    def room_for(self, buffer: SendBuffer, elements: int, device: torch.device) -> bool:
        """Make room in ``buffer`` for ``elements`` more; False when its rows must be sent first."""

    def send(self, buffer: SendBuffer, *, epoch: int, start: int) -> int:
        """Send ``buffer``'s pending rows as items ``start ..`` of ``epoch``; empty it; return bytes sent."""

    def flush(self) -> None:
        """Wait for what was sent where the transport can (Ray calls: their replies, and errors)."""

    def fetch_order(self, epoch: int) -> tuple[np.ndarray, float]:
        """This worker's order for ``epoch`` (int64 [shard_size]) and the seconds waited for it."""


class RayCallTransport:
    """Messages as ``push`` actor calls; orders from ``begin_epoch`` calls (which check the generation).

    The send buffer is the worker's own (on its device); ``push.remote`` sends a view of its rows
    (Ray copies arguments when a call is made, so the buffer is reused at once).

    Args:
        server: the order server's actor handle. rank: this worker's rank.
        max_in_flight: ``push`` calls outstanding before ``send`` waits for the oldest.
    """

    def __init__(self, server: Any, *, rank: int, max_in_flight: int) -> None:
        self.server, self.rank, self.max_in_flight = server, rank, max_in_flight
        self.generation, self.wait_seconds = 0, 0.0
        self.in_flight: deque = deque()

    def start(self, generation: int) -> None:
        self.generation = generation

    def room_for(self, buffer: SendBuffer, elements: int, device: torch.device) -> bool:
        buffer.grow(elements, device)
        return True

    def send(self, buffer: SendBuffer, *, epoch: int, start: int) -> int:
        items = to_wire(buffer.pending())  # one device-to-host copy on GPUs
        message = OrderMessage(epoch, start, self.rank, items, self.generation)
        self.in_flight.append(self.server.push.remote([message]))  # Ray copies items here
        buffer.clear()
        if len(self.in_flight) > self.max_in_flight:
            started = time.perf_counter()
            ray.get(self.in_flight.popleft())
            self.wait_seconds += time.perf_counter() - started
        return items.nbytes

    def flush(self) -> None:
        started = time.perf_counter()
        ray.get(list(self.in_flight))
        self.in_flight.clear()
        self.wait_seconds += time.perf_counter() - started

    def fetch_order(self, epoch: int) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        order = ray.get(self.server.begin_epoch.remote(epoch, self.rank, self.generation))
        return order, time.perf_counter() - started


def ring_slots(*, step_rows: int, row_bytes: int, message_steps: int, max_in_flight: int) -> tuple[int, int]:
    """A ring's (slots, rows per slot) for messages of ``message_steps`` steps of up to ``step_rows``
    rows of ``row_bytes`` bytes each.

    A slot holds ``message_steps`` steps (and a row more), at most ``MAX_SLOT_BYTES``. When it holds
    fewer steps, the ring gets enough extra slots for ``message_steps`` + 1 steps: a slot is released
    only once every rank's rows for it have arrived, and a rank sending with Ray calls sends them
    every ``message_steps`` steps, so fewer slots could wait on it forever.
    """
    rows = max(step_rows + 1, min(message_steps * step_rows + 1, MAX_SLOT_BYTES // row_bytes))
    lag_slots = math.ceil((message_steps + 1) * step_rows / rows)  # a Ray rank's lag
    return max(max_in_flight + 1, lag_slots + 1), rows


class RingTransport:
    """Messages through a shared-memory ``MessageRing`` the server polls; orders through its order area.

    ``start`` creates the ring and has the server map it (``attach_ring``), which also hands the
    worker the order of the epoch the server is building; from then on the server hands each
    epoch's order there as soon as it exists. A worker waits only for a free slot, when the server
    is ``slots`` messages behind. ``flush`` waits for nothing: the server's ``snapshot(epoch)`` waits
    until it has applied the epoch's items, so it balances the last of them while workers evaluate.

    Args:
        server: the order server's actor handle. rank: this worker's rank.
        width: the length of a row (d, or the sketch's). step_rows: the most rows a step gives, plus one.
        shard_size: the length of this worker's orders. message_steps, max_in_flight: as in
        ``ordering``. payload_dtype: the rows' dtype. ring_directory: where the ring's file goes
        (None: ``default_ring_directory()``).

    Raises (``start``):
        OrderlabError: the ring cannot be created, or the server cannot open it.
    """

    def __init__(
        self,
        server: Any,
        *,
        rank: int,
        width: int,
        step_rows: int,
        shard_size: int,
        message_steps: int,
        max_in_flight: int,
        payload_dtype: str,
        ring_directory: str | None = None,
    ) -> None:
        self.server, self.rank, self.shard_size, self.payload_dtype = server, rank, shard_size, payload_dtype
        self.wire = WIRE_DTYPES[payload_dtype]
        self.slots, self.rows = ring_slots(
            step_rows=step_rows,
            row_bytes=width * self.wire.itemsize,
            message_steps=message_steps,
            max_in_flight=max_in_flight,
        )
        self.slot_bytes = self.rows * width * self.wire.itemsize
        self.ring_directory = ring_directory or default_ring_directory()
        self.generation, self.wait_seconds = 0, 0.0
        self.ring: MessageRing | None = None
        memory_fence()  # numba's first call in this process (0.4 s) now, not at the first message

    def start(self, generation: int) -> None:
        self.generation = generation
        try:
            self.ring = MessageRing.create(self.slots, self.slot_bytes, self.ring_directory, self.shard_size)
        except OSError as error:
            raise OrderlabError(
                f"worker {self.rank} cannot create a shared-memory ring of {self.slots} × "
                f"{self.slot_bytes / 2**20:.0f} MiB in {self.ring_directory} ({error}); free space there or set "
                "ordering.ring_directory to a tmpfs directory that every node has, lower ordering.message_steps "
                "or max_in_flight, or set ordering.transport: ray"
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

    def room_for(self, buffer: SendBuffer, elements: int, device: torch.device) -> bool:
        if buffer.storage is not None:
            return buffer.used + elements <= len(buffer.storage)  # else send the full slot first
        ring = self._started()
        self.wait_seconds += ring.wait_for_slot(self._check_ring)
        slot = torch.from_numpy(ring.slot_array(buffer.width, self.wire))
        slot = slot.view(torch.bfloat16) if self.payload_dtype == "bfloat16" else slot
        if slot.numel() < elements:
            raise ValueError(f"a step's {elements // buffer.width} rows exceed a ring slot's {len(slot)}")
        buffer.use_storage(slot.view(-1))
        return True

    def send(self, buffer: SendBuffer, *, epoch: int, start: int) -> int:
        items = to_wire(buffer.pending())
        self._started().publish(
            epoch, start, self.rank, len(items), items.shape[1], items.dtype, self.generation
        )
        buffer.use_storage(None)  # the slot now belongs to the server until it releases it
        return items.nbytes

    def flush(self) -> None:
        pass

    def fetch_order(self, epoch: int) -> tuple[np.ndarray, float]:
        return self._started().wait_for_order(epoch, self._check_ring)

    def _started(self) -> MessageRing:
        if self.ring is None:
            raise RuntimeError("RingTransport.start was not called")
        return self.ring

    def _check_ring(self) -> None:
        """Called while waiting on the ring: raise when the server no longer reads it."""
        if not ray.get(self.server.has_ring.remote(self.rank, self._started().path)):
            raise OrderServerRestarted(
                f"worker {self.rank}: the order server no longer reads this worker's ring (Ray restarted it)"
            )


class ServerMessenger:
    """Batches a worker's ordering inputs into keyed messages to its order server.

    Per step, ``add`` writes the step's rows into the ``SendBuffer`` (pair differences or unit
    gradients, sketched, in the payload dtype); every ``message_steps`` steps, and whenever the
    transport has no room left (a full ring slot), the buffered rows go out as one message keyed
    (epoch, start, rank, generation).

    Args:
        transport: ``RayCallTransport`` or ``RingTransport`` (``message_transport`` chooses).
        message_kind: ``pair_differences`` or ``unit_gradients``. message_steps: steps per message.
        sketch: the ``CountSketch`` applied before sending, or None. payload_dtype: the rows' dtype.

    Raises (from ``add``, ``flush`` and ``fetch_order``): as ``Transport``.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        message_kind: str,
        message_steps: int,
        sketch: CountSketch | None = None,
        payload_dtype: str = "float32",
    ) -> None:
        self.transport, self.message_steps = transport, message_steps
        self.buffer = SendBuffer(message_kind, sketch=sketch, payload_dtype=payload_dtype)
        self.buffer.make_room = self._make_room
        self.begin_epoch(0)

    @property
    def wait_seconds(self) -> float:
        """Seconds this epoch waited to send: the in-flight bound, a free ring slot, the flush."""
        return self.transport.wait_seconds

    def start(self, generation: int) -> None:
        """Attach to the server for worker-group ``generation`` (a ring is created and mapped now)."""
        self.transport.start(generation)

    def begin_epoch(self, epoch: int) -> None:
        self.epoch, self.items_sent, self.bytes_sent, self.steps_buffered = epoch, 0, 0, 0
        self.transport.wait_seconds = 0.0
        self.buffer.begin_epoch()

    def add(self, unit_grads: torch.Tensor) -> None:
        """Queue one step's unit gradients [k, d]; send when ``message_steps`` steps are queued.

        ``unit_grads`` must not be written to afterwards (an unpaired unit is kept as a view).
        """
        self.buffer.write(unit_grads.unsqueeze(0))
        self.steps_buffered += 1
        if self.steps_buffered >= self.message_steps:
            self.send()

    def send(self) -> None:
        """Send what is queued (nothing when nothing is)."""
        self.steps_buffered = 0
        if not self.buffer.rows:
            return
        rows = self.buffer.rows
        self.bytes_sent += self.transport.send(self.buffer, epoch=self.epoch, start=self.items_sent)
        self.items_sent += rows

    def flush(self) -> None:
        """Send what is queued and wait where the transport waits (Ray calls: their replies, whose
        errors surface here)."""
        self.send()
        self.transport.flush()

    def fetch_order(self, epoch: int) -> tuple[np.ndarray, float]:
        """This worker's order for ``epoch`` (int64 [shard_size]) and the seconds waited for it."""
        return self.transport.fetch_order(epoch)

    def _make_room(self, elements: int, device: torch.device) -> None:
        if not self.transport.room_for(self.buffer, elements, device):
            self.send()
            self.transport.room_for(self.buffer, elements, device)


def make_transport(
    kind: str,
    server: Any,
    *,
    rank: int,
    message_kind: str,
    units_per_step: int,
    width: int,
    shard_size: int,
    ordering: OrderingConfig,
) -> Transport:
    """The transport ``kind`` (``ray`` or ``shared_memory``, from ``message_transport``) for worker
    ``rank`` sending ``message_kind`` rows of ``width`` for ``units_per_step`` units a step, with
    orders of ``shard_size`` units; message_steps, max_in_flight, payload_dtype and ring_directory
    from ``ordering``."""
    if kind == "ray":
        return RayCallTransport(server, rank=rank, max_in_flight=ordering.max_in_flight)
    pairs = message_kind == "pair_differences"
    return RingTransport(
        server,
        rank=rank,
        width=width,
        step_rows=((units_per_step + 1) // 2 if pairs else units_per_step) + 1,
        shard_size=shard_size,
        message_steps=ordering.message_steps,
        max_in_flight=ordering.max_in_flight,
        payload_dtype=ordering.payload_dtype,
        ring_directory=ordering.ring_directory,
    )


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
