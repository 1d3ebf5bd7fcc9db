"""OrderServer (plain class, no Ray): keyed messages in any arrival order give a centralized run's orders.

The reference is a direct ``make_ordering`` run fed with ``observe(grads)`` in visiting order. The
server is fed what workers send: raw unit gradients keyed by unit position (``grab``) or pair
differences v = g(position 2q) - g(position 2q+1) keyed by pair index q (``pair-balance``,
``cd-grab``), cut into random chunks, shuffled across ranks and chunks, with replays.
Each scenario runs inside one ``asyncio.run`` (the server's event binds to the loop that first waits).
"""

from __future__ import annotations

import asyncio
import io

import numba
import numpy as np
import pytest
import torch

from orderlab.orderings import OrderingSpec, make_ordering
from orderlab.orderings import _balance as balance_module
from orderlab.orderings._balance import PARALLEL_MIN_DIM
from orderlab.server import OrderMessage, OrderServer

GRADIENT_ORDERINGS = ("grab", "pair-balance", "cd-grab")
GRADIENT_FREE_ORDERINGS = ("rr", "so", "flipflop", "with-replacement")
NUM_WORKERS = 3
SHARD_SIZE = 9  # odd: the last unit of every pair ordering takes the middle slot
DIM = 5
NUM_EPOCHS = 3
SEED = 7


def message_kind(name: str) -> str:
    return "unit_gradients" if name == "grab" else "pair_differences"


def random_gradients(seed: int, num_epochs: int, num_workers: int, shard_size: int, dim: int) -> np.ndarray:
    """Gaussian unit gradients [epoch, worker, local unit, dim] float32 (no near-ties in the sign test)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((num_epochs, num_workers, shard_size, dim)).astype(np.float32)


def visiting_gradients(grads_by_unit: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """[W, n, d]: each worker's unit gradients in its visiting order ``orders`` [W, n]."""
    return np.take_along_axis(grads_by_unit, orders[:, :, None], axis=1)


def worker_items(kind: str, visit: np.ndarray) -> np.ndarray:
    """What workers send for one epoch: unit gradients [W, n, d] or pair differences [W, n // 2, d]."""
    if kind == "unit_gradients":
        return visit
    num_paired = visit.shape[1] - visit.shape[1] % 2
    return visit[:, 0:num_paired:2] - visit[:, 1:num_paired:2]


def random_cuts(length: int, rng: np.random.Generator, max_chunk: int = 3) -> list[tuple[int, int]]:
    """[start, end) chunks covering 0..length-1 with random sizes 1..max_chunk."""
    cuts, start = [], 0
    while start < length:
        end = min(length, start + int(rng.integers(1, max_chunk + 1)))
        cuts.append((start, end))
        start = end
    return cuts


def chunk_messages(epoch: int, items: np.ndarray, rng: np.random.Generator) -> list[OrderMessage]:
    """Every rank's items [W, m, d] cut into keyed messages of random sizes."""
    return [
        OrderMessage(epoch, start, rank, items[rank, start:end].copy())
        for rank in range(items.shape[0])
        for start, end in random_cuts(items.shape[1], rng)
    ]


def with_replays(messages: list[OrderMessage], rng: np.random.Generator, extra: list[OrderMessage]) -> list:
    """The messages plus duplicates of about a third of them and ``extra`` old ones, shuffled."""
    replays = [m for m in messages if rng.random() < 0.35]
    delivery = messages + replays + extra
    return [delivery[i] for i in rng.permutation(len(delivery))]


async def deliver(server: OrderServer, messages: list[OrderMessage], rng: np.random.Generator) -> None:
    """Push ``messages`` in batches of 1..3 messages per ``push`` call."""
    position = 0
    while position < len(messages):
        size = int(rng.integers(1, 4))
        await server.push(messages[position : position + size])
        position += size


