"""Helpers shared by the orderings: seeded permutations, the sign rule, the L/R slot writer, pairing.

The sign rule and slot writer live here once; grab, pair-balance and cd-grab call them
(docs/orderings.md, "Balancing sign" and "PairBalance").
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from types import FunctionType
from typing import Any, cast

import numba
import numpy as np
import torch
from filelock import FileLock
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from orderlab.orderings.spec import OrderingSpec
from orderlab.seeding import BALANCE, ORDER, rng_for


def random_permutation(shard_size: int, seed: int, rank: int, epoch: int) -> torch.Tensor:
    """The seeded permutation of ``0..shard_size-1`` for (seed, rank, epoch): LongTensor [shard_size]."""
    return torch.randperm(shard_size, generator=rng_for(seed, rank, epoch, ORDER))


def first_epoch_orders(num_workers: int, shard_size: int, seed: int, first_epoch: str) -> torch.Tensor:
    """Epoch 0's orders: identity, or a seeded permutation per worker. LongTensor [num_workers, shard_size]."""
    if first_epoch == "identity":
        return torch.arange(shard_size).repeat(num_workers, 1)
    return torch.stack([random_permutation(shard_size, seed, w, 0) for w in range(num_workers)])


class SignRule:
    """The balancing sign ε for a running sum r and a vector v (docs/orderings.md).

    Deterministic: ε = +1 iff <r, v> < 0 (a tie gives -1). Probabilistic (self-balancing walk):
    ε = +1 with probability clip(1/2 - <r, v> / (2c), 0, 1), one uniform draw per decision from
    ``rng_for(seed, rank, epoch, BALANCE)``, where ``rank`` is the running sum's index (0 for the
    one shared sum of cd-grab, the worker's rank for per-worker sums).

    Args:
        threads: threads each pass of the deterministic rule's kernel runs on when d >=
            ``PARALLEL_MIN_DIM`` (capped at numba's ``NUMBA_NUM_THREADS``; the signs and sums do
            not depend on it).
    """

    def __init__(self, *, balance: str, balance_c: float, seed: int, num_sums: int, threads: int = 1) -> None:
        # numba.config sets its settings through globals(), which a type checker cannot see
        self.threads = min(threads, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        self.probabilistic = balance == "probabilistic"
        self.balance_c = balance_c
        self.seed = seed
        self.generators = [torch.Generator() for _ in range(num_sums)]

    def begin_epoch(self, epoch: int) -> None:
        """Reseed the generators for the balancing that happens during ``epoch``."""
        self.generators = [rng_for(self.seed, s, epoch, BALANCE) for s in range(len(self.generators))]

    def positive(self, inner: float, sum_index: int) -> bool:
        """True iff ε = +1, given the inner product <r, v> of running sum ``sum_index`` and the vector."""
        if not self.probabilistic:
            return inner < 0.0  # orderings.md: strict; the tie at r = 0 gives ε = -1
        p = min(max(0.5 - inner / (2.0 * self.balance_c), 0.0), 1.0)
        return float(torch.rand((), generator=self.generators[sum_index])) < p

    def balance(self, running_sum: np.ndarray, vector: np.ndarray, sum_index: int) -> bool:
        """One balancing step on float32 arrays [d]: decide ε, then r += ε v in place; return ε = +1.

        Two passes over memory, as the plain rule: the inner product, then the in-place update.
        """
        positive = self.positive(float(running_sum @ vector), sum_index)
        if positive:
            running_sum += vector
        else:
            running_sum -= vector
        return positive

    def balance_rows(
        self, running_sum: np.ndarray, arrays: Sequence[np.ndarray], sum_index: int
    ) -> np.ndarray:
        """Balance row j of every array in turn, j-major (``arrays[0][0], arrays[1][0], ..., arrays[0][1]``).

        Args:
            running_sum: float32 [d], updated in place. arrays: C-contiguous float32 [k, d] each.
            sum_index: which running sum this is (selects the probabilistic rule's generator).

        Returns:
            bool [k, len(arrays)]: ε = +1 per vector. The same signs and the same running sum as
            ``balance`` on each vector in that sequence, up to the inner product's rounding: the
            deterministic rule runs ``fused_balance``, one pass over r per two vectors.
        """
        if not self.probabilistic:
            if self.threads > 1 and len(running_sum) >= PARALLEL_MIN_DIM:
                numba.set_num_threads(self.threads)  # numba's count is per calling thread
                return fused_balance_in_parallel(running_sum, tuple(arrays))
            return _fused_balance_cached(running_sum, tuple(arrays))
        arrays = [widen(array) for array in arrays]
        positive = np.empty((len(arrays[0]), len(arrays)), dtype=np.bool_)
        for j in range(len(arrays[0])):
            for a, array in enumerate(arrays):
                positive[j, a] = self.balance(running_sum, array[j], sum_index)
        return positive

    def state_dict(self) -> dict[str, Any]:
        return {"generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for g, s in zip(self.generators, state["generators"], strict=True):
            g.set_state(s)


@intrinsic
def _to_float32_ir(typingctx: Any, value: Any) -> Any:  # pragma: no cover - compiled by numba
    """One item coordinate as float32: float32 as is, uint16 as float16 bits, int16 as bfloat16 bits."""
    if value not in (types.float32, types.uint16, types.int16):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        (bits,) = args
        if value == types.float32:
            return bits
        if value == types.uint16:  # IEEE half: LLVM's fpext, vcvtph2ps where the CPU has F16C
            return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())
        widened = builder.shl(builder.zext(bits, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(widened, ir.FloatType())  # bfloat16 is the top half of a float32

    return types.float32(value), codegen


#: the intrinsics as jitted code calls them, without the typing context (numba's types describe a
#: call from Python, which raises)
_to_float32 = cast("Callable[[Any], np.float32]", _to_float32_ir)


@intrinsic
def _prefetch_ir(typingctx: Any, array: Any, index: Any) -> Any:  # pragma: no cover - compiled by numba
    """Ask the CPU to bring the cache line of ``array[index]`` into all cache levels (``llvm.prefetch``:
    a hint, no fault and no effect on results, also past the end of a mapping)."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        int32 = ir.IntType(32)
        prefetch = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [address.type, int32, int32, int32])
        )
        # read (0), highest locality (3), data cache (1)
        builder.call(prefetch, [address, int32(0), int32(3), int32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


_prefetch = cast("Callable[[np.ndarray, int], None]", _prefetch_ir)


@numba.njit(inline="always")
def _vector(arrays: tuple[np.ndarray, ...], index: int) -> np.ndarray:  # pragma: no cover
    """Vector ``index`` of the j-major sequence: row index // len(arrays) of array index % len(arrays)."""
    return arrays[index % len(arrays)][index // len(arrays)]


#: coordinates per chunk of a sweep over r: inner products accumulate in float32 within a chunk
#: (vectorised, 8 lanes) and in float64 across chunks, in chunk order whatever the thread count;
#: 16,384 float32 coordinates of the five vectors of a sweep (320 KiB) stay in a core's L2 cache
CHUNK = 16_384

#: coordinates per page-sized step of a chunk's loop (4 KiB of float32), and how far ahead of it the
#: next vectors' lines are prefetched (16 KiB of float32: 4 pages). The hardware prefetcher stops at
#: every 4 KiB page; on rings in /dev/shm (4 KiB pages) the kernel read its payloads 20-40% slower
#: than from huge pages without this (README, "Performance"), and about as fast with it.
PAGE_STEP, PREFETCH_AHEAD = 1024, 4096

#: the smallest d that ``SignRule.balance_rows`` balances on several threads (``SignRule``'s threads);
#: below it a sweep is too short to pay for waking them (benchmarks/blocked_balance.py: 0.8× at 1e4)
PARALLEL_MIN_DIM = 4 * CHUNK


@numba.njit(nogil=True, fastmath={"reassoc", "contract"})
def _sweep_chunk(r, adds, a, sign_a, b, sign_b, c, d, first, parts, chunk):  # pragma: no cover
    """One chunk of a sweep, coordinates [first, first + CHUNK): r += ε_a a then ε_b b (the first
    ``adds`` of the two), then the chunk's <r, c>, <r, d>, <c, d> as float32 sums into ``parts[chunk]``.

    The chunk runs in steps of ``PAGE_STEP`` coordinates; each step first prefetches the vectors'
    line ``PREFETCH_AHEAD`` coordinates on (a and b only when they are added)."""
    dim = r.shape[0]
    last = min(first + CHUNK, dim)
    inner_c = inner_d = gram = np.float32(0.0)
    for start in range(first, last, PAGE_STEP):
        ahead = start + PREFETCH_AHEAD
        if ahead < dim:
            _prefetch(c, ahead)
            _prefetch(d, ahead)
            if adds > 0:
                _prefetch(a, ahead)
                _prefetch(b, ahead)
        end = min(start + PAGE_STEP, last)
        # slices: indices from 0, so LLVM vectorizes
        r_step, a_step, b_step = r[start:end], a[start:end], b[start:end]
        c_step, d_step = c[start:end], d[start:end]
        for i in range(end - start):
            updated = r_step[i]
            if adds > 0:  # loop-invariant: LLVM unswitches the loop
                updated += sign_a * _to_float32(a_step[i])
                if adds > 1:
                    updated += sign_b * _to_float32(b_step[i])
                r_step[i] = updated
            x, y = _to_float32(c_step[i]), _to_float32(d_step[i])
            inner_c += updated * x
            inner_d += updated * y
            gram += x * y
    parts[chunk, 0], parts[chunk, 1], parts[chunk, 2] = inner_c, inner_d, gram


@numba.njit(nogil=True)
def _sweep(r, adds, a, sign_a, b, sign_b, c, d, parts):  # pragma: no cover
    """One pass over r, chunk by chunk (``_sweep_chunk``)."""
    for chunk in range(parts.shape[0]):
        _sweep_chunk(r, adds, a, sign_a, b, sign_b, c, d, chunk * CHUNK, parts, chunk)


@numba.njit(nogil=True, parallel=True)
def _sweep_in_parallel(r, adds, a, sign_a, b, sign_b, c, d, parts):  # pragma: no cover
    """One pass over r, its chunks split over numba's threads."""
    for chunk in numba.prange(parts.shape[0]):
        _sweep_chunk(r, adds, a, sign_a, b, sign_b, c, d, chunk * CHUNK, parts, chunk)


@numba.njit(nogil=True, cache=True)
def fused_balance(running_sum: np.ndarray, arrays: tuple[np.ndarray, ...]) -> np.ndarray:  # pragma: no cover
    """The deterministic sign rule over a sequence of vectors, two vectors per pass over memory.

    The sequence is row j of every array in turn, j-major. Each pass adds the two vectors just
    decided, ε_a v_a then ε_b v_b, to r, and in the same loop takes the inner products of the new r
    with the next two vectors v_c, v_d and <v_c, v_d>. Then ε_c follows from <r, v_c> and ε_d from
    <r + ε_c v_c, v_d> = <r, v_d> + ε_c <v_c, v_d>, on scalars. So r is read and written once per two
    vectors (the plain rule: twice per vector), each vector is read twice (its inner product, its
    update), and float16/bfloat16 payloads are widened in registers, never copied. r stays float32
    and gets exactly the plain rule's sums (each coordinate adds ε_a v_a, then ε_b v_b). The inner
    products accumulate in float32 within chunks of ``CHUNK`` coordinates (as BLAS's ``sdot``, the
    plain rule's) and in float64 across chunks, in chunk order, so the signs do not depend on
    the thread count. ``fused_balance_in_parallel`` splits each pass's chunks over numba's threads
    (``numba.set_num_threads``; r is sharded by coordinates, and the signs are still decided one
    pass at a time). Compiled by numba on first use (``fused_balance`` is cached on disk).
    ``benchmarks/blocked_balance.py`` measures larger blocks (the Gram matrix of k vectors per
    pass), which lose on the 2-core CPU of docs/performance.md.

    Args:
        running_sum: float32 [d], updated in place.
        arrays: C-contiguous [k, d] each, all float32, or all uint16 (float16 bits), or all int16
            (bfloat16 bits) — the order server's wire formats, see ``rank_arrays``.

    Returns:
        bool [k, len(arrays)]: True where ε = +1, i.e. <r, v> < 0 (docs/orderings.md; a tie gives -1).
    """
    num_arrays, num_rows, dim = len(arrays), arrays[0].shape[0], running_sum.shape[0]
    total = num_arrays * num_rows
    positive = np.empty((num_rows, num_arrays), dtype=np.bool_)
    if total == 0:
        return positive
    parts = np.empty((-(-dim // CHUNK), 3), dtype=np.float32)
    a = b = _vector(arrays, 0)
    sign_a = sign_b = np.float32(0.0)
    adds = 0  # how many of a, b the next pass adds to r: the vectors decided last
    decided = 0
    while True:
        remaining = total - decided
        c = _vector(arrays, decided) if remaining > 0 else a  # the last pass only adds: c, d unused
        d = _vector(arrays, decided + 1) if remaining > 1 else c
        _sweep(running_sum, adds, a, sign_a, b, sign_b, c, d, parts)  # or _sweep_in_parallel, see below
        inner_c, inner_d, gram = 0.0, 0.0, 0.0  # the chunks' float32 sums, in chunk order
        for chunk in range(len(parts)):
            inner_c += parts[chunk, 0]
            inner_d += parts[chunk, 1]
            gram += parts[chunk, 2]
        if remaining == 0:
            return positive
        positive[decided // num_arrays, decided % num_arrays] = inner_c < 0.0
        sign_a = np.float32(1.0) if inner_c < 0.0 else np.float32(-1.0)
        a, adds = c, 1
        if remaining > 1:
            inner_d += np.float64(sign_a) * gram  # <r + ε_c v_c, v_d>
            positive[(decided + 1) // num_arrays, (decided + 1) % num_arrays] = inner_d < 0.0
            sign_b = np.float32(1.0) if inner_d < 0.0 else np.float32(-1.0)
            b, adds = d, 2
        decided += adds


def _seeing(function: Any, **names: Any) -> FunctionType:
    """A copy of the Python function ``function`` that sees ``names`` in place of its module's."""
    return FunctionType(
        function.__code__, {**function.__globals__, **names}, function.__name__, function.__defaults__
    )


#: ``fused_balance`` with each pass split over numba's threads (``_sweep_in_parallel``). Never cached
#: on disk: numba's cache loads code that calls parallel code wrongly (numba issues #8578, #10128:
#: segmentation faults), and a closure would not do either (numba keys a closure's cache entries by
#: its pickled cells, which differ in every process, so it would compile and save in every process).
fused_balance_in_parallel = numba.njit(nogil=True)(_seeing(fused_balance.py_func, _sweep=_sweep_in_parallel))


#: the argument types of ``fused_balance`` this process has compiled or loaded from numba's disk cache,
#: as what numba types them by (``numba.typeof`` itself costs 30 µs per call)
_kernel_types: set[Any] = set()


def _fused_balance_cached(running_sum: np.ndarray, arrays: tuple[np.ndarray, ...]) -> np.ndarray:
    """``fused_balance``, holding a lock across this user's processes on the first call per argument
    types. numba's disk cache is not safe when processes compile different types of one function at
    once: both can pick the same free file name, and a later load runs the other type's machine code
    (a segmentation fault). Order servers and workers of a sweep start together, hence the lock."""
    key = tuple(  # what numba's type of the tuple depends on
        (a.dtype, a.ndim, a.flags.c_contiguous, a.flags.writeable, a.flags.aligned) for a in arrays
    )
    if key in _kernel_types:
        return fused_balance(running_sum, arrays)
    with FileLock(os.path.join(tempfile.gettempdir(), f"orderlab-numba-cache-{os.getuid()}.lock")):
        positive = fused_balance(running_sum, arrays)
    _kernel_types.add(key)
    return positive


class NextOrder:
    """The orders being built for the next epoch, with each worker's free left/right slots L and R.

    Attributes:
        slots: int64 [num_workers, shard_size], the units placed so far; free slots hold -1.
        left, right: each worker's L and R (Python ints: the per-unit loop of grab reads them).
    """

    def __init__(self, num_workers: int, shard_size: int) -> None:
        self.slots = np.full((num_workers, shard_size), -1, dtype=np.int64)
        self.left = [0] * num_workers
        self.right = [shard_size - 1] * num_workers

    def place_unit(self, worker: int, unit: int, positive: bool) -> None:
        """MeanBalance: ε=+1 puts ``unit`` at L (L += 1), ε=-1 at R (R -= 1)."""
        if positive:
            self.slots[worker, self.left[worker]] = unit
            self.left[worker] += 1
        else:
            self.slots[worker, self.right[worker]] = unit
            self.right[worker] -= 1

    def place_pairs(self, firsts: np.ndarray, seconds: np.ndarray, positive: np.ndarray) -> None:
        """PairBalance for the next k pairs of every worker, in order: for each pair, ε=+1 puts (first
        at L, second at R), ε=-1 the reverse; then L += 1, R -= 1.

        Args:
            firsts, seconds: int64 [num_workers, k], the units of each pair. positive: bool
                [num_workers, k], ε = +1.
        """
        lefts, rights = np.where(positive, firsts, seconds), np.where(positive, seconds, firsts)
        count = firsts.shape[1]
        for worker, (slots, left, right) in enumerate(zip(self.slots, self.left, self.right, strict=True)):
            slots[left : left + count] = lefts[worker]
            slots[right - count + 1 : right + 1] = rights[worker, ::-1]  # R, R - 1, ...
            self.left[worker], self.right[worker] = left + count, right - count

    def place_middle(self, worker: int, unit: int) -> None:
        """Odd shard size: the epoch's last unit takes the middle slot (L = R)."""
        assert self.left[worker] == self.right[worker], "the middle slot is placed last"
        self.slots[worker, self.left[worker]] = unit
        self.left[worker] += 1

    def is_complete(self) -> bool:
        return all(left > right for left, right in zip(self.left, self.right, strict=True))

    def as_tensor(self) -> torch.Tensor:
        """The orders: a copy as LongTensor [num_workers, shard_size]; unfilled slots hold -1."""
        return torch.from_numpy(self.slots.copy())

    def state_dict(self) -> dict[str, Any]:
        return {"slots": self.as_tensor(), "left": list(self.left), "right": list(self.right)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.slots = state["slots"].numpy().copy()
        self.left = list(state["left"])
        self.right = list(state["right"])


class BalancingEpochs:
    """The epoch bookkeeping that grab, pair-balance and cd-grab share.

    Holds the epoch's orders (and ``visit``, a numpy view of them for the balancing loops), the
    orders being built for the next epoch, the running sums [num_sums, dim] float32, the sign rule,
    and how many items of the epoch have been balanced. ``device`` is None while the CPU kernel
    (``fused_balance``) balances; after ``to(device)`` the running sums live on that device and
    ``_torch_balance`` balances there.
    """

    def __init__(self, name: str, spec: OrderingSpec, *, num_sums: int, items_per_epoch: int) -> None:
        self.name, self.num_workers, self.shard_size = name, spec.num_workers, spec.shard_size
        self.seed, self.first_epoch, self.items_per_epoch = spec.seed, spec.first_epoch, items_per_epoch
        self.sign = SignRule(
            balance=spec.balance,
            balance_c=spec.balance_c,
            seed=spec.seed,
            num_sums=num_sums,
            threads=spec.threads,
        )
        self.running_sum = torch.zeros(num_sums, spec.dim, dtype=torch.float32)
        self.device: torch.device | None = None
        self.epoch = -1
        self.orders = torch.empty(spec.num_workers, 0, dtype=torch.long)
        self.visit = self.orders.numpy()
        self.next = NextOrder(spec.num_workers, spec.shard_size)
        self.done = 0  # items balanced this epoch

    def advance(self, complete: bool) -> torch.Tensor:
        """Start the next epoch: epoch 0's first orders, then the orders built from the last epoch.

        Raises:
            RuntimeError: ``complete`` is False: the epoch's units have not all been observed.
        """
        if self.epoch < 0:
            self.orders = first_epoch_orders(self.num_workers, self.shard_size, self.seed, self.first_epoch)
        else:
            if not complete:
                raise RuntimeError(
                    f"{self.name}: epoch {self.epoch} balanced {self.done} of {self.items_per_epoch} items; "
                    "every unit must be seen before the next order exists"
                )
            self.orders = self.next.as_tensor()
        self.epoch += 1
        self.visit = self.orders.numpy()
        self.running_sum.zero_()
        self.next = NextOrder(self.num_workers, self.shard_size)
        self.done = 0
        self.sign.begin_epoch(self.epoch)
        return self.orders.clone()

    def to(self, device: torch.device | str) -> None:
        """Balance on ``device`` from now on with ``_torch_balance`` ("cpu" runs it on the CPU too)."""
        self.device = torch.device(device)
        self.running_sum = self.running_sum.to(self.device)

    def check_room(self, count: int, what: str) -> None:
        """Raise ValueError when ``count`` more items would exceed the epoch's."""
        if self.done + count > self.items_per_epoch:
            raise ValueError(
                f"{self.name}: {self.done} + {count} {what} exceed the epoch's {self.items_per_epoch}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "epoch": self.epoch,
            "orders": self.orders.clone(),
            "running_sum": self.running_sum.to("cpu", copy=True),
            "next": self.next.state_dict(),
            "done": self.done,
            "sign": self.sign.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.orders = state["orders"].clone()
        self.visit = self.orders.numpy()
        self.running_sum = state["running_sum"].to(self.device or "cpu", copy=True)
        self.next.load_state_dict(state["next"])
        self.done = int(state["done"])
        self.sign.load_state_dict(state["sign"])


Items = torch.Tensor | Sequence[np.ndarray | torch.Tensor]


def _as_rows(item: np.ndarray | torch.Tensor) -> np.ndarray:
    """One worker's items as a C-contiguous array: float32, uint16 (float16 bits) or int16 (bfloat16 bits)."""
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu()
        if item.dtype == torch.bfloat16:
            item = item.view(torch.int16)
        elif item.dtype != torch.float16:
            item = item.to(torch.float32)
        item = item.contiguous().numpy()
    if item.dtype == np.float16:
        return np.ascontiguousarray(item).view(np.uint16)
    if item.dtype in (np.uint16, np.int16):
        return np.ascontiguousarray(item)
    return np.ascontiguousarray(item, dtype=np.float32)


def widen(rows: np.ndarray) -> np.ndarray:
    """Rows in a wire or ``rank_arrays`` format as float32 (a copy unless they are float32 already):
    float16, uint16 (float16 bits), int16 (bfloat16 bits)."""
    if rows.dtype == np.float16:
        return rows.astype(np.float32)
    if rows.dtype == np.uint16:
        return rows.view(np.float16).astype(np.float32)
    if rows.dtype == np.int16:
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return rows


def rank_arrays(
    items: Items, num_workers: int, dim: int, what: str, float32: bool = False
) -> list[np.ndarray]:
    """Every worker's items as a C-contiguous numpy array [k, dim], without copies where possible.

    Args:
        items: a tensor [num_workers, k, dim], or one array or tensor [k, dim] per worker (what the
            order server holds, so no stacking copy is made). float32 stays float32; float16 comes
            back as its uint16 bits and bfloat16 (a torch tensor, or int16 bits: the wire format)
            as int16 bits, which ``fused_balance`` widens in registers; other dtypes become float32.
        float32: widen everything to float32 (for code that does numpy arithmetic on the rows).

    Raises:
        ValueError: not num_workers items, or an item not [k, dim] with the same k for all.
    """
    if len(items) != num_workers or isinstance(items, torch.Tensor) and items.ndim != 3:
        shape = tuple(items.shape) if isinstance(items, torch.Tensor) else f"{len(items)} items"
        raise ValueError(f"{what} must have shape [num_workers={num_workers}, k, dim={dim}], got {shape}")
    arrays = [_as_rows(item) for item in items]
    if any(a.ndim != 2 or a.shape != arrays[0].shape or a.shape[1] != dim for a in arrays):
        shapes = sorted({a.shape for a in arrays})
        raise ValueError(f"{what} must be [k, dim={dim}] per worker with one k for all, got {shapes}")
    if float32 or len({a.dtype for a in arrays}) > 1:
        arrays = [widen(a) for a in arrays]
    return [_read_only(a) for a in arrays]


def _read_only(array: np.ndarray) -> np.ndarray:
    """A read-only view: arrays from Ray's object store are read-only, and numba types a tuple of
    read-only and writable arrays as mixed, which it cannot index in a loop."""
    view = array.view()
    view.flags.writeable = False
    return view


class PairStream:
    """Turns a stream of unit gradients, in visiting order, into pair differences v = g_first - g_second.

    Pairs may straddle ``push`` calls (and so training steps): an unpaired unit is kept until its
    partner arrives, as a view of the tensor it came in, so callers must not write to pushed
    tensors afterwards. Used by ``pair-balance``/``cd-grab``'s ``observe`` and by workers, which send
    differences instead of gradients to halve the traffic.
    """

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None  # [..., d]: first unit of an open pair

    def pairs(self, grads: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Add ``grads`` [..., k, d]; return the completed pairs as (firsts, seconds) views [..., p, d].

        At most two blocks: the pair that straddles the previous call, then this call's pairs. No
        copies are made, so the caller can difference straight into a buffer of its own.
        """
        blocks = []
        if self.pending is not None and grads.shape[-2] > 0:
            blocks.append((self.pending.unsqueeze(-2), grads[..., :1, :]))
            grads, self.pending = grads[..., 1:, :], None
        num_paired = grads.shape[-2] - grads.shape[-2] % 2
        if num_paired:
            blocks.append((grads[..., 0:num_paired:2, :], grads[..., 1:num_paired:2, :]))
        if grads.shape[-2] % 2:
            self.pending = grads[..., -1, :]
        return blocks

    def push(self, grads: torch.Tensor) -> torch.Tensor:
        """Add ``grads`` [..., k, d]; return the completed pairs' differences [..., p, d]."""
        blocks = self.pairs(grads)
        if not blocks:
            return grads[..., :0, :]
        return torch.cat([firsts - seconds for firsts, seconds in blocks], dim=-2)

    def reset(self) -> None:
        """Drop an unpaired unit (odd shard size: the last unit pairs with nothing)."""
        self.pending = None
