"""MeanBalance with the stale mean (``grab``; ID-GraB (Bal) when W > 1).

Source: Lu et al., "GraB: Finding Provably Better Data Permutations than Random Reshuffling",
NeurIPS 2022, Alg. 4 (online Herding with stale mean); rules: docs/orderings.md, "MeanBalance".
Arithmetic follows grab-sampler's ``MeanBalance``: the stale mean is this epoch's float32 running
sum of raw gradients divided by n.
"""

from __future__ import annotations

from typing import Any

import torch

from orderlab.orderings import MessageKind, register_ordering
from orderlab.orderings._balance import BalancingEpochs, Items, rank_arrays
from orderlab.orderings._torch_balance import balance_centered, device_rows, items_device
from orderlab.orderings.spec import OrderingSpec


@register_ordering("grab")
class MeanBalance:
    """Per worker: c = g - μ (μ = last epoch's mean gradient, 0 at first); ε=+1 puts the unit at L.

    Args:
        spec: W, n units per worker, d, the seed, the first epoch's rule and the sign rule.
    """

    name = "grab"
    needs_gradients = True
    message_kind: MessageKind = "unit_gradients"

    def __init__(self, spec: OrderingSpec) -> None:
        self.num_workers, self.shard_size, self.dim = spec.num_workers, spec.shard_size, spec.dim
        self.items_per_epoch = spec.shard_size
        self.state = BalancingEpochs(
            self.name, spec, num_sums=spec.num_workers, items_per_epoch=spec.shard_size
        )
        num_workers, dim = spec.num_workers, spec.dim
        self.stale_mean = torch.zeros(num_workers, dim, dtype=torch.float32)
        self.gradient_sum = torch.zeros(num_workers, dim, dtype=torch.float32)

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def balance_on(self, device: torch.device | str) -> None:
        """Keep the running sums and means on ``device`` and balance there (``_torch_balance``; "cpu"
        runs that kernel on the CPU). Gradients given on a GPU move them to it by themselves."""
        self.state.to(device)
        self.stale_mean, self.gradient_sum = self.stale_mean.to(device), self.gradient_sum.to(device)

    def begin_epoch(self) -> torch.Tensor:
        """Advance to the next epoch; return its orders, LongTensor [num_workers, shard_size].

        Raises:
            RuntimeError: the current epoch's units have not all been observed.
        """
        first = self.state.epoch < 0
        orders = self.state.advance(self.state.done == self.shard_size)
        if not first:
            self.stale_mean = self.gradient_sum / self.shard_size
        self.gradient_sum.zero_()
        return orders

    def observe(self, grads: Items) -> None:
        """Balance the next k units of every worker, in visiting order.

        Args:
            grads: [num_workers, k, dim], or one [k, dim] per worker (see ``rank_arrays``). On a
                GPU, the running sums and means move there (``balance_on``).

        Raises:
            ValueError: wrong shape, or more units than the epoch has.
        """
        device, state = items_device(grads), self.state
        if device is not None and state.device is None:
            self.balance_on(device)
        if state.device is not None:
            rows = device_rows(grads, self.num_workers, self.dim, "grads", state.device).to(torch.float32)
            state.check_room(rows.shape[1], "units")
            signs = balance_centered(state, rows, self.stale_mean, self.gradient_sum)
            for j in range(rows.shape[1]):
                for w in range(self.num_workers):
                    state.next.place_unit(w, state.visit[w][state.done + j], bool(signs[j, w]))
            state.done += rows.shape[1]
            return
        grads = rank_arrays(grads, self.num_workers, self.dim, "grads", float32=True)
        num_units = len(grads[0])
        state.check_room(num_units, "units")
        running_sums, stale_means, sums = (
            state.running_sum.numpy(),
            self.stale_mean.numpy(),
            self.gradient_sum.numpy(),
        )
        for j in range(num_units):
            position = state.done + j
            for w in range(self.num_workers):
                positive = state.sign.balance(running_sums[w], grads[w][j] - stale_means[w], w)
                state.next.place_unit(w, state.visit[w][position], positive)
                sums[w] += grads[w][j]  # sequential float32 sum, as grab-sampler's stale-mean estimator
        state.done += num_units

    observe_items = observe

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.state.state_dict(),
            "stale_mean": self.stale_mean.to("cpu", copy=True),
            "gradient_sum": self.gradient_sum.to("cpu", copy=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
        device = self.state.device or "cpu"
        self.stale_mean = state["stale_mean"].to(device, copy=True)
        self.gradient_sum = state["gradient_sum"].to(device, copy=True)
