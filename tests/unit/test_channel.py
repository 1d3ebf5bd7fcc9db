"""Shared-memory rings (orderlab.channel) and the order server reading them: the same orders as pushes.

Producers and the server share one event loop here (the server polls its rings in an asyncio task), so
the producers wait for free slots with ``await`` instead of ``MessageRing.wait_for_slot``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

import numba
import numpy as np
import pytest
from test_server import (
    GRADIENT_ORDERINGS,
    all_orders,
    assert_same_orders,
    make_server,
    message_kind,
    random_cuts,
    random_gradients,
    reference_orders,
    visiting_gradients,
    worker_items,
)

from orderlab import channel
from orderlab import server as server_module
from orderlab.channel import MessageRing, memory_fence
from orderlab.order_queue import OrderServerRestarted
from orderlab.server import OrderServer


def test_a_message_round_trips_through_a_second_mapping(tmp_path) -> None:
    producer = MessageRing.create(slots=2, slot_bytes=100, directory=str(tmp_path))
    consumer = MessageRing.attach(producer.path)
    producer.unlink()
    assert not list(tmp_path.iterdir())  # unlinked: both mappings stay valid
    assert producer.slot_bytes == 4096 and producer.rows_per_slot(10, np.float32) == 102
    sent = []
    for sequence in range(5):  # wraps around the two slots
        rows = np.arange(3 * 10, dtype=np.float16).reshape(3, 10) + sequence
        producer.slot_array(10, np.float16)[:3] = rows
        producer.publish(sequence, 3 * sequence, 1, 3, 10, np.float16, generation=4)
        sent.append(rows)
        ((epoch, start, rank, items, generation),) = consumer.receive()
        assert (epoch, start, rank, generation) == (sequence, 3 * sequence, 1, 4)
        assert items.dtype == np.float16 and not items.flags.writeable
        np.testing.assert_array_equal(items, rows)
        assert consumer.receive() == []
        consumer.release(1)
        assert producer.released == producer.published == sequence + 1


def test_memory_fence_compiles_to_a_full_barrier() -> None:
    fresh = numba.njit(memory_fence.py_func)  # memory_fence itself may come from numba's disk cache
    fresh()
    assert "fence seq_cst" in fresh.inspect_llvm(fresh.signatures[0])


def test_a_fence_separates_every_write_from_the_counter_that_announces_it(tmp_path, monkeypatch) -> None:
    """Each side's fence comes after its data and before its counter (publish, release, hand_order)
    or after the counter and before the data (receive, wait_for_slot, wait_for_order); what each
    fence saw of the ring is recorded as (published, released, order epoch, first order unit,
    first slot's rows)."""
    producer = MessageRing.create(slots=1, slot_bytes=100, directory=str(tmp_path), order_length=3)
    consumer = MessageRing.attach(producer.path)
    producer.unlink()
    seen = []
    monkeypatch.setattr(
        channel,
        "memory_fence",
        lambda: seen.append(
            (
                producer.published,
                producer.released,
                int(producer.header[channel._ORDER_EPOCH]),
                int(producer.order[0]),
                int(producer.meta[0, 3]),
            )
        ),
    )
    producer.wait_for_slot(lambda: None)
    assert seen.pop() == (0, 0, -1, 0, 0)
    producer.slot_array(10, np.float32)[:2] = 1.0
    producer.publish(0, 0, 0, 2, 10, np.float32, generation=0)
    assert seen.pop() == (0, 0, -1, 0, 2)  # the message's rows recorded, not yet published
    assert len(consumer.receive()) == 1 and seen.pop() == (1, 0, -1, 0, 2)
    assert consumer.receive() == [] and seen == []  # nothing new: no fence needed
    consumer.release(1)
    assert seen.pop() == (1, 0, -1, 0, 2)  # done reading, not yet released
    consumer.hand_order(1, np.array([7, 8, 9]))
    assert seen.pop() == (1, 1, -1, 7, 2)  # the order written, its epoch not yet
    order, _ = producer.wait_for_order(1, lambda: None)
    assert seen.pop() == (1, 1, 1, 7, 2) and order.tolist() == [7, 8, 9]


def test_slots_of_2_mib_or_more_fill_whole_huge_pages(tmp_path) -> None:
    producer = MessageRing.create(slots=3, slot_bytes=5 * 2**20, directory=str(tmp_path))
    consumer = MessageRing.attach(producer.path)
    producer.unlink()
    assert (producer.data_offset, producer.slot_bytes) == (2**21, 6 * 2**20)  # 2 MiB boundaries
    assert (consumer.data_offset, consumer.slot_bytes, consumer.slots) == (2**21, 6 * 2**20, 3)
    rows = np.random.default_rng(0).standard_normal((3, 2**19), dtype=np.float32)  # 6 MiB: a full slot
    for sequence in range(3):
        producer.slot_array(2**19, np.float32)[:] = rows + sequence
        producer.publish(0, sequence, 0, 3, 2**19, np.float32, generation=0)
    for sequence, (_, start, _, items, _) in enumerate(consumer.receive()):
        assert start == sequence
        np.testing.assert_array_equal(items, rows + sequence)


def test_a_full_file_system_is_an_oserror_that_leaves_no_file() -> None:
    """A 1 MiB tmpfs, mounted in a user and mount namespace of its own (``unshare``), cannot hold a
    4 MiB ring: creating one raises ENOSPC (not a SIGBUS at a later write) and removes the file."""
    script = (
        "import errno, os, sys\n"
        "from orderlab.channel import MessageRing\n"
        "try:\n"
        "    MessageRing.create(2, 2**21, sys.argv[1])\n"
        "except OSError as error:\n"
        "    print(error.errno == errno.ENOSPC, os.listdir(sys.argv[1]))\n"
    )
    directory = tempfile.mkdtemp()
    mount = f"mount -t tmpfs -o size=1m tmpfs {directory}"
    try:
        if (
            shutil.which("unshare") is None
            or subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True).returncode != 0
        ):
            pytest.skip("no unshare, or no user namespaces here, to mount a small tmpfs")
        command = f'{mount} && exec "$0" -c "$1" {directory}'
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", command, sys.executable, script], capture_output=True, text=True
        )
    finally:
        os.rmdir(directory)
    assert done.stdout.strip() == "True []", done.stderr


