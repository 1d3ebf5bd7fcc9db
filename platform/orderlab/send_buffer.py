"""What a worker sends its order server, formed once: ``SendBuffer``.

Both backends feed their ordering through it: a Ray Train worker (``orderlab.worker``) sends the
buffered rows to the server, the simulated backend (``orderlab.simulated``) balances them in
process, so the same unit gradients give the same bits on both. This module imports no Ray.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from orderlab.grads import CountSketch
from orderlab.orderings import PairStream
from orderlab.wire import PAYLOAD_DTYPES

#: ``make_room(elements, device)``: make sure the buffer's storage has ``elements`` free elements
MakeRoom = Callable[[int, torch.device], None]


class SendBuffer:
    """A step's ordering inputs for R ranks, written once into flat storage in the payload dtype.

    Per step, ``write(unit_grads [R, k, d] float32)`` forms the pair differences g_first - g_second
    of the pairs completed so far (``message_kind`` ``pair_differences``: pair-balance/cd-grab;
    pairs may straddle steps) or takes the unit gradients (``unit_gradients``: grab), sketches them
    when a sketch is given, and writes them straight into the storage in ``payload_dtype``
    (``torch.sub(..., out=)``: a difference is rounded once, from the exact float32 values). The
    rows accumulate until ``clear``; with R = 1 they are contiguous, ``pending()`` [rows, width].

    Storage: by default a flat tensor that grows (keeping its rows) and is reused after ``clear``.
    A transport may provide its own (a shared-memory ring slot): it sets ``make_room`` and hands
    storage in with ``use_storage``.

    Args:
        message_kind: ``pair_differences`` or ``unit_gradients`` (an ordering's ``message_kind``).
        sketch: the ``CountSketch`` applied before sending (rows become [.., sketch_dim]), or None.
        payload_dtype: ``float32``, ``float16`` or ``bfloat16`` (``ordering.payload_dtype``).

    Raises:
        KeyError: an unknown ``payload_dtype`` (the config validates it first).
    """

    def __init__(
        self, message_kind: str, *, sketch: CountSketch | None = None, payload_dtype: str = "float32"
    ) -> None:
        self.message_kind, self.sketch = message_kind, sketch
        self.payload_dtype = payload_dtype
        self.dtype = PAYLOAD_DTYPES[payload_dtype]
        self.pairs = PairStream()
        self.storage: torch.Tensor | None = None  # flat, in the payload dtype
        self.used = 0  # elements written since the last clear
        self.rows = 0  # rows per rank written since the last clear
        self.width = 0
        self.make_room: MakeRoom = self.grow

    def begin_epoch(self) -> None:
        """Drop an unpaired unit (odd shard size: the last unit pairs with nothing)."""
        self.pairs.reset()

    def write(self, unit_grads: torch.Tensor) -> list[torch.Tensor]:
        """Add one step's unit gradients [R, k, d] float32; return the views of the storage written,
        each [R, p, width] (at most two: a pair that straddles the previous step, then this step's).

        ``unit_grads`` must not be written to afterwards (an unpaired unit is kept as a view).
        """
        if self.message_kind == "pair_differences":
            return [self._write(firsts, seconds) for firsts, seconds in self.pairs.pairs(unit_grads)]
        return [self._write(unit_grads)] if unit_grads.shape[-2] else []

    def pending(self) -> torch.Tensor:
        """The rows written since the last ``clear``, [rows, width] (one rank: R = 1)."""
        assert self.storage is not None or not self.used
        if self.storage is None:
            return torch.empty(0, self.width, dtype=self.dtype)
        return self.storage[: self.used].view(-1, self.width)

    def clear(self) -> None:
        """Forget the rows written (their storage is reused by the next ``write``)."""
        self.used = self.rows = 0

    def use_storage(self, storage: torch.Tensor | None) -> None:
        """Write into ``storage`` (flat, the payload dtype) from its start; None: no storage now."""
        self.storage, self.used, self.rows = storage, 0, 0

    def _write(self, rows: torch.Tensor, subtract: torch.Tensor | None = None) -> torch.Tensor:
        """``rows`` (minus ``subtract``) [R, p, d], sketched, appended to the storage; its view."""
        if self.sketch is not None:
            difference = rows if subtract is None else rows - subtract
            rows = self.sketch(difference.reshape(-1, difference.shape[-1])).view(*difference.shape[:-1], -1)
            subtract = None
        self.width = rows.shape[-1]
        self.make_room(rows.numel(), rows.device)
        assert self.storage is not None  # make_room provides it
        target = self.storage[self.used : self.used + rows.numel()].view(rows.shape)
        if subtract is None:
            target.copy_(rows)
        else:
            torch.sub(rows, subtract, out=target)
        self.used += rows.numel()
        self.rows += rows.shape[-2]
        return target

    def grow(self, elements: int, device: torch.device) -> None:
        """Room for ``elements`` more in storage of this object's own on ``device`` (twice the size
        needed when it grows, keeping the rows written, moved to ``device`` if they were elsewhere)."""
        if (
            self.storage is not None
            and self.storage.device == device
            and self.used + elements <= len(self.storage)
        ):
            return
        grown = torch.empty(2 * (self.used + elements), dtype=self.dtype, device=device)
        if self.storage is not None and self.used:
            grown[: self.used] = self.storage[: self.used]
        self.storage = grown
