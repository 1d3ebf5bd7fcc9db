"""Shared-memory message rings from a worker to its order server on the same node.

A ring is one memory-mapped file (under /dev/shm where it exists) with ``slots`` message slots of
``slot_bytes`` each, written by one worker rank and read by the order server. The worker writes a
message's rows straight into the next free slot and publishes it by advancing a counter; the server
polls the counter, reads the rows in place, and advances another counter once it holds no view of
the slot any more. A payload is so written once, by the worker, and read once, by the server: no
pickling, no object-store copy, and no Ray call per message, which cost 0.35-2 ms of CPU on each
side per message on the 2-core AMD EPYC machine of docs/performance.md (0.5 ms in the actor for a
tiny argument, 1.3 ms more in the caller for 5 MB). The other way, the server writes the worker's next order into the ring's
order area and then its epoch, which the worker polls: 4 concurrent ``begin_epoch`` calls took
3 ms with orders under Ray's 100 KiB inline limit and 8 ms above it.

Layout: a header (int64 [8]: published, released, slots, slot_bytes, data_offset, order_offset,
order_length, order_epoch), per-slot metadata (int64 [slots, 8]: epoch, start, rank, rows, width,
generation, payload format), the order area (int64 [order_length]), then the slots, each starting
on a page, or on a huge page (2 MiB) when a slot is at least that large.

One producer and one consumer per ring: the producer writes a slot before it advances ``published``
and the consumer reads ``published`` before the slot; the consumer is done reading a slot before it
advances ``released``, and the producer reads ``released`` before it writes the slot again; the
server writes an order before its epoch, and the worker reads the epoch before the order. A full
memory barrier (``memory_fence``) separates each such pair: x86-64 keeps stores in program order
anyway, but arm64 (Graviton; Linux containers on Apple silicon) may let another core see
``published`` before the rows.

Doorbell: a named pipe beside the ring file (``<path>.bell``). After each publish the producer
writes one byte to it, so a server that found its rings empty can sleep in its event loop until a
byte arrives (``bell``, for ``loop.add_reader``) instead of polling; the write is a system call, so
the message is visible by the time the byte is. Where the file system has no named pipes, the
server's polling alone picks the messages up.

Huge pages: the server reads every payload from the ring; from 4 KiB pages that took 20-40% longer
than from 2 MiB ones until its kernel prefetched across page boundaries, and still takes up to 11%
longer through the actor (docs/performance.md). Both sides ask for huge pages
(``madvise(MADV_HUGEPAGE)``); the kernel gives them where the ring's file system allows: a tmpfs
mounted with ``-o huge=within_size``, ``always`` or ``advise`` (``ordering.ring_directory``), which
/dev/shm usually is not.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

#: the numpy array each ``payload_dtype`` travels as (``orderlab.server.to_wire``: bfloat16 as its int16 bits)
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.int16),
}
_WIRE_CODES = list(WIRE_DTYPES.values())
_PUBLISHED, _RELEASED, _SLOTS, _SLOT_BYTES, _DATA_OFFSET = range(5)  # the header's words
_ORDER_OFFSET, _ORDER_LENGTH, _ORDER_EPOCH = range(5, 8)
_HEADER_WORDS, _META_WORDS, _PAGE, _HUGE_PAGE = 8, 8, 4096, 2**21
BELL_SUFFIX = ".bell"  # the doorbell's file: the ring's path and this
#: seconds between a worker's checks while it waits, from the first to the last, doubling: for a free
#: slot, and for its order, which ends every epoch and so is checked more often (about 5 µs a check)
SLOT_POLL_SECONDS, ORDER_POLL_SECONDS = (1e-4, 2e-3), (1e-4, 2e-4)
_MADV_POPULATE_WRITE = 23  # linux/mman.h (Linux 5.14); Python's mmap module names it from 3.13 only


@intrinsic
def _fence_ir(typingctx: Any) -> Any:  # pragma: no cover - compiled by numba
    """LLVM's ``fence seq_cst``."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


#: ``_fence_ir`` as jitted code calls it, without the typing context (numba's types describe a call
#: from Python, which raises)
_fence = cast("Callable[[], None]", _fence_ir)


@numba.njit(nogil=True, cache=True)
def memory_fence() -> None:  # pragma: no cover - compiled by numba
    """A full memory barrier (a locked instruction on x86-64, ``dmb ish`` on arm64): this thread's
    loads and stores before it are visible to other cores before any after it. About 0.1 µs a call."""
    _fence()