def test_a_full_ring_waits_and_asks_whether_to_keep_waiting(tmp_path) -> None:
    ring = MessageRing.create(slots=1, slot_bytes=64, directory=str(tmp_path))
    ring.publish(0, 0, 0, 1, 4, np.float32, generation=1)
    calls = []

    def give_up() -> None:
        calls.append(1)
        raise TimeoutError("server gone")

    with pytest.raises(TimeoutError, match="server gone"):
        ring.wait_for_slot(give_up, check_every=0.01)
    assert calls == [1]
    ring.release(1)
    assert ring.wait_for_slot(give_up) < 0.01  # free again: no wait


async def until(condition: Callable[[], bool], what: str, timeout_seconds: float = 10.0) -> None:
    """Yield to the event loop (the server's poller runs) until ``condition()`` holds; fail naming ``what``
    after ``timeout_seconds``."""
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what}: not after {timeout_seconds} s")
        await asyncio.sleep(0.001)


async def publish_epoch(
    server: OrderServer,
    rings: list[MessageRing],
    epoch: int,
    items: np.ndarray,
    rng: np.random.Generator,
    generation: int,
) -> None:
    """Every rank's items [W, m, d] as messages of random sizes, ranks interleaved at random, each
    published once its ring has a free slot."""
    queues = [random_cuts(items.shape[1], rng) for _ in rings]

    def ready() -> list[int]:
        return [
            r for r, ring in enumerate(rings) if queues[r] and ring.published - ring.released < ring.slots
        ]

    while any(queues):
        await until(lambda: bool(ready()), f"a free slot for epoch {epoch}'s next message")
        rank = ready()[int(rng.integers(len(ready())))]
        start, end = queues[rank].pop(0)
        rings[rank].slot_array(items.shape[2], items.dtype)[: end - start] = items[rank, start:end]
        rings[rank].publish(epoch, start, rank, end - start, items.shape[2], items.dtype, generation)


