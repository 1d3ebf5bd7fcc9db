"""PairBalance (``pair-balance``, ID-GraB) and coordinated PairBalance (``cd-grab``, CD-GraB).

Sources: Lu et al., "GraB: Finding Provably Better Data Permutations than Random Reshuffling",
NeurIPS 2022 (PairBalance, Alg. 5); Cooper et al., "CD-GraB: Coordinating Distributed Example
Orders for Provably Accelerated Training", NeurIPS 2023 (Alg. 1). Rules: docs/orderings.md.
"""

from __future__ import annotations

from typing import Any

import torch

from orderlab.orderings import register_ordering
from orderlab.orderings._balance import NextOrder, PairStream, SignRule, first_epoch_orders


@register_ordering("pair-balance")
class PairBalance:
    """Pairs units in visiting order and balances each pair difference v = g_first - g_second.

    With ``coordinated=False`` every worker keeps its own running sum (ID-GraB's PairBalance).
    With ``coordinated=True`` one running sum r is shared by all workers and pairs are applied
    pair-major, rank-minor: for p = 0, 1, ... and w = 0..W-1 (CD-GraB). Both write pair p of
    worker w to that worker's slots L = p and R = n-1-p. With odd n the last unit of every
    worker takes its middle slot.

    Args:
        num_workers: W. shard_size: n units per worker. dim: d, gradient length.
        seed: experiment seed. first_epoch: "random" | "identity".
        balance: "deterministic" | "probabilistic". balance_c: the walk's constant c.
    """

    name = "pair-balance"
    coordinated = False
    needs_gradients = True
    message_kind = "pair_differences"

    def __init__(
        self,
        *,
        num_workers: int,
        shard_size: int,
        dim: int,
        seed: int,
        first_epoch: str,
        balance: str,
        balance_c: float,
    ) -> None:
        self.num_workers = num_workers
        self.shard_size = shard_size
        self.dim = dim
        self.seed = seed
        self.first_epoch = first_epoch
        self.items_per_epoch = shard_size // 2
        num_sums = 1 if self.coordinated else num_workers
        self.sign = SignRule(balance=balance, balance_c=balance_c, seed=seed, num_sums=num_sums)
        self.running_sum = torch.zeros(num_sums, dim, dtype=torch.float32)
        self.epoch = -1
        self.orders = torch.empty(num_workers, 0, dtype=torch.long)
        self._visit: list[list[int]] = []
        self.next = NextOrder(num_workers, shard_size)
        self.pairs_done = 0
        self.units_seen = 0  # units given to observe(); 0 when the epoch is fed through observe_items
        self.stream = PairStream()

    def begin_epoch(self) -> torch.Tensor:
        """Advance to the next epoch; return its orders, LongTensor [num_workers, shard_size].

        Raises:
            RuntimeError: the current epoch's pairs have not all been observed.
        """
        if self.epoch < 0:
            self.orders = first_epoch_orders(self.num_workers, self.shard_size, self.seed, self.first_epoch)
        else:
            if self.pairs_done < self.items_per_epoch or 0 < self.units_seen < self.shard_size:
                raise RuntimeError(
                    f"{self.name}: epoch {self.epoch} observed {self.pairs_done} of {self.items_per_epoch} pairs "
                    f"({self.units_seen} units); every unit must be seen before the next order exists"
                )
            self.orders = self.next.as_tensor()
        self.epoch += 1
        self._visit = self.orders.tolist()
        self.running_sum.zero_()
        self.next = NextOrder(self.num_workers, self.shard_size)
        self.pairs_done = 0
        self.units_seen = 0
        self.stream.reset()
        self.sign.begin_epoch(self.epoch)
        self._place_middle_if_done()
        return self.orders.clone()

    def observe(self, grads: torch.Tensor) -> None:
        """Balance the next k units of every worker. grads: [num_workers, k, dim], visiting order.

        The epoch's last unit of an odd-sized shard pairs with nothing: it must be observed, but
        only takes the middle slot.

        Raises:
            ValueError: wrong shape, or more units than the shard has.
        """
        _check_items(grads, self.num_workers, self.dim, "grads")
        if self.units_seen + grads.shape[1] > self.shard_size:
            raise ValueError(
                f"{self.name}: {self.units_seen} + {grads.shape[1]} units exceed the shard's {self.shard_size}"
            )
        self.units_seen += grads.shape[1]
        diffs = self.stream.push(grads.to(torch.float32))
        self.observe_items(diffs)

    def observe_items(self, pair_differences: torch.Tensor) -> None:
        """Balance the next p pairs of every worker.

        Args:
            pair_differences: [num_workers, p, dim], any float dtype (float16/bfloat16 payloads are
                widened; the running sum stays float32): v = g(position 2q) - g(position 2q+1)
                for the epoch's pair indices q = pairs_done .. pairs_done + p - 1.

        Raises:
            ValueError: wrong shape, or more pairs than the epoch has.
        """
        _check_items(pair_differences, self.num_workers, self.dim, "pair_differences")
        num_pairs = pair_differences.shape[1]
        if self.pairs_done + num_pairs > self.items_per_epoch:
            raise ValueError(
                f"{self.name}: {self.pairs_done} + {num_pairs} pairs exceed the epoch's {self.items_per_epoch}"
            )
        diffs = pair_differences.to(torch.float32).numpy()
        running_sums, balance, next_order, visit = (
            self.running_sum.numpy(),
            self.sign.balance,
            self.next,
            self._visit,
        )
        for j in range(num_pairs):
            pair = self.pairs_done + j
            for w in range(self.num_workers):  # orderings.md: pair-major, rank-minor
                s = 0 if self.coordinated else w
                positive = balance(running_sums[s], diffs[w, j], s)
                next_order.place_pair(w, visit[w][2 * pair], visit[w][2 * pair + 1], positive)
        self.pairs_done += num_pairs
        self._place_middle_if_done()

    def _place_middle_if_done(self) -> None:
        if self.shard_size % 2 and self.pairs_done == self.items_per_epoch and not self.next.is_complete():
            for w in range(self.num_workers):
                self.next.place_middle(w, self._visit[w][self.shard_size - 1])

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "epoch": self.epoch,
            "orders": self.orders.clone(),
            "running_sum": self.running_sum.clone(),
            "next": self.next.state_dict(),
            "pairs_done": self.pairs_done,
            "units_seen": self.units_seen,
            "pending": None if self.stream.pending is None else self.stream.pending.clone(),
            "sign": self.sign.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.orders = state["orders"].clone()
        self._visit = self.orders.tolist()
        self.running_sum = state["running_sum"].clone()
        self.next.load_state_dict(state["next"])
        self.pairs_done = int(state["pairs_done"])
        self.units_seen = int(state["units_seen"])
        self.stream.pending = None if state["pending"] is None else state["pending"].clone()
        self.sign.load_state_dict(state["sign"])


def _check_items(items: torch.Tensor, num_workers: int, dim: int, what: str) -> None:
    if items.ndim != 3 or items.shape[0] != num_workers or items.shape[2] != dim:
        raise ValueError(
            f"{what} must have shape [num_workers={num_workers}, k, dim={dim}], got {tuple(items.shape)}"
        )


@register_ordering("cd-grab")
class CDGraB(PairBalance):
    """CD-GraB: PairBalance with one running sum shared by all workers, pair-major and rank-minor."""

    name = "cd-grab"
    coordinated = True