def reference_orders(
    name: str, grads: np.ndarray, seed: int, rng: np.random.Generator, dtype: type | None = None
) -> list[np.ndarray]:
    """Orders of epochs 0..E from a direct ordering run fed ``observe(grads)`` in visiting order.

    With ``dtype`` (float16), the ordering is fed the worker-side items rounded to ``dtype`` and
    widened back to float32 through ``observe_items`` instead.
    """
    num_epochs, num_workers, shard_size, dim = grads.shape
    ordering = make_ordering(name, num_workers=num_workers, shard_size=shard_size, dim=dim, seed=seed)
    orders = [ordering.begin_epoch().numpy()]
    for epoch in range(num_epochs):
        visit = visiting_gradients(grads[epoch], orders[-1])
        if dtype is None:
            for start, end in random_cuts(shard_size, rng, max_chunk=4):
                ordering.observe(torch.from_numpy(visit[:, start:end].copy()))
        else:
            items = worker_items(message_kind(name), visit).astype(dtype).astype(np.float32)
            ordering.observe_items(torch.from_numpy(items))
        orders.append(ordering.begin_epoch().numpy())
    return orders


async def all_orders(server: OrderServer, epoch: int, num_workers: int) -> np.ndarray:
    """[W, n] orders of ``epoch`` as every rank sees them (ranks asking in reverse order)."""
    rows = {rank: await server.begin_epoch(epoch, rank) for rank in reversed(range(num_workers))}
    return np.stack([rows[rank] for rank in range(num_workers)])


async def run_server_epochs(
    server: OrderServer, name: str, grads: np.ndarray, rng: np.random.Generator, dtype: type = np.float32
) -> list[np.ndarray]:
    """Feed ``grads`` epoch by epoch as shuffled, replayed, chunked messages; return orders of epochs 0..E."""
    num_epochs, num_workers = grads.shape[:2]
    orders = [await all_orders(server, 0, num_workers)]
    previous: list[OrderMessage] = []
    for epoch in range(num_epochs):
        items = worker_items(message_kind(name), visiting_gradients(grads[epoch], orders[-1])).astype(dtype)
        messages = chunk_messages(epoch, items, rng)
        stale = [previous[i] for i in rng.permutation(len(previous))[:3]]  # last epoch's replays do nothing
        await deliver(server, with_replays(messages, rng, stale), rng)
        orders.append(await all_orders(server, epoch + 1, num_workers))
        previous = messages
    return orders