async def run_ring_epochs(
    server: OrderServer, name: str, grads: np.ndarray, rng: np.random.Generator, dtype: type, directory: str
) -> list[np.ndarray]:
    """Orders of epochs 0..E when every rank sends through a 2-slot ring, which also gets its orders."""
    num_epochs, num_workers, shard_size, dim = grads.shape
    generation = await server.reset(None)
    rings = [
        MessageRing.create(2, 4 * dim * np.dtype(dtype).itemsize, directory, order_length=shard_size)
        for _ in range(num_workers)
    ]
    for rank, ring in enumerate(rings):
        await server.attach_ring(rank, ring.path)
        ring.unlink()
        assert server.has_ring(rank, ring.path)
    orders = [await all_orders(server, 0, num_workers)]
    assert_orders_in_rings(rings, 0, orders[-1])  # epoch 0's came with the attach
    for epoch in range(num_epochs):
        items = worker_items(message_kind(name), visiting_gradients(grads[epoch], orders[-1])).astype(dtype)
        await publish_epoch(server, rings, epoch, items, rng, generation)
        orders.append(await asyncio.wait_for(all_orders(server, epoch + 1, num_workers), timeout=10))
        assert all(ring.released == ring.published for ring in rings)  # every slot handed back
        assert_orders_in_rings(rings, epoch + 1, orders[-1])
    return orders


def assert_orders_in_rings(rings: list[MessageRing], epoch: int, orders: np.ndarray) -> None:
    """Each worker's order of ``epoch`` is in its ring (what a worker on a ring fetches)."""
    for rank, ring in enumerate(rings):
        order, _ = ring.wait_for_order(epoch, keep_waiting=lambda: pytest.fail(f"no order for epoch {epoch}"))
        np.testing.assert_array_equal(order, orders[rank])


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_ring_messages_give_the_orders_of_a_centralized_run(name: str, dtype: type, tmp_path) -> None:
    grads = random_gradients(31, 3, 3, 9, 5)
    expected = reference_orders(
        name, grads, 7, np.random.default_rng(0), dtype=None if dtype is np.float32 else dtype
    )
    server = make_server(name)
    got = asyncio.run(run_ring_epochs(server, name, grads, np.random.default_rng(2), dtype, str(tmp_path)))
    assert_same_orders(got, expected)


SMALL_SERVER = dict(name="cd-grab", num_workers=1, shard_size=4, dim=3)  # 2 pairs of 3 coordinates per epoch


async def new_generation_with_ring(server: OrderServer, directory: str) -> tuple[int, MessageRing]:
    """A new worker group's generation and its rank-0 ring (2 slots), attached."""
    generation = await server.reset(None)
    ring = MessageRing.create(2, 64, directory)
    await server.attach_ring(0, ring.path)
    return generation, ring


def publish_the_epoch(ring: MessageRing, generation: int) -> None:
    """All of epoch 0 of SMALL_SERVER (2 pairs of rank 0) as one message."""
    ring.slot_array(3, np.float32)[:2] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    ring.publish(0, 0, 0, 2, 3, np.float32, generation)


def test_stale_generations_are_released_and_a_restarted_server_is_detected(tmp_path) -> None:
    server = make_server(**SMALL_SERVER)

    async def scenario() -> None:
        generation, ring = await new_generation_with_ring(server, str(tmp_path))
        ring.slot_array(3, np.float32)[:2] = 1.0
        ring.publish(0, 0, 0, 2, 3, np.float32, generation - 1)  # a crashed group's message
        await until(lambda: ring.released == 1, "the stale message's slot handed back")
        assert server.queue.cursor == 0  # dropped, not applied
        with pytest.raises(RuntimeError, match="restarted"):
            await server.begin_epoch(1, 0, generation + 1)
        restarted = make_server(**SMALL_SERVER)
        assert not restarted.has_ring(0, ring.path)

    asyncio.run(scenario())


