"""The order server: one Ray actor per trial that hosts the trial's ordering.

Workers send keyed messages (epoch, start index, rank) carrying numpy payloads: pair differences for
pair-balance/cd-grab, unit gradients for grab. A worker on the server's node writes them into a
shared-memory ring (``orderlab.channel``) that the server reads when the ring's doorbell rings (or
at its next poll); a worker elsewhere sends them with ``push``. The server applies items strictly in
(item index, rank) order, whatever the arrival order or path, so the orders equal those of a
centralized run; a replayed key does nothing. ``begin_epoch(epoch, rank)`` answers once that
epoch's orders exist; a worker with a ring also finds its next order there.
``OrderServer`` is a plain class (unit tests construct it directly); ``RemoteOrderServer`` is the
actor. Its methods are ``async`` so that ``begin_epoch`` can wait while messages keep arriving.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from orderlab.channel import WIRE_DTYPES, MessageRing
from orderlab.orderings import OrderingSpec, make_ordering, order_digest, set_balance_threads


@dataclass(frozen=True)
class OrderMessage:
    """Items ``start .. start + len(items) - 1`` of worker ``rank`` in ``epoch``, in visiting order.

    Attributes:
        epoch: the epoch whose units produced the items (0-based).
        start: index of the first item: a pair index (pair differences) or a unit position (gradients).
        rank: the sending worker's rank.
        items: [m, d] numpy array in a wire format of ``encode_payload``: float32, float16, or int16
            (the bits of bfloat16).
        generation: the worker group's generation (``OrderServer.reset``); stale ones are dropped.
    """

    epoch: int
    start: int
    rank: int
    items: np.ndarray
    generation: int = 0


class OrderServerRestarted(RuntimeError):
    """The order server lost its state (Ray restarted it) since this worker group started."""


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


class OrderServer:
    """Hosts one ordering for a trial and builds every epoch's orders from worker messages.

    Args:
        ordering: the ordering's name. spec: its settings (``OrderingSpec``; ``dim`` is the length
            of the vectors workers send, the sketch length when sketching).
        threads: threads to balance with (``ordering.server_threads``; ``set_balance_threads``).
        payload_dtype: the wire format the workers will send (``ordering.payload_dtype``), when
            known: the balancing kernel for it is then loaded (or compiled) here, while the workers
            start, instead of in epoch 0 while they wait for ring slots (0.3-0.5 s on the README's
            machine). Message items may be in any wire format (``encode_payload``): the arrays say which.

    Raises:
        OrderlabError: from ``make_ordering`` on an unknown name or invalid value; threads < 1.
    """

    def __init__(
        self, ordering: str, spec: OrderingSpec, *, threads: int = 1, payload_dtype: str | None = None
    ) -> None:
        self.threads = set_balance_threads(threads)
        self._ordering_name, self.spec = ordering, spec
        self.num_workers = spec.num_workers
        self.generation = 0
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()  # wakes an idle ring poller: a doorbell rang or an order went out
        self.rings: dict[int, _AttachedRing] = {}  # by rank
        self._poller: asyncio.Task | None = None
        self._poll_error: BaseException | None = None  # what stopped the ring poller, raised to callers
        self._start()
        if payload_dtype is not None and self.needs_gradients:
            # items of zero rows: every step of balancing runs (and numba loads its kernel), nothing changes
            empty = np.empty((0, spec.dim), WIRE_DTYPES[payload_dtype])
            self.ordering.observe_items([empty] * spec.num_workers)

    def _start(self) -> None:
        """The state before epoch 0: a fresh ordering and epoch 0's orders."""
        self.ordering = make_ordering(self._ordering_name, self.spec)
        self.orders: dict[int, np.ndarray] = {}
        self.digests: dict[int, str] = {}
        self.pending: list[dict[int, np.ndarray]]  # per rank, its received items by start (_advance)
        self.epoch = -1  # the epoch whose items are being applied
        self._advance()
        self.bytes_received = 0

    @property
    def needs_gradients(self) -> bool:
        return self.ordering.needs_gradients

    async def reset(self, state: dict[str, Any] | None) -> int:
        """Start a new worker-group generation from a ``snapshot`` (or from scratch when None).

        Called once by rank 0 whenever a worker group starts (also after a restart of this actor):
        messages of earlier generations still in flight are then dropped.

        Returns:
            The new generation, which workers put on their messages.
        """
        # the new group's workers attach rings of their own; a poller that failed starts again then
        for attached in self.rings.values():
            self._detach(attached.ring)
        self.rings.clear()
        if state is None:
            self._start()
        else:
            self.restore(state)
        self.generation += 1
        if self._poll_error is not None:
            self._poll_error, self._poller = None, None
        self._changed.set()
        return self.generation

    async def push(self, messages: list[OrderMessage]) -> int:
        """Accept messages (any arrival order) and apply every item that is now in order.

        Returns:
            The number of items of the current epoch applied so far.
        """
        for message in messages:
            self._accept(message)
        self._apply_ready()
        return self.cursor

    async def attach_ring(self, rank: int, path: str) -> None:
        """Read worker ``rank``'s messages from now on also from its shared-memory ring at ``path``
        (``orderlab.channel.MessageRing``; replaces an earlier ring of that rank), and hand it its
        next orders there when the ring has room for them (``MessageRing.wait_for_order``).

        Raises:
            FileNotFoundError: no ring at ``path`` on this node.
        """
        if rank in self.rings:
            self._detach(self.rings[rank].ring)
        ring = MessageRing.attach(path)
        self.rings[rank] = _AttachedRing(ring)
        if ring.bell is not None:
            asyncio.get_running_loop().add_reader(ring.bell, self._wake.set)
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_rings())

    def has_ring(self, rank: int, path: str) -> bool:
        """Whether rank's ring at ``path`` is attached (False after Ray restarted this server).

        Raises:
            the exception that stopped the ring poller, if one did.
        """
        self._raise_poll_error()
        return rank in self.rings and self.rings[rank].ring.path == path

    async def begin_epoch(self, epoch: int, rank: int, generation: int | None = None) -> np.ndarray:
        """Worker ``rank``'s order for ``epoch``: int64 array [shard_size], once that epoch's orders exist.

        Raises:
            OrderServerRestarted: ``generation`` (the caller's worker group) is not the current one.
        """
        self._check_generation(generation)
        while epoch not in self.orders:
            if self.ordering.items_per_epoch == 0 and epoch == self.epoch + 1:  # nothing to wait for
                self._advance()
            else:
                await self._wait_for_change()
        self._wake.set()
        return self.orders[epoch][rank]

    def order_digest(self, epoch: int) -> str:
        """sha256 of ``epoch``'s orders of all workers (``order_digest``)."""
        return self.digests[epoch]

    def node_id(self) -> str:
        """The Ray node this server runs on (recorded in the trials table)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    async def snapshot(self, epoch: int | None = None, generation: int | None = None) -> dict[str, Any]:
        """The server's state at an epoch boundary, for checkpoints (torch tensors and ints): once
        every item of ``epoch`` is applied, when given (workers on rings do not wait for that
        themselves, see ``ServerMessenger.flush``).

        Raises:
            OrderServerRestarted: ``generation`` (the caller's worker group) is not the current one
                (a restarted server would never get the epoch's items).
            the exception that stopped the ring poller, if one did.
        """
        self._check_generation(generation)
        while epoch is not None and self.epoch <= epoch and self.ordering.items_per_epoch > 0:
            await self._wait_for_change()
            self._check_generation(generation)
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "orders": {e: torch.from_numpy(o.copy()) for e, o in self.orders.items()},
            "digests": dict(self.digests),
            "ordering": self.ordering.state_dict(),
            "bytes_received": self.bytes_received,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Return to a ``snapshot``: messages applied after it are forgotten, pending ones dropped."""
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.orders = {int(e): o.numpy().copy() for e, o in state["orders"].items()}
        self.digests = {int(e): d for e, d in state["digests"].items()}
        self.ordering.load_state_dict(state["ordering"])
        self.bytes_received = int(state["bytes_received"])
        self.pending = [{} for _ in range(self.num_workers)]
        self._changed.set()

    def _accept(self, message: OrderMessage) -> None:
        if message.generation != self.generation:
            return  # sent by a worker group that has since been restarted
        if message.epoch != self.epoch:
            # an earlier epoch's replay does nothing; a later epoch cannot exist before these orders
            assert message.epoch < self.epoch, (
                f"message for epoch {message.epoch} while building {self.epoch + 1}"
            )
            return
        if message.start + len(message.items) <= self.cursor:
            return  # replayed key, already applied
        if message.start < self.cursor:  # partly applied: only the tail can still be new
            message = OrderMessage(
                message.epoch, self.cursor, message.rank, message.items[self.cursor - message.start :]
            )
        if message.start in self.pending[message.rank]:
            return  # replayed key, still pending
        self.pending[message.rank][message.start] = message.items
        self.bytes_received += message.items.nbytes

    def _available(self, rank: int) -> int:
        """Items of ``rank`` contiguous from the cursor."""
        position, chunks = self.cursor, self.pending[rank]
        while position in chunks:
            position += len(chunks[position])
        return position - self.cursor

    def _take(self, rank: int, count: int) -> np.ndarray:
        """The first ``count`` pending items of ``rank`` (at most its first chunk's): a view, no copy."""
        chunk = self.pending[rank].pop(self.cursor)
        if len(chunk) > count:
            self.pending[rank][self.cursor + count] = chunk[count:]
        return chunk[:count]

    def _apply_ready(self) -> None:
        ready = min(self._available(rank) for rank in range(self.num_workers))
        ready = min(ready, self.ordering.items_per_epoch - self.cursor)
        remaining = ready
        while remaining > 0:
            # the longest run that is one chunk on every rank: per-rank views in the wire format, so
            # nothing is stacked or concatenated, and half payloads are widened in registers
            count = min(
                remaining, *(len(self.pending[rank][self.cursor]) for rank in range(self.num_workers))
            )
            self.ordering.observe_items([self._take(rank, count) for rank in range(self.num_workers)])
            self.cursor += count
            remaining -= count
            self._release_rings()  # now, so workers refill their slots while later chunks balance
        if ready > 0 and self.cursor == self.ordering.items_per_epoch:
            self._advance()
        self._release_rings()

    def _check_generation(self, generation: int | None) -> None:
        if generation is not None and generation != self.generation:
            raise OrderServerRestarted(
                f"the order server is at generation {self.generation}, the worker group at {generation}: "
                "Ray restarted the server, so its state is gone"
            )

    async def _wait_for_change(self) -> None:
        """Wait until an epoch's orders are built or the state is reset or restored; raise the
        poller's error first, if it stopped."""
        self._raise_poll_error()
        self._changed.clear()
        await self._changed.wait()

    def _raise_poll_error(self) -> None:
        if self._poll_error is not None:
            raise RuntimeError("the order server stopped reading shared-memory rings") from self._poll_error

    async def _poll_rings(self) -> None:
        """Apply the rings' messages as they are published; poll less often while they are idle."""
        try:
            await self._poll_rings_forever()
        except Exception as error:  # surfaced by begin_epoch and has_ring, which workers call
            self._poll_error = error
            self._changed.set()

    async def _poll_rings_forever(self) -> None:
        pause = RING_POLL_SECONDS[0]
        while True:
            for attached in self.rings.values():
                attached.ring.drain_bell()  # its messages so far are visible to receive() below
            received = False
            for attached in list(self.rings.values()):
                for fields in attached.ring.receive():
                    message = OrderMessage(*fields)
                    attached.held.append(
                        (message.epoch, message.start + len(message.items), message.generation)
                    )
                    self._accept(message)
                    received = True
            if received:
                self._apply_ready()
                pause = RING_POLL_SECONDS[0]
                await asyncio.sleep(0)
            elif await self._wait_for_wake(pause):
                pause = RING_POLL_SECONDS[0]
            else:
                pause = min(2 * pause, RING_POLL_SECONDS[1])

    async def _wait_for_wake(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a ring's doorbell or an order handed out; True if one came."""
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

    def _release_rings(self) -> None:
        """Hand back every ring slot whose items are applied, stale, or dropped (held in order per ring)."""
        for attached in self.rings.values():
            count = 0
            while attached.held and self._done_with(*attached.held[0]):
                attached.held.popleft()
                count += 1
            if count:
                attached.ring.release(count)

    def _done_with(self, epoch: int, end: int, generation: int) -> bool:
        """Whether a message's items are applied or will never be (an earlier epoch or generation)."""
        return generation != self.generation or epoch < self.epoch or end <= self.cursor

    def _advance(self) -> None:
        self.epoch += 1
        self.cursor = 0
        self.pending = [{} for _ in range(self.num_workers)]
        orders = self.orders[self.epoch] = self.ordering.begin_epoch().numpy()
        self.digests[self.epoch] = order_digest(orders)
        self.orders.pop(self.epoch - 2, None)
        for rank, attached in self.rings.items():  # the rings with an order area get their order now
            if len(attached.ring.order) == orders.shape[1]:
                attached.ring.hand_order(self.epoch, orders[rank])
                self._wake.set()
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
