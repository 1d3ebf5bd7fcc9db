"""PairBalance (``pair-balance``, ID-GraB) and coordinated PairBalance (``cd-grab``, CD-GraB).

Sources: Lu et al., "GraB: Finding Provably Better Data Permutations than Random Reshuffling",
NeurIPS 2022 (PairBalance, Alg. 5); Cooper et al., "CD-GraB: Coordinating Distributed Example
Orders for Provably Accelerated Training", NeurIPS 2023 (Alg. 1). Rules: docs/orderings.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from orderlab.orderings import MessageKind, register_ordering
from orderlab.orderings._balance import BalancingEpochs, Items, PairStream, rank_arrays
from orderlab.orderings._torch_balance import balance_pairs, device_rows, items_device
from orderlab.orderings.spec import OrderingSpec


def _unit_tensor(grads: Items, num_workers: int, dim: int, device: torch.device | None) -> torch.Tensor:
    """``grads`` as a float32 tensor [num_workers, k, dim] on ``device`` (None: the CPU):
    ``grads`` itself (detached) when it is one, else a float32 copy.

    Raises:
        ValueError: wrong shape (from ``rank_arrays``).
    """
    if (
        isinstance(grads, torch.Tensor)
        and grads.dtype == torch.float32
        and grads.device == (device or torch.device("cpu"))
        and grads.ndim == 3
        and grads.shape[0] == num_workers
        and grads.shape[2] == dim
    ):
        return grads.detach()
    if device is not None:
        return device_rows(grads, num_workers, dim, "grads", device).to(torch.float32)
    return torch.from_numpy(np.stack(rank_arrays(grads, num_workers, dim, "grads", float32=True)))


@register_ordering("pair-balance")
class PairBalance:
    """Pairs units in visiting order and balances each pair difference v = g_first - g_second.

    With ``coordinated=False`` every worker keeps its own running sum (ID-GraB's PairBalance).
    With ``coordinated=True`` one running sum r is shared by all workers and pairs are applied
    pair-major, rank-minor: for p = 0, 1, ... and w = 0..W-1 (CD-GraB). Both write pair p of
    worker w to that worker's slots L = p and R = n-1-p. With odd n the last unit of every
    worker takes its middle slot.

    Args:
        spec: W, n units per worker, d, the seed, the first epoch's rule and the sign rule.
    """

    name = "pair-balance"
    coordinated = False
    needs_gradients = True
    message_kind: MessageKind = "pair_differences"

    def __init__(self, spec: OrderingSpec) -> None:
        num_workers, shard_size, dim = spec.num_workers, spec.shard_size, spec.dim
        self.num_workers, self.shard_size, self.dim = num_workers, shard_size, dim
        self.items_per_epoch = shard_size // 2
        self.state = BalancingEpochs(
            self.name,
            spec,
            num_sums=1 if self.coordinated else num_workers,
            items_per_epoch=self.items_per_epoch,
        )
        self.units_seen = 0  # units given to observe(); 0 when the epoch is fed through observe_items
        self.stream = PairStream()
        #: observe's pair differences, [num_workers, capacity, dim] float32, grown to a call's pairs
        self.pair_buffer = torch.empty(num_workers, 0, dim, dtype=torch.float32)

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def balance_on(self, device: torch.device | str) -> None:
        """Keep the running sums on ``device`` and balance there (``_torch_balance``; "cpu" runs
        that kernel on the CPU). Items given on a GPU move them to it by themselves."""
        self.state.to(device)
        self.pair_buffer = self.pair_buffer.to(device)

    def _follow(self, items: Items) -> None:
        device = items_device(items)
        if device is not None and self.state.device is None:
            self.balance_on(device)

    def begin_epoch(self) -> torch.Tensor:
        """Advance to the next epoch; return its orders, LongTensor [num_workers, shard_size].

        Raises:
            RuntimeError: the current epoch's units have not all been observed.
        """
        complete = self.state.done == self.items_per_epoch and self.units_seen in (0, self.shard_size)
        orders = self.state.advance(complete)
        self.units_seen = 0
        self.stream.reset()
        self._place_middle_if_done()
        return orders

    def observe(self, grads: Items) -> None:
        """Balance the next k units of every worker, in visiting order.

        Each pair difference is formed once, into a float32 buffer this object keeps and reuses; a
        float32 CPU tensor is read in place, never copied or written to. A pair may straddle two
        calls: its first unit is kept as a view of ``grads`` (as ``PairStream`` does), so ``grads``
        must not be written to before the next call.

        Args:
            grads: [num_workers, k, dim] float32 (read in place), or any other ``rank_arrays``
                input (one [k, dim] per worker, other dtypes or devices: copied to float32). On a
                GPU, the running sums move there (``balance_on``). The epoch's last unit of an
                odd-sized shard pairs with nothing: it must be observed, but only takes the middle
                slot.

        Raises:
            ValueError: wrong shape, or more units than the shard has.
        """
        self._follow(grads)
        units = _unit_tensor(grads, self.num_workers, self.dim, self.state.device)
        num_units = units.shape[1]
        if self.units_seen + num_units > self.shard_size:
            raise ValueError(
                f"{self.name}: {self.units_seen} + {num_units} units exceed the shard's {self.shard_size}"
            )
        self.units_seen += num_units
        blocks = self.stream.pairs(units)  # views: the pair straddling the last call, then this call's
        num_pairs = sum(firsts.shape[1] for firsts, _ in blocks)
        if num_pairs == 0:
            return
        if self.pair_buffer.shape[1] < num_pairs:
            self.pair_buffer = torch.empty(
                self.num_workers, num_pairs, self.dim, dtype=torch.float32, device=units.device
            )
        differences, start = self.pair_buffer[:, :num_pairs], 0  # worker w's rows: contiguous [p, d]
        for firsts, seconds in blocks:
            torch.sub(firsts, seconds, out=differences[:, start : start + firsts.shape[1]])
            start += firsts.shape[1]
        # One call for both blocks, as the sequence is one: fused_balance decides two vectors per
        # pass over r, taking <r + ε_c v_c, v_d> as <r, v_d> + ε_c <v_c, v_d>, so where calls split
        # the sequence moves the passes' boundaries and the inner products' rounding (near-ties).
        self.observe_items(differences)

    def observe_items(self, pair_differences: Items) -> None:
        """Balance the next p pairs of every worker.

        Args:
            pair_differences: [num_workers, p, dim], or one [p, dim] per worker (see
                ``rank_arrays``), any float dtype (float16/bfloat16 payloads are widened; the
                running sum stays float32): v = g(position 2q) - g(position 2q+1) for the epoch's
                next pair indices q. On a GPU, the running sums move there (``balance_on``).

        Raises:
            ValueError: wrong shape, or more pairs than the epoch has.
        """
        self._follow(pair_differences)
        state = self.state
        if state.device is not None:
            rows = device_rows(pair_differences, self.num_workers, self.dim, "pair_differences", state.device)
            state.check_room(rows.shape[1], "pairs")
            self._place(rows.shape[1], balance_pairs(state, rows, self.coordinated))
            return
        diffs = rank_arrays(pair_differences, self.num_workers, self.dim, "pair_differences")
        num_pairs = len(diffs[0])
        state.check_room(num_pairs, "pairs")
        running_sums, balance_rows = state.running_sum.numpy(), state.sign.balance_rows
        if self.coordinated:  # orderings.md: one sum, pair-major, rank-minor
            positive = balance_rows(running_sums[0], diffs, 0)
        else:  # independent sums: each worker's pairs in order
            positive = np.concatenate(
                [balance_rows(running_sums[w], [diffs[w]], w) for w in range(len(diffs))], 1
            )
        self._place(num_pairs, positive)

    def _place(self, num_pairs: int, positive: np.ndarray) -> None:
        """Place the next ``num_pairs`` pairs of every worker by their signs, bool [num_pairs, W]."""
        state = self.state
        units = state.orders.numpy()[:, 2 * state.done : 2 * (state.done + num_pairs)]  # [W, 2 × pairs]
        state.next.place_pairs(units[:, 0::2], units[:, 1::2], positive.T)
        state.done += num_pairs
        self._place_middle_if_done()

    def _place_middle_if_done(self) -> None:
        state = self.state
        if self.shard_size % 2 and state.done == self.items_per_epoch and not state.next.is_complete():
            for w in range(self.num_workers):
                state.next.place_middle(w, state.visit[w][self.shard_size - 1])

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.state.state_dict(),
            "units_seen": self.units_seen,
            "pending": None if self.stream.pending is None else self.stream.pending.to("cpu", copy=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
        self.units_seen = int(state["units_seen"])
        pending = state["pending"]
        self.stream.pending = None if pending is None else pending.to(self.state.device or "cpu", copy=True)


@register_ordering("cd-grab")
class CDGraB(PairBalance):
    """CD-GraB: PairBalance with one running sum shared by all workers, pair-major and rank-minor."""

    name = "cd-grab"
    coordinated = True
