"""Helpers shared by the orderings: seeded permutations, the sign rule, the L/R slot writer, pairing.

The sign rule and slot writer live here once; grab, pair-balance and cd-grab call them
(docs/orderings.md, "Balancing sign" and "PairBalance").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

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
    """

    def __init__(self, *, balance: str, balance_c: float, seed: int, num_sums: int) -> None:
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

    def state_dict(self) -> dict[str, Any]:
        return {"generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for g, s in zip(self.generators, state["generators"], strict=True):
            g.set_state(s)


class NextOrder:
    """The orders being built for the next epoch, with each worker's free left/right slots L and R.

    Slots are Python lists: the balancing loop writes one slot per decision, and list writes cost
    a fraction of tensor element writes.
    """

    def __init__(self, num_workers: int, shard_size: int) -> None:
        self.slots = [[-1] * shard_size for _ in range(num_workers)]
        self.left = [0] * num_workers
        self.right = [shard_size - 1] * num_workers

    def place_unit(self, worker: int, unit: int, positive: bool) -> None:
        """MeanBalance: ε=+1 puts ``unit`` at L (L += 1), ε=-1 at R (R -= 1)."""
        if positive:
            self.slots[worker][self.left[worker]] = unit
            self.left[worker] += 1
        else:
            self.slots[worker][self.right[worker]] = unit
            self.right[worker] -= 1

    def place_pair(self, worker: int, first: int, second: int, positive: bool) -> None:
        """PairBalance: ε=+1 puts (first at L, second at R), ε=-1 the reverse; then L += 1, R -= 1."""
        left, right = (first, second) if positive else (second, first)
        self.slots[worker][self.left[worker]] = left
        self.slots[worker][self.right[worker]] = right
        self.left[worker] += 1
        self.right[worker] -= 1

    def place_middle(self, worker: int, unit: int) -> None:
        """Odd shard size: the epoch's last unit takes the middle slot (L = R)."""
        assert self.left[worker] == self.right[worker], "the middle slot is placed last"
        self.slots[worker][self.left[worker]] = unit
        self.left[worker] += 1

    def is_complete(self) -> bool:
        return all(left > right for left, right in zip(self.left, self.right, strict=True))

    def as_tensor(self) -> torch.Tensor:
        """The orders: LongTensor [num_workers, shard_size]; unfilled slots hold -1."""
        return torch.tensor(self.slots, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"slots": self.as_tensor(), "left": list(self.left), "right": list(self.right)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.slots = state["slots"].tolist()
        self.left = list(state["left"])
        self.right = list(state["right"])


class BalancingEpochs:
    """The epoch bookkeeping that grab, pair-balance and cd-grab share.

    Holds the epoch's orders (and their rows as lists, ``visit``, for the balancing loops), the
    orders being built for the next epoch, the running sums [num_sums, dim] float32, the sign rule,
    and how many items of the epoch have been balanced.
    """

    def __init__(
        self,
        name: str,
        *,
        num_workers: int,
        shard_size: int,
        dim: int,
        seed: int,
        first_epoch: str,
        balance: str,
        balance_c: float,
        num_sums: int,
        items_per_epoch: int,
    ) -> None:
        self.name, self.num_workers, self.shard_size = name, num_workers, shard_size
        self.seed, self.first_epoch, self.items_per_epoch = seed, first_epoch, items_per_epoch
        self.sign = SignRule(balance=balance, balance_c=balance_c, seed=seed, num_sums=num_sums)
        self.running_sum = torch.zeros(num_sums, dim, dtype=torch.float32)
        self.epoch = -1
        self.orders = torch.empty(num_workers, 0, dtype=torch.long)
        self.visit: list[list[int]] = []
        self.next = NextOrder(num_workers, shard_size)
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
        self.visit = self.orders.tolist()
        self.running_sum.zero_()
        self.next = NextOrder(self.num_workers, self.shard_size)
        self.done = 0
        self.sign.begin_epoch(self.epoch)
        return self.orders.clone()

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
            "running_sum": self.running_sum.clone(),
            "next": self.next.state_dict(),
            "done": self.done,
            "sign": self.sign.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.orders = state["orders"].clone()
        self.visit = self.orders.tolist()
        self.running_sum = state["running_sum"].clone()
        self.next.load_state_dict(state["next"])
        self.done = int(state["done"])
        self.sign.load_state_dict(state["sign"])


def check_items(items: torch.Tensor, num_workers: int, dim: int, what: str) -> None:
    """Raise ValueError unless ``items`` is [num_workers, k, dim]."""
    if items.ndim != 3 or items.shape[0] != num_workers or items.shape[2] != dim:
        raise ValueError(
            f"{what} must have shape [num_workers={num_workers}, k, dim={dim}], got {tuple(items.shape)}"
        )


class PairStream:
    """Turns a stream of unit gradients, in visiting order, into pair differences v = g_first - g_second.

    Pairs may straddle ``push`` calls (and so training steps): an unpaired unit is kept until its
    partner arrives. Used by ``pair-balance``/``cd-grab``'s ``observe`` and by workers, which send
    differences instead of gradients to halve the traffic.
    """

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None  # [num_workers, d]: first unit of an open pair

    def push(self, grads: torch.Tensor) -> torch.Tensor:
        """Add ``grads`` [num_workers, k, d]; return the completed pairs' differences [num_workers, p, d]."""
        if self.pending is not None:
            grads = torch.cat([self.pending.unsqueeze(1), grads], dim=1)
        num_units = grads.shape[1]
        num_paired = num_units - num_units % 2
        self.pending = grads[:, num_paired].clone() if num_units % 2 else None
        return grads[:, 0:num_paired:2] - grads[:, 1:num_paired:2]

    def reset(self) -> None:
        """Drop an unpaired unit (odd shard size: the last unit pairs with nothing)."""
        self.pending = None
