"""Blocked balancing (the issue's design) against the kernel the order server uses and the plain loop.

Blocked, for each block of k consecutive vectors V of the sequence: one sweep over d in chunks that
first applies the previous block's signed vectors to r (one at a time, so r gets exactly the plain
rule's float32 sums), then accumulates V·r and the Gram matrix V·Vᵀ (float32 within a chunk, float64
across chunks); then the k signs are decided on scalars, <r_q, v_q> = (V·r)_q + Σ_{p<q} ε_p G_qp.
Fused (``orderlab.orderings._balance.fused_balance``, what the server runs): one pass per two
vectors that adds the two decided last to r and takes the inner products with the next two; on one
thread, and with each pass split over ``--threads`` threads (``ordering.server_threads``). Plain:
``r @ v`` then ``r ± v`` in numpy. One read: every vector summed once and nothing else, the least
memory traffic any exact kernel can have, so plain ÷ one read bounds every kernel's speed-up on the
machine. All run on the same unit-norm float32 vectors of a 64 MiB pool (W = 4 arrays, j-major as
the server balances them), once untimed and then the fastest of 3 runs; the script checks that the
blocked and fused signs and running sums equal the plain loop's.

    python benchmarks/blocked_balance.py          # d = 1e4, 1e5, 1e6; k = 2, 4, 8 (about 1 minute)
    python benchmarks/blocked_balance.py --quick  # d = 1e4, 1e5; k = 2, 4
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from _common import machine_line, markdown_table, parse_sizes, plain_balance

from orderlab.orderings._balance import PARALLEL_MIN_DIM, fused_balance, fused_balance_in_parallel


@numba.njit(nogil=True, fastmath={"reassoc", "contract"})
def blocked_balance(running_sum, arrays, block, chunk):  # pragma: no cover - compiled by numba
    """The sign rule over row j of every array in turn, k = ``block`` vectors per sweep (see the module)."""
    num_arrays, num_rows, dim = len(arrays), arrays[0].shape[0], running_sum.shape[0]
    total = num_arrays * num_rows
    positive = np.empty((num_rows, num_arrays), dtype=np.bool_)
    dots, gram = np.zeros(block), np.zeros((block, block))
    signs = np.zeros(block, dtype=np.float32)
    previous, previous_count, start = 0, 0, 0
    while True:
        count = min(block, total - start)
        dots[:] = 0.0
        gram[:] = 0.0
        for first in range(0, dim, chunk):
            r = running_sum[first : first + chunk]  # slices: indices from 0, so LLVM vectorizes
            for q in range(previous_count):
                t = previous + q
                v = arrays[t % num_arrays][t // num_arrays][first : first + chunk]
                for i in range(len(r)):
                    r[i] += signs[q] * v[i]
            for q in range(count):
                t = start + q
                v = arrays[t % num_arrays][t // num_arrays][first : first + chunk]
                inner = np.float32(0.0)
                for i in range(len(r)):
                    inner += r[i] * v[i]
                dots[q] += inner
                for p in range(q):
                    u = arrays[(start + p) % num_arrays][(start + p) // num_arrays][first : first + chunk]
                    product = np.float32(0.0)
                    for i in range(len(r)):
                        product += u[i] * v[i]
                    gram[q, p] += product
        if count == 0:
            return positive
        for q in range(count):
            inner = dots[q]
            for p in range(q):
                inner += signs[p] * gram[q, p]
            t = start + q
            positive[t // num_arrays, t % num_arrays] = inner < 0.0
            signs[q] = np.float32(1.0) if inner < 0.0 else np.float32(-1.0)
        previous, previous_count, start = start, count, start + count


@numba.njit(nogil=True, fastmath=True)
def read_once(running_sum, arrays):  # pragma: no cover - compiled by numba
    """Every vector of the sequence read once from memory (summed), nothing else: the floor of any
    exact kernel, which must read each vector at least once, so plain ÷ this bounds the speed-up of
    every kernel on this machine. Returns the sum (no signs)."""
    total = np.float32(0.0)
    for array in arrays:
        for j in range(array.shape[0]):
            row = array[j]
            for i in range(row.shape[0]):
                total += row[i]
    return total


def plain_kernel(running_sum: np.ndarray, arrays: tuple[np.ndarray, ...]) -> np.ndarray:
    """``plain_balance`` with its signs, as the kernels return them: bool [k, len(arrays)]."""
    signs = np.empty((len(arrays[0]), len(arrays)), dtype=np.bool_)
    plain_balance(running_sum, arrays, signs)
    return signs


def timed_run(kernel, dim: int, arrays: tuple, repeats: int = 3) -> tuple[float, np.ndarray, np.ndarray]:
    """(the fastest of ``repeats`` timed runs after an untimed one, signs, final running sum)."""
    kernel(np.zeros(dim, np.float32), arrays)
    times = []
    for _ in range(repeats):
        running_sum = np.zeros(dim, np.float32)
        started = time.perf_counter()
        signs = kernel(running_sum, arrays)
        times.append(time.perf_counter() - started)
    return min(times), signs, running_sum


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=parse_sizes, default=parse_sizes("1e4,1e5,1e6"))
    parser.add_argument("--blocks", type=parse_sizes, default=parse_sizes("2,4,8"))
    parser.add_argument(
        "--threads", type=parse_sizes, default=parse_sizes("2"), help="thread counts for the fused kernel"
    )
    parser.add_argument("--chunk", type=int, default=4096, help="coordinates per chunk of a sweep")
    parser.add_argument("--quick", action="store_true", help="d = 1e4, 1e5; k = 2, 4")
    args = parser.parse_args()
    if args.quick:
        args.dims, args.blocks = [d for d in args.dims if d <= 100_000], [k for k in args.blocks if k <= 4]
    print(f"# blocked_balance: {machine_line()}\n")
    pool = np.random.default_rng(0).standard_normal(2**24, dtype=np.float32)  # 64 MiB
    rows = []
    for dim in args.dims:
        per_array = len(pool) // dim // 4
        vectors = pool[: 4 * per_array * dim].reshape(4, per_array, dim)
        vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
        arrays = tuple(np.ascontiguousarray(v) for v in vectors)
        for array in arrays:
            array.flags.writeable = False  # as the server's arrays (Ray's object store, the rings)
        count = 4 * per_array
        plain, plain_signs, plain_sum = timed_run(plain_kernel, dim, arrays)
        fused, signs, running_sum = timed_run(fused_balance, dim, arrays)
        same = np.array_equal(signs, plain_signs) and np.array_equal(running_sum, plain_sum)
        rows.append([f"{dim:.0e}", "plain", f"{1e6 * plain / count:.2f}", "1", "-", "-"])
        rows.append(
            [f"{dim:.0e}", "fused", f"{1e6 * fused / count:.2f}", f"{plain / fused:.2f}", "1", str(same)]
        )
        seconds = timed_run(read_once, dim, arrays)[0]
        rows.append(
            [
                f"{dim:.0e}",
                "one read (the floor)",
                f"{1e6 * seconds / count:.2f}",
                f"{plain / seconds:.2f}",
                f"{fused / seconds:.2f}",
                "-",
            ]
        )
        for threads in args.threads:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            seconds, signs, running_sum = timed_run(fused_balance_in_parallel, dim, arrays)
            same = np.array_equal(signs, plain_signs) and np.array_equal(running_sum, plain_sum)
            rows.append(
                [
                    f"{dim:.0e}",
                    f"fused, {threads} threads"
                    + ("" if dim >= PARALLEL_MIN_DIM else " (the server: 1 below d = 65,536)"),
                    f"{1e6 * seconds / count:.2f}",
                    f"{plain / seconds:.2f}",
                    f"{fused / seconds:.2f}",
                    str(same),
                ]
            )
        for block in args.blocks:
            kernel = lambda r, a, block=block: blocked_balance(r, a, block, args.chunk)  # noqa: E731
            seconds, signs, running_sum = timed_run(kernel, dim, arrays)
            same = np.array_equal(signs, plain_signs) and np.array_equal(running_sum, plain_sum)
            rows.append(
                [
                    f"{dim:.0e}",
                    f"blocked, k = {block}",
                    f"{1e6 * seconds / count:.2f}",
                    f"{plain / seconds:.2f}",
                    f"{fused / seconds:.2f}",
                    str(same),
                ]
            )
    header = ["d", "kernel", "µs/vector", "÷ plain (speed-up)", "÷ fused", "signs and r equal plain's"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
