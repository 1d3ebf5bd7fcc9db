"""Order-server capacity in pairs/s, end to end (messages in -> orders out), against a plain numpy loop.

Measures, for cd-grab with W producers and d-dimensional pair differences:

- plain: the per-pair rule on the same vectors in the same (pair-major, rank-minor) sequence,
  ``if r @ v < 0: r += v else: r -= v`` on float32 numpy arrays, nothing else;
- in-process: ``orderlab.server.OrderServer`` driven by ``asyncio.run`` over ``push`` of batched
  ``OrderMessage`` numpy payloads, then ``begin_epoch`` of every rank (the orders out);
- actor: ``RemoteOrderServer`` in a local ``ray.init(num_cpus=2)``, the driver sending one message
  per producer per round with ``push.remote`` (at most ``max_in_flight`` per producer in flight, as
  workers do), ``ray.get`` of the pushes at the epoch's end, then ``begin_epoch`` of every rank;
- actor, shared memory: the same actor reading one shared-memory ring per producer (``RingBench``,
  ``ordering.transport: shared_memory``), once per ``--server-threads`` count
  (``ordering.server_threads``) and ``--ring-directories`` entry (``ordering.ring_directory``: give a
  tmpfs mounted with ``-o huge=within_size`` to measure rings on 2 MiB pages);

with float32 and float16 payloads (``payload_dtype``; balancing accumulates in float32). Then the
scaling table: actor capacity for W = 2..64 simulated producers against the rate at which W workers
produce pairs, W × (microbatch / 2) / step_seconds. Every measurement runs whole epochs; pairs/s is
pairs applied over wall seconds from the first message to the last order. Vectors come from a fixed
pool of unit-norm random vectors (at most ``--pool-mib``), reused across messages.

    python benchmarks/server_throughput.py            # the README's tables (6 minutes on 2 cores)
    python benchmarks/server_throughput.py --quick    # d <= 1e5, W <= 16, 1 repeat (2-3 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from _common import fmt, machine_line, markdown_table, median, parse_sizes, plain_balance, timed

from orderlab.channel import BELL_SUFFIX, WIRE_DTYPES, MessageRing, default_ring_directory
from orderlab.orderings import OrderingSpec
from orderlab.server import OrderMessage, OrderServer, RemoteOrderServer
from orderlab.wire import encode_payload

#: the fastest cd-grab step (seconds) that benchmarks/epoch_overhead.py measured with example units and
#: microbatch 16 (8 pairs per worker step), 4 workers on the README's 2-core machine: mnist1d-logreg
#: 6.7 ms (mnist-logreg: 8.2 ms); the fastest step gives the highest production rate
DEFAULT_STEP_SECONDS = 0.0067


@dataclass
class Workload:
    """The messages of ``epochs`` epochs of cd-grab: ``num_workers`` producers, pair differences of ``dim``.

    Round k holds one message per rank with ``pairs_per_message`` pairs; message (k, w) reads slot
    ``(k·W + w) mod num_slots`` of the pool, so every round visits distinct vectors when the pool allows.
    """

    dim: int
    num_workers: int
    pairs_per_worker: int
    pairs_per_message: int
    pool: np.ndarray  # [num_slots * pairs_per_message, dim] float32, unit-norm rows
    encoded: dict[str, np.ndarray] = field(default_factory=dict)

    def encoded_pool(self, payload_dtype: str) -> np.ndarray:
        """The pool in the wire format ``payload_dtype`` (encoded once)."""
        if payload_dtype not in self.encoded:
            self.encoded[payload_dtype] = encode_payload(self.pool, payload_dtype)
        return self.encoded[payload_dtype]

    @property
    def num_pairs(self) -> int:
        return self.num_workers * self.pairs_per_worker

    def rounds(self, epoch: int, payload_dtype: str) -> list[list[OrderMessage]]:
        """The epoch's messages as rounds of one message per rank (items are views of the encoded pool)."""
        encoded = self.encoded_pool(payload_dtype)
        num_slots = len(self.pool) // self.pairs_per_message
        rounds, k = [], 0
        for start in range(0, self.pairs_per_worker, self.pairs_per_message):
            count = min(self.pairs_per_message, self.pairs_per_worker - start)
            batch = []
            for rank in range(self.num_workers):
                first = ((k * self.num_workers + rank) % num_slots) * self.pairs_per_message
                batch.append(OrderMessage(epoch, start, rank, encoded[first : first + count]))
            rounds.append(batch)
            k += 1
        return rounds

    def spec(self, threads: int = 1) -> OrderingSpec:
        return OrderingSpec(
            num_workers=self.num_workers, shard_size=2 * self.pairs_per_worker, dim=self.dim, threads=threads
        )


