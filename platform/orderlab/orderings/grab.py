"""MeanBalance with the stale mean (``grab``; ID-GraB (Bal) when W > 1).

Source: Lu et al., "GraB: Finding Provably Better Data Permutations than Random Reshuffling",
NeurIPS 2022, Alg. 4 (online Herding with stale mean); rules: docs/orderings.md, "MeanBalance".
Arithmetic follows grab-sampler's ``MeanBalance``: the stale mean is this epoch's float32 running
sum of raw gradients divided by n.
"""

from __future__ import annotations

from typing import Any

import torch

from orderlab.orderings import register_ordering
from orderlab.orderings._balance import NextOrder, SignRule, first_epoch_orders
from orderlab.orderings.pair_balance import _check_items


@register_ordering("grab")
class MeanBalance:
    """Per worker: c = g - μ (μ = last epoch's mean gradient, 0 at first); ε=+1 puts the unit at L.

    Args:
        num_workers: W. shard_size: n units per worker. dim: d, gradient length.
        seed: experiment seed. first_epoch: "random" | "identity".
        balance: "deterministic" | "probabilistic". balance_c: the walk's constant c.
    """

    name = "grab"
    needs_gradients = True
    message_kind = "unit_gradients"

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
        self.items_per_epoch = shard_size
        self.sign = SignRule(balance=balance, balance_c=balance_c, seed=seed, num_sums=num_workers)
        self.running_sum = torch.zeros(num_workers, dim, dtype=torch.float32)
        self.stale_mean = torch.zeros(num_workers, dim, dtype=torch.float32)
        self.gradient_sum = torch.zeros(num_workers, dim, dtype=torch.float32)
        self.epoch = -1
        self.orders = torch.empty(num_workers, 0, dtype=torch.long)
        self._visit: list[list[int]] = []
        self.next = NextOrder(num_workers, shard_size)
        self.units_done = 0

    def begin_epoch(self) -> torch.Tensor:
        """Advance to the next epoch; return its orders, LongTensor [num_workers, shard_size].

        Raises:
            RuntimeError: the current epoch's units have not all been observed.
        """
        if self.epoch < 0:
            self.orders = first_epoch_orders(self.num_workers, self.shard_size, self.seed, self.first_epoch)
        else:
            if self.units_done < self.shard_size:
                raise RuntimeError(
                    f"grab: epoch {self.epoch} observed {self.units_done} of {self.shard_size} units; "
                    "every unit must be seen before the next order exists"
                )
            self.orders = self.next.as_tensor()
            self.stale_mean = self.gradient_sum / self.shard_size
        self.epoch += 1
        self._visit = self.orders.tolist()
        self.running_sum.zero_()
        self.gradient_sum.zero_()
        self.next = NextOrder(self.num_workers, self.shard_size)
        self.units_done = 0
        self.sign.begin_epoch(self.epoch)
        return self.orders.clone()

    def observe(self, grads: torch.Tensor) -> None:
        """Balance the next k units of every worker. grads: [num_workers, k, dim], visiting order.

        Raises:
            ValueError: wrong shape, or more units than the epoch has.
        """
        _check_items(grads, self.num_workers, self.dim, "grads")
        num_units = grads.shape[1]
        if self.units_done + num_units > self.shard_size:
            raise ValueError(
                f"grab: {self.units_done} + {num_units} units exceed the shard's {self.shard_size}"
            )
        grads = grads.to(torch.float32).numpy()
        running_sums, stale_means, sums = (
            self.running_sum.numpy(),
            self.stale_mean.numpy(),
            self.gradient_sum.numpy(),
        )
        for j in range(num_units):
            position = self.units_done + j
            for w in range(self.num_workers):
                positive = self.sign.balance(running_sums[w], grads[w, j] - stale_means[w], w)
                self.next.place_unit(w, self._visit[w][position], positive)
                sums[w] += grads[w, j]  # sequential float32 sum, as grab-sampler's stale-mean estimator
        self.units_done += num_units

    observe_items = observe

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "epoch": self.epoch,
            "orders": self.orders.clone(),
            "running_sum": self.running_sum.clone(),
            "stale_mean": self.stale_mean.clone(),
            "gradient_sum": self.gradient_sum.clone(),
            "next": self.next.state_dict(),
            "units_done": self.units_done,
            "sign": self.sign.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.orders = state["orders"].clone()
        self._visit = self.orders.tolist()
        self.running_sum = state["running_sum"].clone()
        self.stale_mean = state["stale_mean"].clone()
        self.gradient_sum = state["gradient_sum"].clone()
        self.next.load_state_dict(state["next"])
        self.units_done = int(state["units_done"])
        self.sign.load_state_dict(state["sign"])
