"""The order server's core: workers' keyed messages applied in order, per worker-group generation.

``OrderQueue`` is plain synchronous code (no Ray, no asyncio): ``orderlab.server`` wraps it in the
trial's actor and feeds it from Ray calls and shared-memory rings. Workers send keyed messages
(epoch, start index, rank, generation) carrying numpy payloads: pair differences for
pair-balance/cd-grab, unit gradients for grab. The queue applies items strictly in (item index,
rank) order, whatever the arrival order, so the orders equal those of a centralized run; a
replayed key does nothing, and a message of another generation (a crashed worker group's) is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from orderlab.orderings import OrderingSpec, make_ordering, order_digest


@dataclass(frozen=True)
class OrderMessage:
    """Items ``start .. start + len(items) - 1`` of worker ``rank`` in ``epoch``, in visiting order.

    Attributes:
        epoch: the epoch whose units produced the items (0-based).
        start: index of the first item: a pair index (pair differences) or a unit position (gradients).
        rank: the sending worker's rank.
        items: [m, d] numpy array in a wire format of ``encode_payload``: float32, float16, or int16
            (the bits of bfloat16).
        generation: the worker group's generation (``OrderQueue.start_generation``); others are dropped.
    """

    epoch: int
    start: int
    rank: int
    items: np.ndarray
    generation: int = 0


class OrderServerRestarted(RuntimeError):
    """The order server lost its state (Ray restarted it) since this worker group started."""


class OrderQueue:
    """One trial's ordering and every epoch's orders, built from worker messages applied in order.

    Args:
        ordering: the ordering's name. spec: its settings (``OrderingSpec``; ``dim`` is the length of
            the vectors workers send, the sketch length when sketching; ``threads`` the balancing threads).
        on_applied: called after each run of items is applied (the server hands ring slots back).
        on_orders: called with the epoch whenever an epoch's orders are built.

    Raises:
        OrderlabError: from ``make_ordering`` on an unknown name or invalid value.
    """

    def __init__(
        self,
        ordering: str,
        spec: OrderingSpec,
        *,
        on_applied: Callable[[], None] = lambda: None,
        on_orders: Callable[[int], None] = lambda epoch: None,
    ) -> None:
        self.name, self.spec, self.num_workers = ordering, spec, spec.num_workers
        self.on_applied, self.on_orders = on_applied, on_orders
        self.generation = 0
        self._start()

    def _start(self) -> None:
        """The state before epoch 0: a fresh ordering and epoch 0's orders."""
        self.ordering = make_ordering(self.name, self.spec)
        self.orders: dict[int, np.ndarray] = {}
        self.digests: dict[int, str] = {}
        self.pending: list[dict[int, np.ndarray]]  # per rank, its received items by start (_advance)
        self.epoch = -1  # the epoch whose items are being applied
        self.bytes_received = 0
        self._advance()

    @property
    def needs_gradients(self) -> bool:
        return self.ordering.needs_gradients

    def start_generation(self, state: dict[str, Any] | None) -> int:
        """Begin a new worker-group generation from a ``snapshot`` (from scratch when None); return it.

        Messages of earlier generations are dropped from now on.
        """
        if state is None:
            self._start()
        else:
            self.restore(state)
        self.generation += 1
        return self.generation

    def check_generation(self, generation: int | None) -> None:
        """Raise ``OrderServerRestarted`` unless ``generation`` (a worker group's) is the current one
        (None: no check)."""
        if generation is not None and generation != self.generation:
            raise OrderServerRestarted(
                f"the order server is at generation {self.generation}, the worker group at {generation}: "
                "Ray restarted the server, so its state is gone"
            )

    def order(self, epoch: int, rank: int) -> np.ndarray | None:
        """Worker ``rank``'s order for ``epoch`` (int64 [shard_size]) once it exists, else None.

        An ordering with no items per epoch (gradient-free, or pairs of one-unit shards) builds the
        next epoch's orders when asked for them.
        """
        if epoch not in self.orders and self.ordering.items_per_epoch == 0 and epoch == self.epoch + 1:
            self._advance()
        return self.orders[epoch][rank] if epoch in self.orders else None

    def applied(self, epoch: int) -> bool:
        """Whether every item of ``epoch`` has been applied (its next epoch's orders exist)."""
        return self.epoch > epoch or self.ordering.items_per_epoch == 0

    def accept(self, message: OrderMessage) -> None:
        """Hold ``message``'s items until they are in order (``apply_ready``); drop one of another
        generation, of an earlier epoch, or a replay."""
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

    def apply_ready(self) -> None:
        """Balance every item that is now in order; build the next epoch's orders once the epoch's
        items are all applied."""
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
            self.on_applied()  # now, so workers refill their ring slots while later chunks balance
        if ready > 0 and self.cursor == self.ordering.items_per_epoch:
            self._advance()
        self.on_applied()

    def done_with(self, epoch: int, end: int, generation: int) -> bool:
        """Whether a message's items (up to ``end``) are applied or never will be (an earlier epoch
        or another generation)."""
        return generation != self.generation or epoch < self.epoch or end <= self.cursor

    def snapshot(self) -> dict[str, Any]:
        """The state at an epoch boundary, for checkpoints (torch tensors and ints)."""
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

    def _advance(self) -> None:
        self.epoch += 1
        self.cursor = 0
        self.pending = [{} for _ in range(self.num_workers)]
        orders = self.orders[self.epoch] = self.ordering.begin_epoch().numpy()
        self.digests[self.epoch] = order_digest(orders)
        self.orders.pop(self.epoch - 2, None)
        self.on_orders(self.epoch)
