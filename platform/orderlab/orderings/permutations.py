"""Orderings that need no gradients: with-replacement, rr (D-RR), so, flipflop (docs/orderings.md)."""

from __future__ import annotations

from typing import Any

import torch

from orderlab.orderings import MessageKind, register_ordering
from orderlab.orderings._balance import Items, first_epoch_orders, random_permutation
from orderlab.orderings.spec import OrderingSpec
from orderlab.seeding import ORDER, rng_for


class PermutationOrdering:
    """Shared epoch bookkeeping of the gradient-free orderings; a subclass gives ``orders_for_epoch``.

    Args:
        spec: W, n, the seed and the first epoch's rule (dim and the balancing settings are unused).
    """

    name = ""
    needs_gradients = False
    message_kind: MessageKind = "none"
    items_per_epoch = 0

    def __init__(self, spec: OrderingSpec) -> None:
        self.num_workers = spec.num_workers
        self.shard_size = spec.shard_size
        self.seed = spec.seed
        self.first_epoch = spec.first_epoch
        self.epoch = -1
        self.orders = torch.empty(spec.num_workers, 0, dtype=torch.long)

    def orders_for_epoch(self, epoch: int) -> torch.Tensor:
        raise AssertionError("subclasses define orders_for_epoch")

    def begin_epoch(self) -> torch.Tensor:
        """Advance to the next epoch and return its orders: LongTensor [num_workers, shard_size]."""
        self.epoch += 1
        if self.epoch == 0:
            self.orders = first_epoch_orders(self.num_workers, self.shard_size, self.seed, self.first_epoch)
        else:
            self.orders = self.orders_for_epoch(self.epoch)
        return self.orders.clone()

    def observe(self, grads: Items) -> None:
        raise RuntimeError(f"ordering {self.name!r} needs no gradients; do not send any")

    observe_items = observe

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "epoch": self.epoch, "orders": self.orders.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.orders = state["orders"].clone()

    def _fresh_permutations(self, epoch: int) -> torch.Tensor:
        return torch.stack(
            [random_permutation(self.shard_size, self.seed, w, epoch) for w in range(self.num_workers)]
        )


@register_ordering("rr")
class RandomReshuffling(PermutationOrdering):
    """D-RR: each worker draws a fresh permutation every epoch from (seed, rank, epoch)."""

    name = "rr"

    def orders_for_epoch(self, epoch: int) -> torch.Tensor:
        return self._fresh_permutations(epoch)


@register_ordering("so")
class ShuffleOnce(PermutationOrdering):
    """Shuffle once: epoch 0's permutation is kept every epoch."""

    name = "so"

    def orders_for_epoch(self, epoch: int) -> torch.Tensor:
        return self.orders.clone()


@register_ordering("flipflop")
class FlipFlop(PermutationOrdering):
    """Even epochs a fresh permutation, odd epochs the previous order reversed (Rajput et al. 2022)."""

    name = "flipflop"

    def orders_for_epoch(self, epoch: int) -> torch.Tensor:
        return self.orders.flip(1) if epoch % 2 else self._fresh_permutations(epoch)


@register_ordering("with-replacement")
class WithReplacement(PermutationOrdering):
    """SGD: every position draws a unit uniformly at random (orders are not permutations)."""

    name = "with-replacement"

    def orders_for_epoch(self, epoch: int) -> torch.Tensor:
        return torch.stack(
            [
                torch.randint(
                    self.shard_size, (self.shard_size,), generator=rng_for(self.seed, w, epoch, ORDER)
                )
                for w in range(self.num_workers)
            ]
        )
