"""The order server: one Ray actor per trial that hosts the trial's ordering.

Three parts: ``orderlab.order_queue.OrderQueue`` applies workers' keyed messages in (item index,
rank) order per worker-group generation (plain synchronous code); ``RingPoller`` reads the
shared-memory rings (``orderlab.channel``) of workers on the server's node when a ring's doorbell
rings (or at its next poll), hands slots back once their items are applied, and writes each
epoch's order into every ring; ``OrderServer`` joins them behind the actor's methods. A worker
elsewhere sends its messages with ``push`` and asks for its orders with ``begin_epoch``.
``OrderServer`` is a plain class (unit tests construct it directly); ``RemoteOrderServer`` is the
actor. Its methods are ``async`` so that ``begin_epoch`` can wait while messages keep arriving.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orderlab.channel import WIRE_DTYPES, MessageRing
from orderlab.order_queue import OrderMessage, OrderQueue
from orderlab.orderings import OrderingSpec


@dataclass
class _AttachedRing:
    """A worker's ring on the server side, and the (epoch, end, generation) of each message still held."""

    ring: MessageRing
    held: deque = field(default_factory=deque)


#: seconds between polls of the rings when they are idle: from the first to the last, doubling (an idle
#: poll costs about 70 µs of CPU, so polling every 2 ms took 3.6% of a core during an LSTM trial);
#: back to the first when a ring's doorbell rings or an order is handed out (``begin_epoch``, a
#: ring), which also ends the wait at once
RING_POLL_SECONDS = (1e-4, 1e-2)


