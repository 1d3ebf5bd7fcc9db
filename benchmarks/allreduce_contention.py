"""What a little more CPU per step costs when data-parallel workers outnumber the cores.

W gloo processes (as ``epoch_overhead.py``'s Ray Train workers use on CPU) each spin for a given
number of milliseconds (the step's own compute), then all-reduce ``--dim`` float32 values (the
gradient and the loss), ``--steps`` times. The table gives, per step: the step's wall time, the
time inside ``all_reduce``, each process's CPU time, and how many milliseconds of step each extra
millisecond of compute costs against the first row (1 when the cores are free). On the README's
2-core machine with W = 4, the all-reduce is most of a step, and each 0.1 ms of compute that an
ordering adds per step lengthens the step by several times that; this is how ``epoch_overhead.py``'s
``mnist-logreg`` ratio amplifies cd-grab's per-step work (its step anatomy table).

    python benchmarks/allreduce_contention.py          # W = 4, d = 7,851, 0.2-0.4 ms (about 2 minutes)
    python benchmarks/allreduce_contention.py --quick  # 500 steps, 2 repeats (30 s)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import machine_line, markdown_table


def spin(seconds: float) -> None:
    """Busy the CPU for ``seconds`` (the step's own compute)."""
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pass


def worker(rank: int, args: argparse.Namespace, port: int, results: mp.Queue) -> None:
    """One data-parallel process: for each repeat and compute time, ``args.steps`` steps; rank 0
    reports (compute ms, step ms, all-reduce ms, CPU ms) per step for each measurement."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.workers)
    values = torch.randn(args.dim)
    for _ in range(100):  # connections and buffers set up
        dist.all_reduce(values)
    for _ in range(args.repeats):
        for compute_ms in args.compute_ms:
            dist.barrier()
            cpu_started, started, in_all_reduce = time.process_time(), time.perf_counter(), 0.0
            for _ in range(args.steps):
                spin(compute_ms / 1e3)
                reduce_started = time.perf_counter()
                dist.all_reduce(values)
                in_all_reduce += time.perf_counter() - reduce_started
            per_step = [
                1e3 * (time.perf_counter() - started) / args.steps,
                1e3 * in_all_reduce / args.steps,
                1e3 * (time.process_time() - cpu_started) / args.steps,
            ]
            if rank == 0:
                results.put((compute_ms, *per_step))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=4, help="W, gloo processes")
    parser.add_argument(
        "--dim", type=int, default=7851, help="values all-reduced per step (mnist-logreg: d + 1)"
    )
    parser.add_argument(
        "--compute-ms",
        type=lambda text: [float(part) for part in text.split(",")],
        default=[0.2, 0.3, 0.4],
        help="milliseconds of compute per step, comma-separated",
    )
    parser.add_argument("--steps", type=int, default=1500, help="steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per compute time (median)")
    parser.add_argument("--quick", action="store_true", help="500 steps, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 500, 2
    print(f"# allreduce_contention: {machine_line()}\n")
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=worker, args=(r, args, port, results)) for r in range(args.workers)]
    for process in processes:
        process.start()
    samples: dict[float, list[tuple[float, float, float]]] = {c: [] for c in args.compute_ms}
    for _ in range(args.repeats * len(args.compute_ms)):
        compute_ms, *per_step = results.get()
        samples[compute_ms].append(tuple(per_step))
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"a gloo process exited with {process.exitcode}")
    medians = {c: [statistics.median(s[i] for s in samples[c]) for i in range(3)] for c in args.compute_ms}
    first = args.compute_ms[0]
    rows = []
    for compute_ms, (step, in_all_reduce, cpu) in medians.items():
        added = compute_ms - first
        cost = f"{(step - medians[first][0]) / added:.1f}" if added > 0 else "-"
        rows.append([f"{compute_ms:.2f}", f"{step:.2f}", f"{in_all_reduce:.2f}", f"{cpu:.2f}", cost])
    print(
        f"W = {args.workers} gloo processes on {os.cpu_count()} cores, all-reduce of {args.dim:,} float32 "
        f"per step, {args.steps} steps per measurement, median of {args.repeats}\n"
    )
    header = [
        "compute ms/step",
        "step ms",
        "all-reduce ms",
        "CPU ms/step/process",
        "step ms added ÷ compute ms added",
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