def assert_same_orders(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for epoch, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == np.int64, f"epoch {epoch}: dtype {g.dtype}"
        np.testing.assert_array_equal(g, e, err_msg=f"orders of epoch {epoch} differ")


def make_server(name: str, num_workers: int = NUM_WORKERS, shard_size: int = SHARD_SIZE, dim: int = DIM):
    return OrderServer(name, OrderingSpec(num_workers=num_workers, shard_size=shard_size, dim=dim, seed=SEED))


# --------------------------------------------------------------------------------------------------
# Orders equal a centralized run
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
@pytest.mark.parametrize(("num_workers", "shard_size", "seed"), [(3, 9, 0), (3, 9, 1), (2, 8, 2), (1, 7, 3)])
def test_orders_equal_direct_ordering(name: str, num_workers: int, shard_size: int, seed: int) -> None:
    grads = random_gradients(100 + seed, NUM_EPOCHS, num_workers, shard_size, DIM)
    expected = reference_orders(name, grads, SEED, np.random.default_rng(seed))
    server = make_server(name, num_workers, shard_size)
    got = asyncio.run(run_server_epochs(server, name, grads, np.random.default_rng(1000 + seed)))
    assert_same_orders(got, expected)
    for orders in got:  # orderings.md: every unit once per epoch
        assert (np.sort(orders, axis=1) == np.arange(shard_size)).all()


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_server_threads_give_the_orders_of_one_thread(name: str) -> None:
    """ordering.server_threads = 2 splits each pass over r by coordinates (d ≥ PARALLEL_MIN_DIM)."""
    dim = PARALLEL_MIN_DIM + 7
    grads = random_gradients(31, 2, 2, 6, dim)
    expected = reference_orders(name, grads, SEED, np.random.default_rng(0))
    server = OrderServer(name, OrderingSpec(num_workers=2, shard_size=6, dim=dim, seed=SEED, threads=2))
    assert server.queue.ordering.state.sign.threads == min(2, numba.config.NUMBA_NUM_THREADS)
    got = asyncio.run(run_server_epochs(server, name, grads, np.random.default_rng(1)))
    assert_same_orders(got, expected)


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_orders_do_not_depend_on_arrival_order(name: str) -> None:
    grads = random_gradients(5, NUM_EPOCHS, NUM_WORKERS, SHARD_SIZE, DIM)
    runs = [
        asyncio.run(run_server_epochs(make_server(name), name, grads, np.random.default_rng(seed)))
        for seed in (11, 12)
    ]
    assert_same_orders(runs[0], runs[1])


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_float16_payloads_equal_rounded_float32_run(name: str) -> None:
    grads = random_gradients(21, NUM_EPOCHS, NUM_WORKERS, SHARD_SIZE, DIM)
    expected = reference_orders(name, grads, SEED, np.random.default_rng(0), dtype=np.float16)
    server = make_server(name)
    got = asyncio.run(run_server_epochs(server, name, grads, np.random.default_rng(3), dtype=np.float16))
    assert_same_orders(got, expected)
    items_per_rank = SHARD_SIZE if name == "grab" else SHARD_SIZE // 2
    assert (
        server.queue.bytes_received >= NUM_EPOCHS * NUM_WORKERS * items_per_rank * DIM * 2
    )  # float16: 2 bytes


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
@pytest.mark.parametrize("payload_dtype", ["float32", "float16", "bfloat16"])
def test_loading_the_kernel_at_start_up_changes_no_order(name: str, payload_dtype: str) -> None:
    grads = random_gradients(23, NUM_EPOCHS, NUM_WORKERS, SHARD_SIZE, DIM)
    expected = reference_orders(name, grads, SEED, np.random.default_rng(0))
    spec = OrderingSpec(num_workers=NUM_WORKERS, shard_size=SHARD_SIZE, dim=DIM, seed=SEED)
    server = OrderServer(name, spec, payload_dtype=payload_dtype)
    assert server.queue.cursor == 0 and server.queue.bytes_received == 0
    got = asyncio.run(run_server_epochs(server, name, grads, np.random.default_rng(4)))
    assert_same_orders(got, expected)


@pytest.mark.parametrize("name", GRADIENT_FREE_ORDERINGS)
def test_gradient_free_orderings_need_no_push(name: str) -> None:
    ordering = make_ordering(name, num_workers=NUM_WORKERS, shard_size=SHARD_SIZE, seed=SEED)
    expected = [ordering.begin_epoch().numpy() for _ in range(4)]
    server = OrderServer(name, OrderingSpec(num_workers=NUM_WORKERS, shard_size=SHARD_SIZE, dim=0, seed=SEED))
    assert not server.queue.needs_gradients

    async def scenario() -> list[np.ndarray]:
        got = []
        for epoch in range(4):
            got.append(await asyncio.wait_for(all_orders(server, epoch, NUM_WORKERS), timeout=5))
            # a slow rank may still ask for the previous epoch after a fast one moved on
            if epoch:
                previous = await asyncio.wait_for(server.begin_epoch(epoch - 1, 0), timeout=5)
                np.testing.assert_array_equal(previous, got[epoch - 1][0])
        return got

    assert_same_orders(asyncio.run(scenario()), expected)
    assert server.queue.bytes_received == 0


# --------------------------------------------------------------------------------------------------
# Waiting, partial application, replays, bytes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_begin_epoch_waits_until_the_epoch_is_complete(name: str) -> None:
    num_workers, shard_size = 2, 6
    grads = random_gradients(31, 1, num_workers, shard_size, DIM)
    expected = reference_orders(name, grads, SEED, np.random.default_rng(0))
    server = make_server(name, num_workers, shard_size)

    async def scenario() -> np.ndarray:
        orders = await all_orders(server, 0, num_workers)
        items = worker_items(message_kind(name), visiting_gradients(grads[0], orders))
        last = items.shape[1] - 1
        held_back = OrderMessage(0, last, 1, items[1, last:].copy())
        await server.push(
            [OrderMessage(0, 0, 0, items[0].copy()), OrderMessage(0, 0, 1, items[1, :last].copy())]
        )
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(server.begin_epoch(1, 0), timeout=0.05)
        waiting = asyncio.ensure_future(server.begin_epoch(1, 1))
        done, _ = await asyncio.wait([waiting], timeout=0.05)
        assert not done, "begin_epoch(1) answered before rank 1's last item arrived"
        await server.push([held_back])
        order_rank1 = await asyncio.wait_for(waiting, timeout=5)
        order_rank0 = await asyncio.wait_for(server.begin_epoch(1, 0), timeout=5)
        return np.stack([order_rank0, order_rank1])

    np.testing.assert_array_equal(asyncio.run(scenario()), expected[1])


def test_push_applies_only_items_every_rank_has_sent() -> None:
    num_workers, shard_size = 3, 8
    server = make_server("cd-grab", num_workers, shard_size)
    pairs = np.random.default_rng(0).standard_normal((num_workers, shard_size // 2, DIM)).astype(np.float32)

    async def scenario() -> list[int]:
        applied = [await server.push([OrderMessage(0, 1, 0, pairs[0, 1:3].copy())])]  # a gap at pair 0
        applied.append(await server.push([OrderMessage(0, 0, 0, pairs[0, :1].copy())]))
        applied.append(await server.push([OrderMessage(0, 0, 1, pairs[1, :4].copy())]))
        applied.append(await server.push([OrderMessage(0, 0, 2, pairs[2, :2].copy())]))
        applied.append(await server.push([OrderMessage(0, 2, 2, pairs[2, 2:].copy())]))
        return applied

    assert asyncio.run(scenario()) == [0, 0, 0, 2, 3]
    assert server.queue.epoch == 0 and server.queue.cursor == 3


def test_bytes_received_counts_each_payload_once() -> None:
    num_workers, shard_size = 2, 4
    server = make_server("grab", num_workers, shard_size)
    grads = np.random.default_rng(1).standard_normal((num_workers, shard_size, DIM)).astype(np.float32)
    halves = [OrderMessage(0, s, r, grads[r, s : s + 2].copy()) for r in range(num_workers) for s in (0, 2)]
    rank0_first, rank0_second, rank1_first, rank1_second = halves

    async def scenario() -> None:
        await server.push([rank0_first, rank0_first])  # a replay of a pending message
        await server.push([rank1_first])  # applies items 0..1 of both ranks
        await server.push([rank0_first, rank1_first])  # replays of applied messages
        await server.push([OrderMessage(0, 2, 0, grads[0, 2:].astype(np.float16))])
        await server.push([rank1_second, rank1_second])  # completes epoch 0
        await server.push([rank0_second, rank1_first])  # replays of the finished epoch

    asyncio.run(scenario())
    assert server.queue.epoch == 1
    assert (
        server.queue.bytes_received == 3 * 2 * DIM * 4 + 2 * DIM * 2
    )  # three float32 chunks, one float16 chunk


def test_bytes_received_ignores_replay_of_partly_applied_message() -> None:
    num_workers, shard_size = 2, 4
    server = make_server("grab", num_workers, shard_size)
    grads = np.random.default_rng(2).standard_normal((num_workers, shard_size, DIM)).astype(np.float32)
    whole_rank0 = OrderMessage(0, 0, 0, grads[0].copy())

    async def scenario() -> None:
        assert await server.push([whole_rank0, OrderMessage(0, 0, 1, grads[1, :2].copy())]) == 2
        await server.push([whole_rank0])  # replay: items 0..1 applied, 2..3 pending
        await server.push([OrderMessage(0, 2, 1, grads[1, 2:].copy())])

    asyncio.run(scenario())
    assert server.queue.epoch == 1
    assert server.queue.bytes_received == (4 + 4) * DIM * 4


def test_pair_ordering_with_one_unit_per_shard_advances_without_messages() -> None:
    # shard_size=1: a pair ordering has 0 items per epoch and workers send nothing at all
    server = make_server("pair-balance", num_workers=2, shard_size=1)
    ordering = make_ordering("pair-balance", num_workers=2, shard_size=1, dim=DIM, seed=SEED)
    expected = [ordering.begin_epoch().numpy() for _ in range(3)]

    async def scenario() -> list[np.ndarray]:
        return [await asyncio.wait_for(all_orders(server, epoch, 2), timeout=0.2) for epoch in range(3)]

    assert_same_orders(asyncio.run(scenario()), expected)


def test_empty_pushes_do_not_run_ahead_with_one_unit_per_shard() -> None:
    server = make_server("pair-balance", num_workers=2, shard_size=1)
    ordering = make_ordering("pair-balance", num_workers=2, shard_size=1, dim=DIM, seed=SEED)
    expected = [ordering.begin_epoch().numpy() for _ in range(3)]

    async def scenario() -> list[np.ndarray]:
        for _ in range(3):
            await server.push([])
        return [await asyncio.wait_for(all_orders(server, epoch, 2), timeout=0.2) for epoch in range(3)]

    assert_same_orders(asyncio.run(scenario()), expected)


# --------------------------------------------------------------------------------------------------
# Snapshot and restore
# --------------------------------------------------------------------------------------------------


def checkpoint_round_trip(state: dict) -> dict:
    """``state`` through torch.save / torch.load(weights_only=True), as the worker's checkpoint does."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_restore_at_epoch_boundary_continues_identically(name: str) -> None:
    grads = random_gradients(41, NUM_EPOCHS, NUM_WORKERS, SHARD_SIZE, DIM)
    expected = reference_orders(name, grads, SEED, np.random.default_rng(0))

    async def continue_from(server: OrderServer, first_epoch: int) -> list[np.ndarray]:
        """Orders of epochs first_epoch..E, feeding epochs first_epoch..E-1 as shuffled chunked messages."""
        orders = [await all_orders(server, first_epoch, NUM_WORKERS)]
        for epoch in range(first_epoch, NUM_EPOCHS):
            rng = np.random.default_rng(epoch)
            items = worker_items(message_kind(name), visiting_gradients(grads[epoch], orders[-1]))
            await deliver(server, with_replays(chunk_messages(epoch, items, rng), rng, []), rng)
            orders.append(await all_orders(server, epoch + 1, NUM_WORKERS))
        return orders

    async def scenario() -> None:
        source = make_server(name)
        await run_server_epochs(source, name, grads[:1], np.random.default_rng(1))  # epoch 0 complete
        state = await source.snapshot()
        assert state["epoch"] == 1 and state["cursor"] == 0
        bytes_at_boundary = source.queue.bytes_received

        # a fresh server, through a checkpoint file's round trip
        fresh = make_server(name)
        fresh.restore(checkpoint_round_trip(state))
        assert fresh.queue.bytes_received == bytes_at_boundary
        np.testing.assert_array_equal(await all_orders(fresh, 0, NUM_WORKERS), expected[0])
        assert_same_orders(await continue_from(fresh, 1), expected[1:])

        # the same server, after some of epoch 1's messages had already been applied
        items = worker_items(message_kind(name), visiting_gradients(grads[1], expected[1]))
        await source.push([OrderMessage(1, 0, rank, items[rank, :2].copy()) for rank in range(NUM_WORKERS)])
        await source.push([OrderMessage(1, 2, 0, items[0, 2:3].copy())])
        assert source.queue.cursor == 2
        source.restore(state)
        assert source.queue.cursor == 0 and source.queue.bytes_received == bytes_at_boundary
        assert_same_orders(await continue_from(source, 1), expected[1:])

    asyncio.run(scenario())


def test_restore_gradient_free_ordering_continues_identically() -> None:
    source = OrderServer("rr", OrderingSpec(num_workers=NUM_WORKERS, shard_size=SHARD_SIZE, dim=0, seed=SEED))
    reference = OrderServer(
        "rr", OrderingSpec(num_workers=NUM_WORKERS, shard_size=SHARD_SIZE, dim=0, seed=SEED)
    )

    async def scenario() -> None:
        expected = [await all_orders(reference, epoch, NUM_WORKERS) for epoch in range(4)]
        for epoch in range(2):
            await all_orders(source, epoch, NUM_WORKERS)
        state = checkpoint_round_trip(await source.snapshot())
        fresh = OrderServer(
            "rr", OrderingSpec(num_workers=NUM_WORKERS, shard_size=SHARD_SIZE, dim=0, seed=SEED)
        )
        fresh.restore(state)
        for epoch in (1, 2, 3):
            np.testing.assert_array_equal(await all_orders(fresh, epoch, NUM_WORKERS), expected[epoch])

    asyncio.run(scenario())


def test_a_server_told_its_payload_dtype_loads_the_kernel_before_any_message(monkeypatch) -> None:
    monkeypatch.setattr(balance_module, "_kernel_types", set())  # as in a fresh actor process
    OrderServer(
        "cd-grab", OrderingSpec(num_workers=3, shard_size=8, dim=DIM, seed=SEED), payload_dtype="float16"
    )
    ((dtype, ndim, contiguous, writeable, aligned),) = {
        key for types in balance_module._kernel_types for key in types
    }
    assert (dtype, ndim, contiguous, writeable, aligned) == (np.dtype(np.uint16), 2, True, False, True)
