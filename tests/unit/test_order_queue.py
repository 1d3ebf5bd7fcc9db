"""OrderQueue: the order server's in-order, generation-aware queue, driven directly (no Ray, no asyncio)."""

from __future__ import annotations

import numpy as np
import pytest
from test_server import (
    GRADIENT_ORDERINGS,
    NUM_WORKERS,
    SEED,
    SHARD_SIZE,
    assert_same_orders,
    chunk_messages,
    message_kind,
    random_gradients,
    reference_orders,
    visiting_gradients,
    with_replays,
    worker_items,
)

from orderlab.order_queue import OrderMessage, OrderQueue, OrderServerRestarted
from orderlab.orderings import OrderingSpec

DIM = 4


def make_queue(name: str, **callbacks) -> OrderQueue:
    spec = OrderingSpec(num_workers=NUM_WORKERS, shard_size=SHARD_SIZE, dim=DIM, seed=SEED)
    return OrderQueue(name, spec, **callbacks)


def queue_orders(queue: OrderQueue, epoch: int) -> np.ndarray:
    rows = [queue.order(epoch, rank) for rank in range(NUM_WORKERS)]
    assert all(row is not None for row in rows), f"epoch {epoch}'s orders are not built"
    return np.stack(rows)


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_shuffled_replayed_messages_give_a_centralized_runs_orders(name: str) -> None:
    grads = random_gradients(23, 3, NUM_WORKERS, SHARD_SIZE, DIM)
    expected = reference_orders(name, grads, SEED, np.random.default_rng(0))
    built: list[int] = []
    queue = make_queue(name, on_orders=built.append)
    generation = queue.start_generation(None)
    rng = np.random.default_rng(1)
    orders, previous = [queue_orders(queue, 0)], []
    for epoch in range(len(grads)):
        items = worker_items(message_kind(name), visiting_gradients(grads[epoch], orders[-1]))
        messages = [
            OrderMessage(m.epoch, m.start, m.rank, m.items, generation)
            for m in chunk_messages(epoch, items, rng)
        ]
        undelivered = {id(m) for m in messages}
        for message in with_replays(messages, rng, previous[:2]):
            if undelivered:  # not before every item of the epoch has arrived
                assert queue.order(epoch + 1, 0) is None and not queue.applied(epoch)
            undelivered.discard(id(message))
            queue.accept(message)
            queue.apply_ready()
        assert queue.applied(epoch)
        orders.append(queue_orders(queue, epoch + 1))
        previous = messages
    assert_same_orders(orders, expected)
    assert built == [0, 0, 1, 2, 3]  # the first start, the new generation's restart, then each epoch


def test_items_are_applied_only_once_every_rank_has_them_and_slots_are_released_in_order() -> None:
    applied: list[int] = []
    queue = make_queue("grab")
    queue.on_applied = lambda: applied.append(queue.cursor)
    generation = queue.start_generation(None)
    items = np.ones((SHARD_SIZE, DIM), np.float32)
    queue.accept(OrderMessage(0, 0, 0, items[:4], generation))
    queue.accept(OrderMessage(0, 0, 1, items[:2], generation))
    queue.apply_ready()
    assert queue.cursor == 0 and not queue.done_with(0, 2, generation)  # rank 2 has sent nothing
    queue.accept(OrderMessage(0, 0, 2, items[:3], generation))
    queue.apply_ready()
    assert queue.cursor == 2 and applied[-1] == 2  # the prefix every rank has
    assert queue.done_with(0, 2, generation) and not queue.done_with(0, 3, generation)
    assert queue.done_with(0, 9, generation - 1)  # another generation's message is never applied


def test_another_generations_messages_are_dropped_and_its_calls_refused() -> None:
    queue = make_queue("cd-grab")
    first = queue.start_generation(None)
    second = queue.start_generation(None)  # a restarted worker group
    queue.accept(OrderMessage(0, 0, 0, np.ones((2, DIM), np.float32), first))
    assert queue.bytes_received == 0 and not queue.pending[0]
    queue.check_generation(second)
    queue.check_generation(None)
    with pytest.raises(OrderServerRestarted, match=f"generation {second}, the worker group at {first}"):
        queue.check_generation(first)


def test_a_snapshot_restores_the_epoch_boundary_and_drops_what_came_after() -> None:
    name = "pair-balance"
    grads = random_gradients(5, 2, NUM_WORKERS, SHARD_SIZE, DIM)
    expected = reference_orders(name, grads, SEED, np.random.default_rng(0))
    queue = make_queue(name)
    generation = queue.start_generation(None)

    def send_epoch(epoch: int, orders: np.ndarray, count: int | None = None) -> None:
        items = worker_items(message_kind(name), visiting_gradients(grads[epoch], orders))
        for rank in range(NUM_WORKERS):
            queue.accept(OrderMessage(epoch, 0, rank, items[rank, :count], generation))
        queue.apply_ready()

    orders = [queue_orders(queue, 0)]
    send_epoch(0, orders[0])
    state = queue.snapshot()
    orders.append(queue_orders(queue, 1))
    send_epoch(1, orders[1], count=2)  # part of epoch 1, then the group crashes
    assert queue.cursor == 2
    generation = queue.start_generation(state)
    assert (queue.epoch, queue.cursor) == (1, 0)
    np.testing.assert_array_equal(queue_orders(queue, 1), orders[1])
    send_epoch(1, orders[1])
    assert_same_orders([*orders, queue_orders(queue, 2)], expected)


def test_an_ordering_without_items_builds_the_next_orders_when_asked() -> None:
    queue = make_queue("rr")
    queue.start_generation(None)
    assert queue.order(2, 0) is None  # two epochs ahead: not yet
    first = queue.order(1, 0)
    assert first is not None and queue.epoch == 1 and queue.applied(5)
    assert queue.order(2, 1) is not None
