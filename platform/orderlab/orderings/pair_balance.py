"""PairBalance (``pair-balance``, ID-GraB) and coordinated PairBalance (``cd-grab``, CD-GraB).

Sources: Lu et al., "GraB: Finding Provably Better Data Permutations than Random Reshuffling",
NeurIPS 2022 (PairBalance, Alg. 5); Cooper et al., "CD-GraB: Coordinating Distributed Example
Orders for Provably Accelerated Training", NeurIPS 2023 (Alg. 1). Rules: docs/orderings.md.
"""

from __future__ import annotations

from typing import Any

import torch

from orderlab.orderings import register_ordering
from orderlab.orderings._balance import BalancingEpochs, PairStream, check_items


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
        self.num_workers, self.shard_size, self.dim = num_workers, shard_size, dim
        self.items_per_epoch = shard_size // 2
        self.state = BalancingEpochs(
            self.name,
            num_workers=num_workers,
            shard_size=shard_size,
            dim=dim,
            seed=seed,
            first_epoch=first_epoch,
            balance=balance,
            balance_c=balance_c,
            num_sums=1 if self.coordinated else num_workers,
            items_per_epoch=self.items_per_epoch,
        )
        self.units_seen = 0  # units given to observe(); 0 when the epoch is fed through observe_items
        self.stream = PairStream()

    @property
    def epoch(self) -> int:
        return self.state.epoch

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

    def observe(self, grads: torch.Tensor) -> None:
        """Balance the next k units of every worker. grads: [num_workers, k, dim], visiting order.

        The epoch's last unit of an odd-sized shard pairs with nothing: it must be observed, but
        only takes the middle slot.

        Raises:
            ValueError: wrong shape, or more units than the shard has.
        """
        check_items(grads, self.num_workers, self.dim, "grads")
        if self.units_seen + grads.shape[1] > self.shard_size:
            raise ValueError(
                f"{self.name}: {self.units_seen} + {grads.shape[1]} units exceed the shard's {self.shard_size}"
            )
        self.units_seen += grads.shape[1]
        self.observe_items(self.stream.push(grads.to(torch.float32)))

    def observe_items(self, pair_differences: torch.Tensor) -> None:
        """Balance the next p pairs of every worker.

        Args:
            pair_differences: [num_workers, p, dim], any float dtype (float16/bfloat16 payloads are
                widened; the running sum stays float32): v = g(position 2q) - g(position 2q+1)
                for the epoch's next pair indices q.

        Raises:
            ValueError: wrong shape, or more pairs than the epoch has.
        """
        check_items(pair_differences, self.num_workers, self.dim, "pair_differences")
        state, num_pairs = self.state, pair_differences.shape[1]
        state.check_room(num_pairs, "pairs")
        diffs = pair_differences.to(torch.float32).numpy()
        running_sums, balance, visit = state.running_sum.numpy(), state.sign.balance, state.visit
        for j in range(num_pairs):
            pair = state.done + j
            for w in range(self.num_workers):  # orderings.md: pair-major, rank-minor
                s = 0 if self.coordinated else w
                positive = balance(running_sums[s], diffs[w, j], s)
                state.next.place_pair(w, visit[w][2 * pair], visit[w][2 * pair + 1], positive)
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
            "pending": None if self.stream.pending is None else self.stream.pending.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
        self.units_seen = int(state["units_seen"])
        self.stream.pending = None if state["pending"] is None else state["pending"].clone()


@register_ordering("cd-grab")
class CDGraB(PairBalance):
    """CD-GraB: PairBalance with one running sum shared by all workers, pair-major and rank-minor."""

    name = "cd-grab"
    coordinated = True