def make_pool(dim: int, num_vectors: int, seed: int = 0) -> np.ndarray:
    """``num_vectors`` unit-norm float32 random vectors [num_vectors, dim]."""
    pool = np.random.default_rng(seed).standard_normal((num_vectors, dim), dtype=np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    return pool


def plain_loop_seconds(workload: Workload, epochs: int) -> float:
    """Seconds of the plain per-pair rule over the workload's vectors, in the server's order."""
    rounds = [[m.items for m in batch] for batch in workload.rounds(0, "float32")]

    def run() -> None:
        for _ in range(epochs):
            running_sum = np.zeros(workload.dim, dtype=np.float32)
            for batch in rounds:
                plain_balance(running_sum, batch)

    return timed(run)


def _process_time(server: OrderServer) -> float:
    """CPU seconds of the process hosting ``server`` (all its threads), for ``__ray_call__``."""
    return time.process_time()


class InProcessBench:
    """``OrderServer`` (no Ray) driven by ``asyncio.run``; ``measure`` runs the next ``epochs`` epochs."""

    def __init__(self, workload: Workload, payload_dtype: str) -> None:
        self.workload, self.payload_dtype = workload, payload_dtype
        self.server = OrderServer("cd-grab", workload.spec())
        self.epoch, self.cpu_seconds = 0, 0.0

    def measure(self, epochs: int) -> float:
        """Seconds to take ``epochs`` epochs of messages and give out every rank's next order."""
        first, self.epoch = self.epoch, self.epoch + epochs
        rounds = {e: self.workload.rounds(e, self.payload_dtype) for e in range(first, self.epoch)}
        server, num_workers = self.server, self.workload.num_workers

        async def drive() -> None:
            for epoch, batches in rounds.items():
                for batch in batches:
                    await server.push(batch)
                for rank in range(num_workers):
                    await server.begin_epoch(epoch + 1, rank)

        cpu_started = time.process_time()
        seconds = timed(lambda: asyncio.run(drive()))
        self.cpu_seconds = time.process_time() - cpu_started
        return seconds


class ActorBench:
    """``RemoteOrderServer`` fed by the driver as workers feed it; ``measure`` runs the next epochs.

    The driver sends as workers do: one ``push.remote([message])`` per producer per round, at most
    ``max_in_flight`` messages per producer outstanding (and ``max_in_flight_bytes`` in all, which
    only binds for large W × d), ``ray.get`` of the outstanding pushes at the epoch's end (the
    workers' flush), then ``begin_epoch`` of every rank.
    """

    def __init__(
        self, workload: Workload, payload_dtype: str, max_in_flight: int, max_in_flight_bytes: int
    ) -> None:
        self.workload, self.payload_dtype = workload, payload_dtype
        self.max_in_flight, self.max_in_flight_bytes = max_in_flight, max_in_flight_bytes
        self.server = RemoteOrderServer.remote("cd-grab", workload.spec())
        self.epoch, self.cpu_seconds = 0, 0.0

    def ready(self) -> ray.ObjectRef:
        """A reference that resolves once the actor is up (its process started and imported orderlab)."""
        return self.server.begin_epoch.remote(0, 0)

    def measure(self, epochs: int) -> float:
        """Seconds from the first message of the next ``epochs`` epochs to the last rank's next order."""
        first, self.epoch = self.epoch, self.epoch + epochs
        rounds = {e: self.workload.rounds(e, self.payload_dtype) for e in range(first, self.epoch)}
        server, num_workers = self.server, self.workload.num_workers
        limit = self.max_in_flight * num_workers
        cpu_started = ray.get(self.server.__ray_call__.remote(_process_time))
        started = time.perf_counter()
        for epoch, batches in rounds.items():
            in_flight: deque = deque()
            bytes_in_flight = 0
            for batch in batches:
                for message in batch:
                    in_flight.append((server.push.remote([message]), message.items.nbytes))
                    bytes_in_flight += message.items.nbytes
                    while len(in_flight) > limit or (
                        bytes_in_flight > self.max_in_flight_bytes and len(in_flight) > 1
                    ):
                        ref, size = in_flight.popleft()
                        ray.get(ref)
                        bytes_in_flight -= size
            ray.get([ref for ref, _ in in_flight])
            ray.get([server.begin_epoch.remote(epoch + 1, rank) for rank in range(num_workers)])
        seconds = time.perf_counter() - started
        self.cpu_seconds = ray.get(self.server.__ray_call__.remote(_process_time)) - cpu_started
        return seconds

    def close(self) -> None:
        ray.kill(self.server)


class RingBench:
    """``RemoteOrderServer`` fed through shared-memory rings (``ordering.transport: shared_memory``).

    The driver plays every rank as workers do: it publishes each message in that rank's next free
    ring slot (``max_in_flight`` + 1 slots per rank), then at the epoch's end waits for every
    rank's next order in its ring (``MessageRing.wait_for_order``), which the server writes once it
    has applied the epoch's items. Writing a message
    into its slot is the worker's own work (its pair differences are formed there), so the driver
    does not time it: every slot holds its pool vectors from before the first measurement, which
    keeps one driver from being the bottleneck for W producers. The rings' memory (W × slots ×
    message size, 100-320 MiB here) is far beyond the last-level cache, so the server reads every
    vector from memory, as the plain loop reads its pool.
    """

    def __init__(
        self, workload: Workload, payload_dtype: str, max_in_flight: int, threads: int, directory: str
    ) -> None:
        self.workload, self.payload_dtype = workload, payload_dtype
        self.server = RemoteOrderServer.remote("cd-grab", workload.spec(threads))
        wire = WIRE_DTYPES[payload_dtype]
        slot_bytes = workload.pairs_per_message * workload.dim * wire.itemsize
        self.rings = []
        for _ in range(workload.num_workers):
            self.rings.append(
                MessageRing.create(max_in_flight + 1, slot_bytes, directory, 2 * workload.pairs_per_worker)
            )
            # ready() unlinks them; this if the run stops before (paths, so that the memory can go at close)
            for path in (self.rings[-1].path, self.rings[-1].path + BELL_SUFFIX):
                atexit.register(Path(path).unlink, missing_ok=True)
        self.epoch, self.cpu_seconds = 0, 0.0

    def ready(self) -> ray.ObjectRef:
        """A reference that resolves once the actor is up and has mapped every rank's ring, whose
        slots now hold the vectors that their messages will carry."""
        ray.get([self.server.attach_ring.remote(rank, ring.path) for rank, ring in enumerate(self.rings)])
        for ring in self.rings:
            ring.unlink()
        encoded, rows, dim = (
            self.workload.encoded_pool(self.payload_dtype),
            self.workload.pairs_per_message,
            self.workload.dim,
        )
        num_pool_slots = len(encoded) // rows
        for rank, ring in enumerate(self.rings):
            for slot in range(ring.slots):
                first = ((slot * len(self.rings) + rank) % num_pool_slots) * rows
                offset = ring.data_offset + slot * ring.slot_bytes
                np.ndarray((rows, dim), encoded.dtype, ring.memory, offset=offset)[:] = encoded[
                    first : first + rows
                ]
        return self.server.begin_epoch.remote(0, 0)

    def measure(self, epochs: int) -> float:
        """Seconds from the first message of the next ``epochs`` epochs to the last rank's next order."""
        first, self.epoch = self.epoch, self.epoch + epochs
        rounds = {e: self.workload.rounds(e, self.payload_dtype) for e in range(first, self.epoch)}
        dim = self.workload.dim
        cpu_started = ray.get(self.server.__ray_call__.remote(_process_time))
        started = time.perf_counter()
        for epoch, batches in rounds.items():
            for batch in batches:
                for message in batch:
                    ring = self.rings[message.rank]
                    ring.wait_for_slot(_keep_waiting)  # the slot holds its vectors already (see ready)
                    ring.publish(
                        epoch, message.start, message.rank, len(message.items), dim, message.items.dtype, 0
                    )
            for ring in self.rings:
                ring.wait_for_order(epoch + 1, _keep_waiting)
        seconds = time.perf_counter() - started
        self.cpu_seconds = ray.get(self.server.__ray_call__.remote(_process_time)) - cpu_started
        return seconds

    def close(self) -> None:
        ray.kill(self.server)
        self.rings.clear()


def _keep_waiting() -> None:
    """The benchmark's server does not restart: wait on."""


def make_benches(
    workload: Workload,
    dtypes: list[str],
    args: argparse.Namespace,
    kinds: tuple[str, ...] | None = None,
) -> dict[tuple[str, str], InProcessBench | ActorBench | RingBench]:
    """In-process and (unless ``--no-ray``) actor benches of ``kinds`` (default: all) for each payload
    dtype (see ``wait_ready``); a shared-memory actor per ``--server-threads`` count and ring directory."""
    rings = [(t, d) for d in args.ring_directories for t in args.server_threads]
    kinds = kinds or ("in-process", "actor", *(ring_kind(t, d) for t, d in rings))
    benches: dict[tuple[str, str], InProcessBench | ActorBench | RingBench] = {}
    for dtype in dtypes:
        if "in-process" in kinds:
            benches[("in-process", dtype)] = InProcessBench(workload, dtype)
        if "actor" in kinds and not args.no_ray:
            benches[("actor", dtype)] = ActorBench(
                workload, dtype, args.max_in_flight, int(args.max_in_flight_mib * 2**20)
            )
        for threads, directory in rings:
            kind = ring_kind(threads, directory)
            if kind in kinds and not args.no_ray:
                benches[(kind, dtype)] = RingBench(workload, dtype, args.max_in_flight, threads, directory)
    return benches


def ring_kind(threads: int, directory: str) -> str:
    """The bench name of the shared-memory actor balancing on ``threads`` threads, rings in ``directory``."""
    where = "" if directory == default_ring_directory() else f" in {directory}"
    return f"actor, shared memory{where}" + (f", {threads} threads" if threads > 1 else "")


def wait_ready(*bench_dicts: dict) -> None:
    """Wait until every actor of ``bench_dicts`` is up (they start concurrently), then run one untimed
    epoch on every bench: numba compiles the balancing kernel per payload dtype and W on first use."""
    ray.get(
        [b.ready() for benches in bench_dicts for b in benches.values() if not isinstance(b, InProcessBench)]
    )
    for benches in bench_dicts:
        for bench in benches.values():
            bench.measure(1)


def close_benches(benches: dict) -> None:
    for bench in benches.values():
        if not isinstance(bench, InProcessBench):
            bench.close()


def size_workload(
    dim: int,
    num_workers: int,
    pair_seconds: float,
    args: argparse.Namespace,
) -> Workload:
    """A workload whose ``args.epochs`` epochs take about ``args.target_seconds`` at 3× the plain per-pair cost."""
    pairs_per_message = max(1, min(args.pairs_per_message, int(args.max_message_mib * 2**20 / (4 * dim))))
    total_pairs = args.target_seconds / (3 * pair_seconds) / args.epochs
    pairs_per_worker = max(1, math.ceil(total_pairs / num_workers / pairs_per_message)) * pairs_per_message
    num_slots = max(1, int(args.pool_mib * 2**20 / (4 * dim * pairs_per_message)))
    return Workload(
        dim, num_workers, pairs_per_worker, pairs_per_message, make_pool(dim, num_slots * pairs_per_message)
    )


def plain_pair_seconds(dim: int) -> float:
    """A quick estimate of the plain loop's seconds per pair at ``dim`` (for sizing only)."""
    pool = make_pool(dim, max(4, min(256, int(2**26 / (4 * dim)))), seed=1)
    workload = Workload(dim, 1, len(pool), len(pool), pool)
    repeats = max(1, int(2e7 / (dim * len(pool))))
    return plain_loop_seconds(workload, repeats) / (repeats * len(pool))


def capacity_table(args: argparse.Namespace, pair_costs: dict[int, float], dtypes: list[str]) -> None:
    """Table 1: plain loop vs in-process server vs actor at W = args.workers, medians over repeats.

    Every repeat measures the plain loop and then each server back to back (servers stay up
    between repeats), so a ratio compares runs seconds apart on the shared machine.
    """
    W = args.workers
    workloads = {dim: size_workload(dim, W, pair_costs[dim], args) for dim in args.dims}
    benches = {dim: make_benches(workload, dtypes, args) for dim, workload in workloads.items()}
    wait_ready(*benches.values())
    samples: dict[tuple, list[float]] = {}
    for repeat in range(args.repeats):
        for dim, workload in workloads.items():
            pairs = workload.num_pairs * args.epochs
            plain = plain_loop_seconds(workload, args.epochs)
            samples.setdefault((dim, "plain"), []).append(pairs / plain)
            for key, bench in benches[dim].items():
                seconds = bench.measure(args.epochs)
                samples.setdefault((dim, *key), []).append(pairs / seconds)
                samples.setdefault((dim, *key, "cpu"), []).append(1e6 * bench.cpu_seconds / pairs)
                samples.setdefault((dim, *key, "ratio"), []).append(plain / seconds)
        print(f"  capacity repeat {repeat + 1}/{args.repeats} done", flush=True)
    for dim_benches in benches.values():
        close_benches(dim_benches)

    rows = []
    for dim in workloads:
        plain = median(samples[(dim, "plain")])
        rows.append(
            [f"{dim:.0e}", "plain numpy loop", "float32", fmt(plain), fmt(1e6 / plain), "-", "1", "-"]
        )
        for kind, dtype in benches[dim]:
            rate = median(samples[(dim, kind, dtype)])
            ratio = median(samples[(dim, kind, dtype, "ratio")])
            goal = "met" if ratio >= 1.5 else "missed"
            cpu = fmt(median(samples[(dim, kind, dtype, "cpu")]))
            rows.append([f"{dim:.0e}", kind, dtype, fmt(rate), fmt(1e6 / rate), cpu, f"{ratio:.2f}", goal])
    print()
    print(
        f"Order-server capacity, cd-grab, W = {W}, median of {args.repeats} repeats, "
        f"{args.epochs} epochs per measurement; pairs per message: "
        + ", ".join(f"{w.pairs_per_message} (d={d:.0e})" for d, w in workloads.items())
        + "; pairs per worker per epoch: "
        + ", ".join(f"{w.pairs_per_worker} (d={d:.0e})" for d, w in workloads.items())
        + ". ours/plain: the median over repeats of plain seconds / server seconds for the same pairs; "
        "server CPU µs/pair: CPU time of the process hosting the server (the driver in-process, all the "
        "actor's threads for the actor) per pair, against its wall µs/pair."
    )
    print()
    header = [
        "d",
        "server",
        "payload",
        "pairs/s",
        "µs/pair",
        "server CPU µs/pair",
        "ours/plain",
        "≥ 1.5× plain",
    ]
    print(markdown_table(header, rows))


def scaling_table(args: argparse.Namespace, pair_costs: dict[int, float], dtypes: list[str]) -> None:
    """Table 2: server capacity vs the production rate W × (microbatch/2) / step_seconds.

    The servers of one W and d start together (one per payload dtype), then each runs
    ``scaling_repeats`` measurements in a row; they close before the next d starts, so the rings of
    only one d exist at a time (at W = 64 and d = 1e6: 7.5 GiB with both dtypes).
    """
    per_worker_rate = (args.microbatch / 2) / args.step_seconds
    kind = (
        "in-process"
        if args.no_ray
        else {
            "ray": "actor",
            "shared_memory": ring_kind(max(args.server_threads), args.ring_directories[-1]),
        }[args.transport]
    )
    samples: dict[tuple, list[float]] = {}
    for num_workers in args.scaling_workers:
        for dim in args.dims:
            workload = size_workload(dim, num_workers, pair_costs[dim], args)
            benches = make_benches(workload, dtypes, args, kinds=(kind,))
            wait_ready(benches)
            for dtype in dtypes:
                samples[(num_workers, dim, dtype)] = [
                    workload.num_pairs * args.epochs / benches[(kind, dtype)].measure(args.epochs)
                    for _ in range(args.scaling_repeats)
                ]
            close_benches(benches)
        print(f"  scaling W={num_workers} done", flush=True)

    rows = []
    for num_workers in args.scaling_workers:
        production = num_workers * per_worker_rate
        row = [str(num_workers), fmt(production)]
        for dim in args.dims:
            for dtype in dtypes:
                capacity = median(samples[(num_workers, dim, dtype)])
                flag = (
                    " **sat**" if production >= capacity else (" (<2×)" if capacity < 2 * production else "")
                )
                row.append(f"{fmt(capacity)} ({capacity / production:.1f}×){flag}")
        rows.append(row)
    print()
    print(
        f"Scaling: {kind} capacity in pairs/s "
        f"(capacity / production), median of {args.scaling_repeats}, for W simulated producers; "
        f"production = W × {args.microbatch}/2 pairs per step / {args.step_seconds * 1e3:.1f} ms per step = "
        f"W × {per_worker_rate:,.0f} pairs/s; **sat**: production ≥ capacity; (<2×): below the 2× goal"
    )
    print()
    header = ["W", "production pairs/s"] + [f"d={d:.0e} {t}" for d in args.dims for t in dtypes]
    print(markdown_table(header, rows))
    print()
    largest = max(args.scaling_workers)
    for dim in args.dims:
        for dtype in dtypes:
            capacity = {w: median(samples[(w, dim, dtype)]) for w in args.scaling_workers}
            saturated = [w for w in args.scaling_workers if w * per_worker_rate >= capacity[w]]
            short = [w for w in args.scaling_workers if 2 * w * per_worker_rate > capacity[w]]
            print(
                f"- d={dim:.0e} {dtype}: saturates at W = "
                f"{saturated[0] if saturated else f'none up to {largest}'}; under 2× headroom from W = "
                f"{short[0] if short else f'none up to {largest}'}; capacity at W={largest}: "
                f"{fmt(capacity[largest])} pairs/s, the production of {capacity[largest] / per_worker_rate:.2g} workers"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dims", type=parse_sizes, default=parse_sizes("1e4,1e5,1e6"), help="d values, e.g. 1e4,1e5,1e6"
    )
    parser.add_argument("--workers", type=int, default=4, help="W for the capacity table")
    parser.add_argument(
        "--payload-dtypes", default="float32,float16", help="comma-separated payload_dtype values"
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs per measurement")
    parser.add_argument("--target-seconds", type=float, default=1.0, help="rough seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the capacity table (median)")
    parser.add_argument(
        "--pairs-per-message", type=int, default=128, help="16 steps × microbatch 16 / 2 as workers send"
    )
    parser.add_argument(
        "--max-message-mib", type=float, default=16.0, help="cap on one message's payload (float32)"
    )
    parser.add_argument(
        "--pool-mib",
        type=float,
        default=64.0,
        help="memory for the pool of distinct vectors (beyond the last-level cache)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=4,
        help="messages per producer outstanding (ordering.max_in_flight)",
    )
    parser.add_argument(
        "--max-in-flight-mib", type=float, default=1024.0, help="cap on all outstanding payload bytes"
    )
    parser.add_argument("--scaling-workers", type=parse_sizes, default=parse_sizes("2,4,8,16,32,64"))
    parser.add_argument("--scaling-repeats", type=int, default=2)
    parser.add_argument(
        "--step-seconds", type=float, default=DEFAULT_STEP_SECONDS, help="a worker's cd-grab step time"
    )
    parser.add_argument("--microbatch", type=int, default=16, help="units per worker step (example units)")
    parser.add_argument(
        "--server-threads",
        type=parse_sizes,
        default=parse_sizes("1,2"),
        help="ordering.server_threads of the shared-memory actors (the scaling table takes the largest)",
    )
    parser.add_argument(
        "--ring-directories",
        type=lambda text: [d.strip() for d in text.split(",") if d.strip()],
        default=[default_ring_directory()],
        help="comma-separated ordering.ring_directory values for the shared-memory actors (the scaling "
        "table takes the last), e.g. /dev/shm,/mnt/huge for a tmpfs mounted with -o huge=within_size",
    )
    parser.add_argument("--no-ray", action="store_true", help="in-process server only")
    parser.add_argument(
        "--transport",
        choices=["shared_memory", "ray"],
        default="shared_memory",
        help="how the scaling table's producers reach the actor (ordering.transport)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="d = 1e4, 1e5; W up to 16; 1 repeat; shorter runs"
    )
    args = parser.parse_args()
    if args.quick:
        args.dims = [d for d in args.dims if d <= 100_000] or args.dims[:1]
        args.scaling_workers = [w for w in args.scaling_workers if w <= 16]
        args.repeats, args.scaling_repeats, args.target_seconds = 1, 1, 0.4
    dtypes = [t.strip() for t in args.payload_dtypes.split(",") if t.strip()]

    torch.set_num_threads(1)  # as in the actor: Ray sets OMP_NUM_THREADS=1 for a 0-CPU actor
    print(f"# server_throughput: {machine_line()}", flush=True)
    started = time.perf_counter()
    pair_costs = {dim: plain_pair_seconds(dim) for dim in args.dims}
    print(
        "  plain loop estimate, µs/pair: "
        + ", ".join(f"d={d:.0e}: {c * 1e6:.1f}" for d, c in pair_costs.items())
    )
    if not args.no_ray:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    capacity_table(args, pair_costs, dtypes)
    if args.scaling_workers:  # --scaling-workers "" skips the scaling table
        scaling_table(args, pair_costs, dtypes)
    print(f"\n(server_throughput took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