def test_a_failed_poller_is_reported_and_the_next_generation_polls_again(tmp_path) -> None:
    server = make_server(**SMALL_SERVER)

    async def scenario() -> None:
        generation, ring = await new_generation_with_ring(server, str(tmp_path))
        ring.publish(5, 0, 0, 1, 3, np.float32, generation)  # an epoch the server cannot be building
        with pytest.raises(RuntimeError, match="stopped reading shared-memory rings"):
            await asyncio.wait_for(server.begin_epoch(1, 0), timeout=5)
        generation, fresh = await new_generation_with_ring(server, str(tmp_path))  # a new poller too
        assert not server.has_ring(0, ring.path)
        publish_the_epoch(fresh, generation)
        orders = await asyncio.wait_for(server.begin_epoch(1, 0), timeout=5)
        assert sorted(orders.tolist()) == [0, 1, 2, 3] and fresh.released == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("wake", ["an order handed out", "a doorbell"])
def test_an_idle_poller_wakes_at_once(wake: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(server_module, "RING_POLL_SECONDS", (60.0, 60.0))  # idle polls a minute apart
    server = make_server(**SMALL_SERVER)
    poller = server.rings
    wait_for_wake, idle = poller._wait_for_wake, asyncio.Event()

    async def recording_wait_for_wake(seconds: float) -> bool:
        if not poller._wake.is_set():  # about to sleep for the whole minute unless woken
            idle.set()
        return await wait_for_wake(seconds)

    monkeypatch.setattr(poller, "_wait_for_wake", recording_wait_for_wake)

    async def scenario() -> None:
        generation, ring = await new_generation_with_ring(server, str(tmp_path))
        if wake == "a doorbell":
            ring.unlink()  # the worker's side of the doorbell opens here
            assert ring.bell is not None and not list(tmp_path.iterdir())
        idle.clear()  # a sleep that began before the doorbell was open does not count
        await asyncio.wait_for(idle.wait(), timeout=10)  # the poller found the ring empty and sleeps
        publish_the_epoch(ring, generation)  # rings the bell once unlinked
        if wake == "an order handed out":
            await server.begin_epoch(0, 0, generation)  # a worker takes its order: its messages follow
        orders = await asyncio.wait_for(server.begin_epoch(1, 0), timeout=5)
        assert sorted(orders.tolist()) == [0, 1, 2, 3] and ring.released == 1
        if wake == "a doorbell":
            await server.reset(None)  # a new worker group: the old ring's doorbell is closed
            ring.publish(0, 0, 0, 2, 3, np.float32, generation)  # the server has gone: no error here
            ring.close()

    asyncio.run(scenario())


def test_a_snapshot_waits_until_the_epochs_ring_messages_are_applied(tmp_path) -> None:
    server = make_server(**SMALL_SERVER)

    async def scenario() -> None:
        generation, ring = await new_generation_with_ring(server, str(tmp_path))
        publish_the_epoch(ring, generation)  # a worker's flush does not wait for the server
        state = await asyncio.wait_for(server.snapshot(0), timeout=5)
        assert (state["epoch"], state["cursor"], ring.released) == (1, 0, 1)  # at the boundary, not before
        assert sorted(state["orders"][1][0].tolist()) == [0, 1, 2, 3]

    asyncio.run(scenario())


def test_a_restarted_server_refuses_a_snapshot_instead_of_waiting_forever() -> None:
    server = make_server(**SMALL_SERVER)  # as Ray restarts it: generation 0, no rings, epoch 0

    async def scenario() -> None:
        with pytest.raises(OrderServerRestarted, match="generation 0, the worker group at 3"):
            await asyncio.wait_for(server.snapshot(0, generation=3), timeout=5)

    asyncio.run(scenario())