class RingPoller:
    """The server's side of its workers' shared-memory rings: reads their messages into ``queue``,
    hands each slot back once the queue is done with its items, and writes each epoch's order into
    every ring with room for it.

    Runs as a task of the actor's event loop (started with the first ring). While the rings are
    idle it polls less often (``RING_POLL_SECONDS``) and sleeps until a doorbell rings or ``wake``.

    Args:
        queue: the server's ``OrderQueue``. changed: called when the poller stopped (with ``error``).
    """

    def __init__(self, queue: OrderQueue, changed: Callable[[], None]) -> None:
        self.queue, self.changed = queue, changed
        self.rings: dict[int, _AttachedRing] = {}  # by rank
        self._wake = asyncio.Event()  # wakes an idle poller: a doorbell rang or an order went out
        self._task: asyncio.Task | None = None
        self.error: BaseException | None = None  # what stopped the poller, raised to callers

    def attach(self, rank: int, path: str) -> None:
        """Read rank's ring at ``path`` (replacing an earlier one of that rank) and hand it the order
        of the epoch being built.

        Raises:
            FileNotFoundError: no ring at ``path`` on this node.
        """
        if rank in self.rings:
            self._detach(self.rings[rank].ring)
        ring = MessageRing.attach(path)
        self.rings[rank] = _AttachedRing(ring)
        self.hand_order(rank, self.queue.epoch)
        if ring.bell is not None:
            asyncio.get_running_loop().add_reader(ring.bell, self._wake.set)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    def detach_all(self) -> None:
        """Close every ring (a new worker group attaches its own); a poller that failed starts again
        with the next ring."""
        for attached in self.rings.values():
            self._detach(attached.ring)
        self.rings.clear()
        if self.error is not None:
            self.error, self._task = None, None

    def has(self, rank: int, path: str) -> bool:
        return rank in self.rings and self.rings[rank].ring.path == path

    def hand_order(self, rank: int, epoch: int) -> None:
        """Write rank's order of ``epoch`` into its ring, when the ring has room for it."""
        orders = self.queue.orders[epoch]
        ring = self.rings[rank].ring
        if len(ring.order) == orders.shape[1]:
            ring.hand_order(epoch, orders[rank])
            self.wake()

    def hand_orders(self, epoch: int) -> None:
        for rank in self.rings:
            self.hand_order(rank, epoch)

    def wake(self) -> None:
        """End an idle wait now (an order went out: the worker's messages follow)."""
        self._wake.set()

    def raise_error(self) -> None:
        """Raise if the poller stopped."""
        if self.error is not None:
            raise RuntimeError("the order server stopped reading shared-memory rings") from self.error

    def release(self) -> None:
        """Hand back every slot whose items are applied, stale, or dropped (held in order per ring)."""
        for attached in self.rings.values():
            count = 0
            while attached.held and self.queue.done_with(*attached.held[0]):
                attached.held.popleft()
                count += 1
            if count:
                attached.ring.release(count)

    def receive(self) -> bool:
        """Hand the queue every message published since the last call; True if there was one."""
        for attached in self.rings.values():
            attached.ring.drain_bell()  # its messages so far are visible to receive() below
        received = False
        for attached in list(self.rings.values()):
            for fields in attached.ring.receive():
                message = OrderMessage(*fields)
                attached.held.append((message.epoch, message.start + len(message.items), message.generation))
                self.queue.accept(message)
                received = True
        return received

    async def _poll(self) -> None:
        """Apply the rings' messages as they are published; poll less often while they are idle."""
        try:
            pause = RING_POLL_SECONDS[0]
            while True:
                if self.receive():
                    self.queue.apply_ready()
                    pause = RING_POLL_SECONDS[0]
                    await asyncio.sleep(0)
                elif await self._wait_for_wake(pause):
                    pause = RING_POLL_SECONDS[0]
                else:
                    pause = min(2 * pause, RING_POLL_SECONDS[1])
        except Exception as error:  # surfaced by begin_epoch and has_ring, which workers call
            self.error = error
            self.changed()

    async def _wait_for_wake(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a ring's doorbell or ``wake``; True if one came."""
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            return False
        self._wake.clear()
        return True

    def _detach(self, ring: MessageRing) -> None:
        """Stop watching ``ring``'s doorbell and close it."""
        if ring.bell is not None:
            asyncio.get_running_loop().remove_reader(ring.bell)
        ring.close()


class OrderServer:
    """Hosts one ordering for a trial and builds every epoch's orders from worker messages.

    Args:
        ordering: the ordering's name. spec: its settings (``OrderingSpec``; ``dim`` is the length
            of the vectors workers send, the sketch length when sketching; ``threads``: the
            balancing threads, ``ordering.server_threads``).
        payload_dtype: the wire format the workers will send (``ordering.payload_dtype``), when
            known: the balancing kernel for it is then loaded (or compiled) here, while the workers
            start, instead of in epoch 0 while they wait for ring slots (0.3-0.5 s on the machine
            of docs/performance.md). Message items may be in any wire format (``encode_payload``):
            the arrays say which.

    Raises:
        OrderlabError: from ``make_ordering`` on an unknown name or invalid value.
    """

    def __init__(self, ordering: str, spec: OrderingSpec, *, payload_dtype: str | None = None) -> None:
        self._changed = asyncio.Event()
        self.queue = OrderQueue(ordering, spec)
        self.rings = RingPoller(self.queue, self._changed.set)
        self.queue.on_applied, self.queue.on_orders = self.rings.release, self._orders_built
        if payload_dtype is not None and self.queue.needs_gradients:
            # items of zero rows: every step of balancing runs (and numba loads its kernel), nothing changes
            empty = np.empty((0, spec.dim), WIRE_DTYPES[payload_dtype])
            self.queue.ordering.observe_items([empty] * spec.num_workers)

    async def reset(self, state: dict[str, Any] | None) -> int:
        """Start a new worker-group generation from a ``snapshot`` (or from scratch when None).

        Called once by rank 0 whenever a worker group starts (also after a restart of this actor):
        messages of earlier generations still in flight are then dropped, and the earlier group's
        rings are closed (the new group's workers attach rings of their own).

        Returns:
            The new generation, which workers put on their messages.
        """
        self.rings.detach_all()
        generation = self.queue.start_generation(state)
        self._changed.set()
        return generation

    async def push(self, messages: list[OrderMessage]) -> int:
        """Accept messages (any arrival order) and apply every item that is now in order.

        Returns:
            The number of items of the current epoch applied so far.
        """
        for message in messages:
            self.queue.accept(message)
        self.queue.apply_ready()
        return self.queue.cursor

    async def attach_ring(self, rank: int, path: str) -> None:
        """Read worker ``rank``'s messages from now on also from its shared-memory ring at ``path``
        (``orderlab.channel.MessageRing``; replaces an earlier ring of that rank), and hand it its
        orders there, from the epoch being built on, when the ring has room for them
        (``MessageRing.wait_for_order``).

        Raises:
            FileNotFoundError: no ring at ``path`` on this node.
        """
        self.rings.attach(rank, path)

    def has_ring(self, rank: int, path: str) -> bool:
        """Whether rank's ring at ``path`` is attached (False after Ray restarted this server).

        Raises:
            the exception that stopped the ring poller, if one did.
        """
        self.rings.raise_error()
        return self.rings.has(rank, path)

    async def begin_epoch(self, epoch: int, rank: int, generation: int | None = None) -> np.ndarray:
        """Worker ``rank``'s order for ``epoch``: int64 array [shard_size], once that epoch's orders exist.

        Raises:
            OrderServerRestarted: ``generation`` (the caller's worker group) is not the current one.
        """
        self.queue.check_generation(generation)
        while (order := self.queue.order(epoch, rank)) is None:
            await self._wait_for_change()
        self.rings.wake()
        return order

    def order_digest(self, epoch: int) -> str:
        """sha256 of ``epoch``'s orders of all workers (``order_digest``)."""
        return self.queue.digests[epoch]

    def node_id(self) -> str:
        """The Ray node this server runs on (recorded in the trials table)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    async def snapshot(self, epoch: int | None = None, generation: int | None = None) -> dict[str, Any]:
        """The server's state at an epoch boundary, for checkpoints (torch tensors and ints): once
        every item of ``epoch`` is applied, when given (workers on rings do not wait for that
        themselves, see ``RingTransport``).

        Raises:
            OrderServerRestarted: ``generation`` (the caller's worker group) is not the current one
                (a restarted server would never get the epoch's items).
            the exception that stopped the ring poller, if one did.
        """
        self.queue.check_generation(generation)
        while epoch is not None and not self.queue.applied(epoch):
            await self._wait_for_change()
            self.queue.check_generation(generation)
        return self.queue.snapshot()

    def restore(self, state: dict[str, Any]) -> None:
        """Return to a ``snapshot``: messages applied after it are forgotten, pending ones dropped."""
        self.queue.restore(state)
        self._changed.set()

    async def _wait_for_change(self) -> None:
        """Wait until an epoch's orders are built or the state is reset or restored; raise the
        poller's error first, if it stopped."""
        self.rings.raise_error()
        self._changed.clear()
        await self._changed.wait()

    def _orders_built(self, epoch: int) -> None:
        self.rings.hand_orders(epoch)
        self._changed.set()


@functools.cache
def _remote_order_server() -> Any:
    import ray

    # Ray restarts a dead server (fresh state); the next worker group then calls reset(checkpoint).
    return ray.remote(num_cpus=0, max_restarts=-1)(OrderServer)


def __getattr__(name: str) -> Any:
    """``RemoteOrderServer``, the actor class, made on first use: ``OrderServer`` itself imports no
    Ray (benchmarks/device_check.py measures it where there is none)."""
    if name == "RemoteOrderServer":
        return _remote_order_server()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