def default_ring_directory() -> str:
    """Where rings are created by default: /dev/shm (memory, never written to disk) or else the
    temporary directory."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _map(descriptor: int, size: int) -> mmap.mmap:
    """A shared mapping of ``size`` bytes of the file, asking the kernel for huge pages where it has them."""
    memory = mmap.mmap(descriptor, size)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # not Linux, or a kernel without transparent huge pages
        pass
    return memory


def _allocate(memory: mmap.mmap, descriptor: int, size: int) -> None:
    """Allocate the file's memory now, through the mapping (``MADV_POPULATE_WRITE``: in huge pages
    where ``_map`` got them advised), so that a full file system is an OSError here rather than a
    SIGBUS at a later write; ``posix_fallocate`` before Linux 5.14."""
    try:
        memory.madvise(_MADV_POPULATE_WRITE)
    except OSError as error:
        if error.errno != errno.EINVAL:  # EFAULT: a write would have raised SIGBUS (no space)
            raise OSError(errno.ENOSPC, f"no room for a {size}-byte ring") from error
        os.posix_fallocate(descriptor, 0, size)  # Linux < 5.14 (or not Linux): no huge-page advice


class MessageRing:
    """One worker's single-producer, single-consumer ring of message slots in shared memory.

    Use ``MessageRing.create`` on the worker and ``MessageRing.attach(path)`` on the server; once the
    server has attached, the worker may ``unlink`` the file (the mappings stay valid, and the memory
    is freed when both processes have let go of it, also when they crash).

    Attributes:
        path: the file's path. slots: number of slots. slot_bytes: bytes per slot (a multiple of 4096).
        order: int64 [order_length], the order area (length 0: orders come through ``begin_epoch``).
        bell: the doorbell's file descriptor (read end on the server, write end on the worker once
            ``unlink`` has run), or None.
    """

    def __init__(self, path: str, memory: mmap.mmap, bell: int | None = None) -> None:
        self.path, self.memory, self.bell = path, memory, bell
        self.header = np.ndarray((_HEADER_WORDS,), np.int64, memory)
        self.slots, self.slot_bytes = int(self.header[_SLOTS]), int(self.header[_SLOT_BYTES])
        self.meta = np.ndarray((self.slots, _META_WORDS), np.int64, memory, offset=8 * _HEADER_WORDS)
        self.data_offset = int(self.header[_DATA_OFFSET])
        self.order = np.ndarray(
            (int(self.header[_ORDER_LENGTH]),), np.int64, memory, offset=int(self.header[_ORDER_OFFSET])
        )
        self.received = int(self.header[_PUBLISHED])  # consumer side: messages read so far

    @classmethod
    def create(
        cls, slots: int, slot_bytes: int, directory: str | None = None, order_length: int = 0
    ) -> MessageRing:
        """A new ring of ``slots`` slots of at least ``slot_bytes`` bytes in ``directory`` (by default
        ``default_ring_directory()``), with room for an order of ``order_length`` units (the shard size).

        Slots of 2 MiB or more start on, and fill, whole huge pages. The file's memory is allocated
        here (``_allocate``), so a full /dev/shm is an OSError now rather than a SIGBUS at the
        first write.

        Raises:
            OSError: the file cannot be created or allocated (e.g. /dev/shm is full, or ``directory``
                does not exist); nothing is left behind.
        """
        align = _HUGE_PAGE if slot_bytes >= _HUGE_PAGE else _PAGE
        slot_bytes = _round_up(max(slot_bytes, 1), align)
        order_offset = 8 * (_HEADER_WORDS + _META_WORDS * slots)
        data_offset = _round_up(order_offset + 8 * order_length, align)
        size = data_offset + slots * slot_bytes
        descriptor, path = tempfile.mkstemp(
            prefix="orderlab-ring-", dir=directory or default_ring_directory()
        )
        memory = None
        try:
            os.ftruncate(descriptor, size)
            memory = _map(descriptor, size)
            _allocate(memory, descriptor, size)
        except OSError:
            if memory is not None:
                memory.close()
            Path(path).unlink(missing_ok=True)
            raise
        finally:
            os.close(descriptor)
        try:
            os.mkfifo(path + BELL_SUFFIX)
        except OSError:  # no named pipes here: the server polls
            pass
        header = np.ndarray((_HEADER_WORDS,), np.int64, memory)
        header[_SLOTS], header[_SLOT_BYTES], header[_DATA_OFFSET] = slots, slot_bytes, data_offset
        header[_ORDER_OFFSET], header[_ORDER_LENGTH], header[_ORDER_EPOCH] = order_offset, order_length, -1
        return cls(path, memory)

    @classmethod
    def attach(cls, path: str) -> MessageRing:
        """Map an existing ring and open the read end of its doorbell (the server side).

        Raises:
            FileNotFoundError: no ring at ``path`` (it was unlinked, or lives on another node).
        """
        with open(path, "r+b") as file:
            memory = _map(file.fileno(), os.fstat(file.fileno()).st_size)
        try:
            # read and write (Linux, fifo(7)): never at end of file, also once the worker has gone
            bell = os.open(path + BELL_SUFFIX, os.O_RDWR | os.O_NONBLOCK)
        except FileNotFoundError:
            bell = None
        return cls(path, memory, bell)

    def unlink(self) -> None:
        """Open the write end of the doorbell (the server has opened its read end by now), then
        remove the files; both mappings and the doorbell stay valid."""
        try:
            self.bell = os.open(self.path + BELL_SUFFIX, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no doorbell, or no server reading it: the server polls
            self.bell = None
        for path in (self.path, self.path + BELL_SUFFIX):
            Path(path).unlink(missing_ok=True)

    def close(self) -> None:
        """Close the doorbell (the mapping goes with the object)."""
        if self.bell is not None:
            os.close(self.bell)
            self.bell = None

    @property
    def published(self) -> int:
        return int(self.header[_PUBLISHED])

    @property
    def released(self) -> int:
        return int(self.header[_RELEASED])

    def rows_per_slot(self, width: int, dtype: np.dtype) -> int:
        """How many rows of ``width`` coordinates of ``dtype`` one slot holds."""
        return self.slot_bytes // (width * np.dtype(dtype).itemsize)

    # producer side

    def wait_for_slot(self, keep_waiting: Callable[[], None], check_every: float = 1.0) -> float:
        """Wait until a slot is free; return the seconds waited.

        ``keep_waiting`` is called about every ``check_every`` seconds of waiting: it raises to stop
        (the server died or no longer knows this ring).
        """
        waited = self._wait(
            lambda: self.published - self.released < self.slots, keep_waiting, check_every, SLOT_POLL_SECONDS
        )
        memory_fence()  # the server's reads of the freed slot come before this worker's writes to it
        return waited

    def wait_for_order(
        self, epoch: int, keep_waiting: Callable[[], None], check_every: float = 1.0
    ) -> tuple[np.ndarray, float]:
        """Wait until the server has handed out this worker's order for ``epoch`` (``hand_order``);
        return a copy of it (int64 [order_length]) and the seconds waited.

        ``keep_waiting`` as for ``wait_for_slot``.
        """
        waited = self._wait(
            lambda: self.header[_ORDER_EPOCH] == epoch, keep_waiting, check_every, ORDER_POLL_SECONDS
        )
        memory_fence()  # the epoch before the order it marks
        return self.order.copy(), waited

    def slot_array(self, width: int, dtype: np.dtype) -> np.ndarray:
        """The next slot to publish as a writable array [rows_per_slot, width] (call ``wait_for_slot`` first)."""
        rows = self.rows_per_slot(width, dtype)
        offset = self.data_offset + (self.published % self.slots) * self.slot_bytes
        return np.ndarray((rows, width), np.dtype(dtype), self.memory, offset=offset)

    def publish(
        self, epoch: int, start: int, rank: int, rows: int, width: int, dtype: np.dtype, generation: int
    ) -> None:
        """Publish the first ``rows`` rows written to ``slot_array`` as one message."""
        sequence = self.published
        self.meta[sequence % self.slots] = (
            epoch,
            start,
            rank,
            rows,
            width,
            generation,
            _WIRE_CODES.index(np.dtype(dtype)),
            0,
        )
        memory_fence()  # the rows and their metadata before the counter that publishes them
        self.header[_PUBLISHED] = sequence + 1
        if self.bell is not None:
            try:
                os.write(self.bell, b"\0")
            except (BlockingIOError, BrokenPipeError):  # bytes wait unread already, or the server is gone
                pass

    # consumer side

    def receive(self) -> list[tuple[int, int, int, np.ndarray, int]]:
        """Messages published since the last call, in order, as the fields of ``orderlab.server.OrderMessage``
        (epoch, start, rank, items, generation); items [rows, width] are read-only views of the slots,
        valid until ``release`` covers them."""
        messages, published = [], self.published
        if published > self.received:
            memory_fence()  # the counter before the slots it publishes
        for sequence in range(self.received, published):
            slot = sequence % self.slots
            epoch, start, rank, rows, width, generation, code, _ = (int(x) for x in self.meta[slot])
            items = np.ndarray(
                (rows, width),
                _WIRE_CODES[code],
                self.memory,
                offset=self.data_offset + slot * self.slot_bytes,
            )
            items.flags.writeable = False
            messages.append((epoch, start, rank, items, generation))
        self.received = published
        return messages

    def drain_bell(self) -> None:
        """Read every byte waiting in the doorbell (the server, before it checks the ring and sleeps)."""
        if self.bell is None:
            return
        try:
            while os.read(self.bell, 4096):
                pass
        except BlockingIOError:
            pass

    def release(self, count: int) -> None:
        """Hand the ``count`` oldest received, unreleased slots back to the producer."""
        memory_fence()  # done reading the slots before the producer may see them free
        self.header[_RELEASED] = self.released + count

    def hand_order(self, epoch: int, order: np.ndarray) -> None:
        """Write the worker's order for ``epoch`` (int64 [order_length]), then its epoch, which the worker polls."""
        self.order[:] = order
        memory_fence()  # the order before the epoch that marks it
        self.header[_ORDER_EPOCH] = epoch

    @staticmethod
    def _wait(
        ready: Callable[[], bool],
        keep_waiting: Callable[[], None],
        check_every: float,
        pauses: tuple[float, float],
    ) -> float:
        started = checked = time.perf_counter()
        pause = pauses[0]
        while not ready():
            time.sleep(pause)
            pause = min(2 * pause, pauses[1])
            now = time.perf_counter()
            if now - checked >= check_every:
                keep_waiting()
                checked = now
        return time.perf_counter() - started


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
